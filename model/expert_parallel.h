// Expert parallelism (EP) of the MoE transformer over the W ranks of a Communicator (see
// ../shared/design/DESIGN.md, "Expert parallelism and the balancer").
//
// Every rank holds the replicated (data-parallel) parameters whole: embeddings, attention,
// norms, dense FFNs, shared experts, routers and heads. Of the routed experts it holds only
// its E/W home experts [rank * E/W, (rank + 1) * E/W) (expert tensors [E/W, ...], after the
// replicated ones in the arena; model/weights.h). Each rank runs its own sequences; an MoE
// layer on each rank
//   routes its tokens (top-k or replay) -> permutes its assignments by destination (per the
//   layer's LayerPlacement: the home expert or a replica slot on any rank) -> exchanges
//   counts -> all-to-all dispatch -> grouped expert GEMMs over the rows it received (home
//   experts in expert order, then replica slots in slot order; by source rank within a
//   group) -> all-to-all combine -> gate-weighted sum.
// Backward mirrors it: the expert rank accumulates its home experts' weight gradients from
// every source rank's rows, so expert gradients need no all-reduce; replicated gradients
// are summed over ranks by MoeTransformer::all_reduce_grads(), after which AdamW steps every
// rank on its own arena (replicated parameters stay identical: same values, same grads),
// with the global gradient norm of MoeTransformer::grad_norm().
//
// Router balancing under EP is defined over the global micro-batch (all ranks' tokens of
// the micro-step), so that W ranks give the W = 1 results: every MoE layer all-reduces its
// per-expert load and soft-probability sums and token count. switch_aux uses them for f and
// P, global_aux adds them to the step accumulators, loss_free's bias and phi's EMA update
// from the accumulated global statistics (so the state stays identical on every rank).
// ForwardResult::balance_loss is this global loss on every rank (count it once), and each
// rank's backward adds the gradient of balance_scale * loss with respect to its own tokens'
// router probabilities; the router-gradient all-reduce sums them.
//
// Routing traces stay per rank (each rank's tokens); replay works unchanged. Generation
// (forward_cached) runs each rank's sequences on the home experts (model/generation.h).
// Checkpoints (model/checkpoint.h) are collectives over the ranks in the single-rank format.
#pragma once

#include <cstdint>

#include "engine/backend.h"
#include "model/weights.h"

namespace fm {

class Communicator;

// Given to MoeTransformer's constructor. comm == nullptr or a group of one: no expert
// parallelism (the single-rank code path). Otherwise W = comm->size() must divide
// n_experts; the communicator must outlive the model.
struct ExpertParallel {
  Communicator* comm = nullptr;
};

// The replica slots of this rank (balancer/placement.h): for each MoE layer, S slots, each
// holding a copy of some expert's current weights for one micro-step, and a gradient buffer
// per slot. The caller (the transfer engine, or CommReplicaSlots in model/replica_slots.h)
// fills the slots the plans use before the forward, keeps them unchanged until its
// backward, and after the backward reduces each slot's gradient into its home expert's.
class ReplicaWeights {
 public:
  virtual ~ReplicaWeights() = default;
  virtual int64_t slots_per_rank() const = 0;
  // w_gate/w_up [S, F, H], w_down [S, H, F]: slot s holds the expert the plan puts there.
  virtual const FfnWeights& slot_weights(int64_t moe_layer) = 0;
  // Same shapes; the MoE backward accumulates (+=) the slots' weight gradients here.
  virtual FfnWeights& slot_grads(int64_t moe_layer) = 0;
};

// Copies into `shard` (rank `rank`'s arena, shard.expert_shards() = W) that rank's part of
// `full` (a single-rank arena of the same config): replicated tensors whole, expert tensors
// [rank * E/W, (rank + 1) * E/W). Works for parameters and gradients alike.
void copy_param_shard(Backend& backend, const ParamArena& full, ParamArena& shard, int rank);

}  // namespace fm
