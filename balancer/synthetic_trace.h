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
// Layer-wise popularity skew. layer_skew[l], when given, replaces skew in MoE layer l (real
// models route more unevenly in some layers than in others).
//
// Per-sequence expert preference. With preference p > 0 every group of preference_group
// consecutive sequences (the samples of one prompt, as in a GRPO group) also draws, per layer,
// its own random order of the experts with Zipf weights of exponent preference_skew; a token
// then draws from the mixture
//   w(e) = (1 - p) * zipf_l(global rank of e) / Z_l + p * zipf_p(group rank of e) / Z_p,
// (Z = the sum of the weights), so groups have hot sets of their own, unrelated to each
// other's, on top of the layer's drifting popularity. p = 0 (the default) draws nothing extra:
// the trace is the same as without these options.
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
  int64_t seq_len = 256;           // every sequence has this many tokens
  double skew = 1.0;               // Zipf exponent s >= 0
  double drift = 0.1;              // transpositions per sequence, as a fraction of E, in [0, 1]
  std::vector<double> layer_skew;  // empty, or [n_moe_layers] Zipf exponents >= 0 (over skew)
  double preference = 0;           // weight of each group's own expert order, in [0, 1]
  double preference_skew = 1.0;    // Zipf exponent of a group's own order, >= 0
  int64_t preference_group = 1;    // consecutive sequences sharing one preference, >= 1
  uint64_t seed = 0;
};

// Throws std::invalid_argument naming the option when a value is out of range
// (experts in [1, 65536], 1 <= top_k <= experts, layers/sequences >= 1, seq_len >= 0,
// layer_skew of the wrong length or with a negative entry, preference outside [0, 1],
// preference_skew < 0, preference_group < 1).
RoutingTrace synthetic_trace(const SyntheticTraceOptions& options);

}  // namespace fm
