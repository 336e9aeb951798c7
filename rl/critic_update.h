// The PPO critic (adv_estimator: gae): its value targets and its update.
//
// Targets, as veRL's compute_gae_advantage_return: a response's token rewards are
//   r_t = -kl_coef * kl_t  (use_kl_in_reward; kl_t the per-token KL to the reference)
//         + score on the last response token,
// GAE over its response tokens with the critic's values V_t (rl/advantages.h gae()) gives
// advantages A_t and returns R_t = A_t + V_t; the advantages are then whitened over every
// response token of the batch (masked_whiten), the returns are not.
//
// The update of one mini-batch (the `update_critic` stage), shaped like update_actor: for
// each micro-batch a training forward of the value model (the rollout's routing replayed when
// asked), the clipped value loss (model/value_loss.h) with the mini-batch's token-mean, and a
// backward that accumulates gradients; then one clipped AdamW step and the router-balancing
// update.
#pragma once

#include <cstdint>
#include <vector>

#include "model/moe_transformer.h"
#include "model/optimizer.h"
#include "rl/advantages.h"
#include "rl/rollout.h"

namespace fm {

// One response's token rewards: -kl_coef * kl[t] on every token (kl empty: no penalty) and
// `score` added on the last of its `tokens` tokens.
std::vector<double> token_rewards(double score, const std::vector<double>& kl, double kl_coef,
                                  size_t tokens);

struct GaeTargets {
  std::vector<std::vector<double>> advantages;  // [sample][response token], whitened
  std::vector<std::vector<double>> returns;     // [sample][response token], value targets
};

// GAE targets of a batch: scores[i] and values[i] (one per response token) of each sample;
// kl empty (no KL in the reward) or kl[i] one per response token. With comm (several
// ranks, each with its share of the batch) the whitening is over every rank's tokens.
GaeTargets gae_targets(const AdvantageConfig& config, const std::vector<double>& scores,
                       const std::vector<std::vector<double>>& values,
                       const std::vector<std::vector<double>>& kl, double kl_coef,
                       Communicator* comm = nullptr);

// The values stage: V at every position of the packed samples (routing replayed from the
// rollout when replay_routing; the critic's own routing otherwise). training = false.
const ForwardResult& critic_values(MoeTransformer& critic, const PackedSamples& packed,
                                   bool replay_routing);

struct CriticMicroBatch {
  PackedSamples packed;
  std::vector<double> old_values;  // [N] the values stage's V, before any critic update
  std::vector<double> returns;     // [N] value targets (0 where the mask is 0)
};

struct CriticUpdateMetrics {
  // Token-weighted means over the mini-batch's response tokens.
  double vf_loss = 0, vf_clipfrac = 0;
  double values_max_dev = 0;  // max |V - old V| on response tokens (0 before any update)
  double balance_loss = 0;    // router balancing, mean over micro-batches
  double grad_norm = 0, lr = 0;
  bool skipped = false;  // non-finite values or gradient: no parameter changed
  int64_t tokens = 0;
};

CriticUpdateMetrics update_critic(MoeTransformer& critic, AdamW& optimizer, double cliprange_value,
                                  bool replay_routing,
                                  const std::vector<CriticMicroBatch>& micro_batches);

}  // namespace fm
