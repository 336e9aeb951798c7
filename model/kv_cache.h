// KvCache: the keys and values of every attention layer for S sequence slots of
// up to T positions each, [S, T, Hkv, D] per layer. Generation owns one; a slot
// holds one sequence at a time and is reused when that sequence finishes.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/backend.h"
#include "model/config.h"

namespace fm {

class KvCache {
 public:
  KvCache(const ModelConfig& c, Backend& backend, DType dtype, int64_t slots, int64_t max_len);

  int64_t slots() const { return slots_; }
  int64_t max_len() const { return max_len_; }
  Tensor& keys(int64_t layer) { return keys_.at(static_cast<size_t>(layer)); }
  Tensor& values(int64_t layer) { return values_.at(static_cast<size_t>(layer)); }
  // Bytes held (keys and values of all layers).
  int64_t bytes() const;

 private:
  int64_t slots_, max_len_;
  std::vector<Tensor> keys_, values_;
};

}  // namespace fm
