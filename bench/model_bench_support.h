// Shared by the model benchmarks (bench_model_cpu, bench_model_gpu): a synthetic
// next-token batch of n_seq sequences of seq_len random tokens (fixed seed).
#pragma once

#include "engine/rng.h"
#include "model/moe_transformer.h"

namespace fm::bench {

inline fm::Batch synthetic_batch(const fm::ModelConfig& c, int64_t n_seq, int64_t seq_len) {
  fm::Rng rng(1, 2);
  fm::Batch b;
  b.seq_offsets.push_back(0);
  for (int64_t s = 0; s < n_seq; ++s) {
    for (int64_t t = 0; t < seq_len; ++t)
      b.tokens.push_back(static_cast<int32_t>(rng.next_below(static_cast<uint64_t>(c.vocab_size))));
    for (int64_t t = 0; t < seq_len; ++t)
      b.targets.push_back(t + 1 < seq_len ? b.tokens[b.tokens.size() - seq_len + t + 1] : -1);
    b.seq_offsets.push_back(static_cast<int64_t>(b.tokens.size()));
  }
  return b;
}

}  // namespace fm::bench
