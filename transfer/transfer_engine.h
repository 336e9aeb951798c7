// TransferEngine: moves expert weights into this rank's replica slots before the layer that
// reads them, and replica gradients back into their home experts after the backward (see
// ../shared/design/DESIGN.md, "Transfer engine").
//
// Per MoE layer a rank has S replica slots. A slot holds one expert: its tensors (the
// ExpertLayout's parts, e.g. gate [F, H], up [F, H], down [H, F]) as row s of one [S, ...part]
// tensor per part -- the layout of ReplicaWeights (model/expert_parallel.h), so an adapter
// hands slot_weights(l) / slot_grads(l) to the MoE layer as they are. Slot gradients start at
// zero with every prefetch; the MoE backward accumulates into them.
//
// Calls per rank, in this order for each (micro-step, layer) whose plan fills slots:
//   prefetch(m, l, plan)   start filling layer l's slots per plan (non-blocking: the moves may
//                          overlap the compute of earlier layers)
//   wait(l)                block until they are filled; then the layer may run
//   ... forward (and backward) of layer l ...
//   return_gradients(l)    collective: every slot's gradient is added into its home expert's
//                          gradient on the home rank (updates only)
//   release(l)             the slots may be refilled by the next prefetch of layer l
// and once per optimizer step:
//   drain()                collective: no move of any rank is in flight, every layer released;
//                          the ranks may now change their home weights (the optimizer step)
//   refresh_mirror()       collective, after the optimizer step: the host mirrors take the new
//                          weights; prefetches may start again
// A slot whose expert is unchanged since the previous prefetch of the same layer (and no
// optimizer step in between) is not moved again. Every rank makes the collective calls in the
// same order with the same plans; the non-collective calls are per rank. One thread per rank
// calls the engine (it is not thread-safe); implementations may move on threads of their own.
// Misuse (a layer out of range, a plan of the wrong shape, wait or release without prefetch,
// prefetch into slots in use, prefetch between drain and refresh_mirror) throws fm::Error
// naming the call, the rank, the layer and the problem; waits are bounded by a timeout.
#pragma once

#include <cstdint>
#include <vector>

#include "balancer/placement.h"
#include "engine/tensor.h"

namespace fm {

// The tensors of one expert, in a fixed order: e.g. {{F, H}, {F, H}, {H, F}}.
struct ExpertLayout {
  std::vector<Shape> parts;
  DType dtype = DType::f32;  // the home experts' weights and gradients, and the slot gradients
  // What the slots hold and every move carries: dtype, or (bf16_slots, f32 experts computed in
  // bf16) each expert rounded to bf16 -- the bits of the home rank's bf16 compute copy, so a
  // replica computes exactly what its home expert does, at half the bytes per move. Gradients
  // stay in dtype: the backward accumulates replica gradients in f32.
  bool bf16_slots = false;
  DType slot_dtype() const { return bf16_slots ? DType::bf16 : dtype; }
  int64_t part_numel(size_t part) const { return shape_numel(parts.at(part)); }
  int64_t bytes() const;  // one move: all parts in slot_dtype()
};

// What a rank's engine did since its construction.
struct TransferStats {
  int64_t moves_direct = 0, moves_cpu = 0;  // slot fills of this rank, per path
  int64_t bytes_direct = 0, bytes_cpu = 0;
  int64_t slots_reused = 0;         // filled slots of this rank that needed no move
  int64_t grad_bytes_returned = 0;  // replica gradient bytes added into this rank's experts
  double wait_s = 0;                // time this rank spent blocked in wait()
  // Sum over prefetches of the modeled time of the layer's moves over all ranks (PathLoad's
  // makespan with the engine's LinkModel): what the hardware paths would take.
  double modeled_transfer_s = 0;
};

class TransferEngine {
 public:
  virtual ~TransferEngine() = default;

  virtual int32_t rank() const = 0;
  virtual int32_t n_layers() const = 0;
  virtual int32_t slots_per_rank() const = 0;
  virtual const ExpertLayout& layout() const = 0;

  // Starts the moves that fill this rank's slots of `layer` with the experts plan.slots[rank]
  // names (plan: W ranks x S slots, E experts, the same on every rank).
  virtual void prefetch(int64_t micro_step, int32_t layer, const LayerPlacement& plan) = 0;
  // Blocks until the moves of the last prefetch of `layer` are done; a failed move throws here.
  // Returns at once when they are (wait is idempotent until release).
  virtual void wait(int32_t layer) = 0;
  virtual void release(int32_t layer) = 0;
  virtual void return_gradients(int32_t layer) = 0;
  virtual void drain() = 0;
  virtual void refresh_mirror() = 0;

  // [part]: [S, ...part] in layout().slot_dtype(); valid after wait(layer) until release(layer).
  virtual const std::vector<Tensor>& slot_weights(int32_t layer) = 0;
  // [part]: [S, ...part] in layout().dtype; the backward accumulates (+=) into these.
  virtual std::vector<Tensor>& slot_grads(int32_t layer) = 0;
  // [slot]: the expert the last prefetch of `layer` put in this rank's slots, -1 when empty.
  virtual const std::vector<int32_t>& slot_experts(int32_t layer) const = 0;

  virtual const TransferStats& stats() const = 0;
};

}  // namespace fm
