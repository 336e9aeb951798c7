#include "model/kv_cache.h"

#include "engine/error.h"

namespace fm {

KvCache::KvCache(const ModelConfig& c, Backend& backend, DType dtype, int64_t slots,
                 int64_t max_len)
    : slots_(slots), max_len_(max_len) {
  FM_CHECK(slots > 0, "KV cache: slots must be positive, got {}", slots);
  FM_CHECK(max_len > 0 && max_len <= c.max_seq_len,
           "KV cache: max_len must be in [1, max_seq_len = {}], got {}", c.max_seq_len, max_len);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    keys_.push_back(backend.zeros({slots, max_len, c.n_kv_heads, c.head_dim}, dtype));
    values_.push_back(backend.zeros({slots, max_len, c.n_kv_heads, c.head_dim}, dtype));
  }
}

int64_t KvCache::bytes() const {
  int64_t total = 0;
  for (const Tensor& t : keys_) total += 2 * static_cast<int64_t>(t.nbytes());
  return total;
}

}  // namespace fm
