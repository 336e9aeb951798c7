// Router-level load balancing: the auxiliary losses and per-step state
// updates of `switch_aux`, `global_aux`, `loss_free` and `phi` (RESEARCH.md).
// Pure host math on per-layer statistics, so every formula is testable by hand.
#pragma once

#include <cstdint>
#include <vector>

#include "model/config.h"

namespace fm {

// Per MoE layer state that persists across steps (saved in checkpoints) plus
// the statistics accumulated over the current step's training forwards.
struct LayerBalanceState {
  std::vector<double> bias;  // [E] loss_free selection bias
  std::vector<double> ema;   // [E] phi: m, the EMA of mean soft probabilities (starts uniform)
  // Accumulated since the last end_step():
  std::vector<int64_t> step_load;     // [E] top-k assignments
  std::vector<double> step_prob_sum;  // [E] sum over tokens of soft probabilities
  int64_t step_tokens = 0;

  explicit LayerBalanceState(int64_t n_experts = 0);
};

// The balancing loss of one MoE layer for one micro-batch and its gradient
// with respect to every token's soft probabilities: dL/dprobs[t, e] = dprobs[e]
// for all t (every method here is linear in the batch-mean probabilities).
struct BalanceTerm {
  double loss = 0.0;
  std::vector<double> dprobs;  // [E]; empty when the method has no loss
};

// prob_sum[e] = sum over the micro-batch's N tokens of probs[t, e];
// load[e] = top-k assignments to e in the micro-batch.
BalanceTerm balance_term(const RouterBalanceConfig& cfg, const LayerBalanceState& state,
                         const std::vector<double>& prob_sum, const std::vector<int64_t>& load,
                         int64_t n_tokens, int64_t top_k);

// Adds a training micro-batch's statistics to the step accumulators.
void accumulate_step_stats(LayerBalanceState& state, const std::vector<double>& prob_sum,
                           const std::vector<int64_t>& load, int64_t n_tokens);

// Applies the per-step updates (loss_free bias, phi EMA) from the accumulated
// statistics, then clears the accumulators.
void end_balance_step(const RouterBalanceConfig& cfg, LayerBalanceState& state);

// phi's price vector q = grad phi(m).
std::vector<double> phi_price(PhiPotential potential, const std::vector<double>& m);
// phi's EMA rule under the configured convention.
std::vector<double> phi_ema(const RouterBalanceConfig& cfg, const std::vector<double>& m,
                            const std::vector<double>& p);

// Gini coefficient of a load vector (0 = uniform).
double gini(const std::vector<int64_t>& load);

}  // namespace fm
