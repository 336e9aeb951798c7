// CommReplicaSlots: the simplest correct ReplicaWeights (model/expert_parallel.h). Before a
// forward, every replica slot the plans populate receives its expert's current weights
// from the expert's home rank (send/recv pairs through the model's communicator); after the
// backward, every such slot's gradient goes back to the home rank, which adds it to the
// expert's gradient. The transfer engine (transfer/) makes the same moves faster and
// overlapped with compute; this one is the reference it is tested against.
#pragma once

#include <cstdint>
#include <vector>

#include "balancer/placement.h"
#include "model/moe_transformer.h"

namespace fm {

class CommReplicaSlots final : public ReplicaWeights {
 public:
  // S slots per rank and MoE layer for `model` (which must run expert parallelism); the
  // slot buffers (weights and gradients, 2 x S x 3 x F x H per MoE layer) start at zero. The
  // weights have the model's compute dtype (bf16 under mixed precision: each move carries the
  // expert's master weights rounded to bf16), the gradients its parameters' dtype.
  CommReplicaSlots(MoeTransformer& model, int64_t slots_per_rank);

  int64_t slots_per_rank() const override { return slots_; }
  const FfnWeights& slot_weights(int64_t moe_layer) override;
  FfnWeights& slot_grads(int64_t moe_layer) override;

  // Collective: copies into every slot that `plans` (one per MoE layer, the same on every
  // rank) populates its expert's current weights from the home rank, and zeroes the slot
  // gradients. Call before the forward that runs these plans.
  void load(const std::vector<LayerPlacement>& plans);
  // Collective: adds every slot's gradient (of the backward after the last load) into its
  // expert's gradient on the home rank, and zeroes the slot gradients. Call after that
  // backward, before the next load and before MoeTransformer::all_reduce_grads.
  void reduce_grads();

 private:
  MoeTransformer& model_;
  int64_t slots_ = 0;
  std::vector<FfnWeights> weights_, grads_;  // [MoE layer]: [S, F, H], [S, F, H], [S, H, F]
  // [MoE layer][rank * S + slot]: the expert the last load put there, or -1.
  std::vector<std::vector<int32_t>> loaded_;
};

}  // namespace fm
