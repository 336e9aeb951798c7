// Synthetic routing traces with Zipf-skewed, drifting expert popularity: a
// stand-in for real rollouts in tests and balancer experiments.
//
// Model. Each MoE layer keeps a popularity order of its experts (a random
// permutation at the start). The expert at popularity rank i (0-based) has
// weight 1 / (i + 1)^skew (Zipf; skew 0 = uniform). Before each sequence the
// order drifts: round(drift * E) random transpositions. Every token of the
// sequence then draws its top_k DISTINCT experts from these weights (sampling
// without replacement). So one sequence has a consistent hot set, consecutive
// sequences share part of it, and a long run covers every expert: skewed
// micro-steps, balanced whole trace, as in real RL rollouts.
//
// Deterministic for a seed on every platform (mt19937_64 raw output, no
// std distributions).
#pragma once

#include <cstdint>
#include <vector>

#include "balancer/routing_trace.h"

namespace fm {

struct SyntheticTraceOptions {
  int64_t n_experts = 64;
  int64_t top_k = 8;
  int64_t n_moe_layers = 4;
  int64_t sequences = 64;
  int64_t seq_len = 256;  // every sequence has this many tokens
  double skew = 1.0;      // Zipf exponent s >= 0
  double drift = 0.1;     // transpositions per sequence, as a fraction of E, in [0, 1]
  uint64_t seed = 0;
};

// Throws std::invalid_argument naming the option when a value is out of range
// (experts in [1, 65536], 1 <= top_k <= experts, layers/sequences >= 1, seq_len >= 0).
RoutingTrace synthetic_trace(const SyntheticTraceOptions& options);

}  // namespace fm
