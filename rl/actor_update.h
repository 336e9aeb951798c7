// The actor update of one mini-batch (the `update_actor` stage): for each
// micro-batch, a training forward with the rollout's routing replayed (gates
// recomputed from the router, so the router trains), the policy loss with the
// mini-batch's normalizer, and a backward that accumulates gradients; then one
// clipped AdamW step and the router-balancing update.
#pragma once

#include <cstdint>
#include <vector>

#include "model/moe_transformer.h"
#include "model/optimizer.h"
#include "rl/micro_step_balancer.h"
#include "rl/policy_loss.h"
#include "rl/rollout.h"

namespace fm {

struct ActorMicroBatch {
  PackedSamples packed;
  std::vector<double> old_logp;    // [N] recomputed under replay before any update
  std::vector<double> ref_logp;    // [N] reference policy; empty unless use_kl_loss
  std::vector<double> advantages;  // [N] per position (0 where the mask is 0)
};

struct ActorUpdateMetrics {
  // Token-weighted means over the mini-batch's response tokens.
  double pg_loss = 0, pg_clipfrac = 0, pg_clipfrac_lower = 0, ppo_kl = 0, kl_loss = 0, entropy = 0,
         ratio_mean = 0;
  double ratio_max = 0;
  double loss = 0;          // the aggregated policy loss (sum of the micro-batch shares)
  double balance_loss = 0;  // router balancing, mean over micro-batches
  double grad_norm = 0, lr = 0;
  bool skipped = false;  // non-finite log-probs or gradient: no parameter changed
  int64_t tokens = 0;
};

// hooks (optional): the balancer's placements per micro-batch and its replica-slot moves
// (rl/micro_step_balancer.h).
ActorUpdateMetrics update_actor(MoeTransformer& model, AdamW& optimizer,
                                const PolicyLossConfig& config,
                                const std::vector<ActorMicroBatch>& micro_batches,
                                MicroStepHooks* hooks = nullptr);

// The policy-loss input of a micro-batch, with the model's current log-probs and entropies.
PolicyLossInput policy_loss_input(const ActorMicroBatch& mb, std::vector<double> logp,
                                  std::vector<double> entropy);

}  // namespace fm
