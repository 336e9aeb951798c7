#include "model/replica_slots.h"

#include "engine/comm.h"
#include "engine/error.h"

namespace fm {

namespace {

constexpr int kWeightTag = 0x5e1, kGradTag = 0x5e2;

// The three tensors of an FfnWeights, in one order for every transfer.
std::vector<Tensor*> parts(FfnWeights& f) {
  return {&f.w_gate, &f.w_up, &f.w_down};
}
std::vector<const Tensor*> parts(const FfnWeights& f) {
  return {&f.w_gate, &f.w_up, &f.w_down};
}

}  // namespace

CommReplicaSlots::CommReplicaSlots(MoeTransformer& model, int64_t slots_per_rank)
    : model_(model), slots_(slots_per_rank) {
  FM_CHECK(model.ep_world() > 1, "replica slots: the model does not run expert parallelism");
  FM_CHECK(slots_per_rank >= 0, "replica slots: slots_per_rank must be >= 0 (got {})",
           slots_per_rank);
  const ModelConfig& c = model.config();
  Backend& b = model.backend();
  const int64_t S = slots_per_rank, F = c.moe_ffn, H = c.hidden;
  // Weights in the compute dtype (bf16 under mixed precision: half the bytes per move, and
  // the bits of the home experts' bf16 compute copy); gradients in the parameters' dtype.
  for (int64_t m = 0; m < c.n_moe_layers(); ++m) {
    for (auto [set, dtype] :
         {std::pair{&weights_, model.compute_dtype()}, {&grads_, model.dtype()}}) {
      FfnWeights f;
      f.w_gate = b.zeros({S, F, H}, dtype);
      f.w_up = b.zeros({S, F, H}, dtype);
      f.w_down = b.zeros({S, H, F}, dtype);
      set->push_back(f);
    }
  }
  loaded_.assign(weights_.size(), std::vector<int32_t>(model.ep_world() * S, -1));
}

const FfnWeights& CommReplicaSlots::slot_weights(int64_t moe_layer) {
  return weights_.at(static_cast<size_t>(moe_layer));
}

FfnWeights& CommReplicaSlots::slot_grads(int64_t moe_layer) {
  return grads_.at(static_cast<size_t>(moe_layer));
}

void CommReplicaSlots::load(const std::vector<LayerPlacement>& plans) {
  const ModelConfig& c = model_.config();
  Backend& b = model_.backend();
  Communicator& comm = *model_.ep_comm();
  const int W = model_.ep_world(), me = model_.ep_rank();
  const int64_t El = c.n_experts / W, S = slots_;
  FM_CHECK(static_cast<int64_t>(plans.size()) == c.n_moe_layers(),
           "replica slots: {} plans for {} MoE layers", plans.size(), c.n_moe_layers());
  for (size_t m = 0; m < plans.size(); ++m) {
    const LayerPlacement& p = plans[m];
    FM_CHECK(p.world_size == W && p.replica_slots == S && static_cast<int>(p.slots.size()) == W,
             "replica slots: the plan of MoE layer {} is for {} ranks x {} slots, these slots "
             "are {} x {}",
             m, p.world_size, p.replica_slots, W, S);
    for (int q = 0; q < W; ++q) {
      FM_CHECK(static_cast<int64_t>(p.slots[q].size()) == S,
               "replica slots: MoE layer {} rank {} has {} slots in the plan, expected {}", m, q,
               p.slots[q].size(), S);
      for (int64_t s = 0; s < S; ++s) {
        const int32_t e = p.slots[q][s];
        FM_CHECK(e >= -1 && e < c.n_experts,
                 "replica slots: MoE layer {} rank {} slot {} holds expert {}, not in [-1, {})", m,
                 q, s, e, c.n_experts);
        loaded_[m][q * S + s] = e;
      }
    }
  }
  // One global order (layer, slot owner, slot): every pair of ranks meets its transfers in
  // the same order, so blocking send/recv cannot deadlock. The home experts are sent as the
  // forward reads them (under bf16 compute the bf16 copy the model keeps, rounded once).
  FM_CHECK(weights_.empty() || weights_[0].w_gate.dtype() == model_.compute_dtype(),
           "replica slots: the slots hold {} weights but the model computes in {} (set the "
           "compute dtype before making the slots)",
           dtype_name(weights_[0].w_gate.dtype()), dtype_name(model_.compute_dtype()));
  const ModelWeights& weights = model_.compute_weights();
  for (size_t m = 0; m < plans.size(); ++m) {
    const FfnWeights& home = weights.layers[c.first_k_dense + m].experts;
    for (int q = 0; q < W; ++q)
      for (int64_t s = 0; s < S; ++s) {
        const int32_t e = loaded_[m][q * S + s];
        if (e < 0) continue;
        const int h = static_cast<int>(e / El);
        const int64_t i = e - h * El;
        const std::vector<const Tensor*> src = parts(home);
        const std::vector<Tensor*> dst = parts(weights_[m]);
        for (size_t t = 0; t < src.size(); ++t) {
          const Tensor from = src[t]->slice(i, i + 1);
          Tensor to = dst[t]->slice(s, s + 1);
          if (me == h && me == q) {
            b.copy(to, from);
          } else if (me == h) {
            b.synchronize();  // the communicator reads device memory once its writes are done
            comm.send(from.raw(), from.numel(), from.dtype(), q, kWeightTag);
          } else if (me == q) {
            b.synchronize();  // ... and overwrites it once its readers are done
            comm.recv(to.raw(), to.numel(), to.dtype(), h, kWeightTag);
          }
        }
      }
    for (Tensor* g : parts(grads_[m])) b.fill(*g, 0.0);
  }
}

void CommReplicaSlots::reduce_grads() {
  const ModelConfig& c = model_.config();
  Backend& b = model_.backend();
  Communicator& comm = *model_.ep_comm();
  const int W = model_.ep_world(), me = model_.ep_rank();
  const int64_t El = c.n_experts / W, S = slots_;
  for (size_t m = 0; m < loaded_.size(); ++m) {
    FfnWeights& home = model_.grads().weights().layers[c.first_k_dense + m].experts;
    for (int q = 0; q < W; ++q)
      for (int64_t s = 0; s < S; ++s) {
        const int32_t e = loaded_[m][q * S + s];
        if (e < 0) continue;
        const int h = static_cast<int>(e / El);
        const int64_t i = e - h * El;
        const std::vector<Tensor*> dst = parts(home), src = parts(grads_[m]);
        for (size_t t = 0; t < src.size(); ++t) {
          Tensor to = dst[t]->slice(i, i + 1);
          const Tensor from = src[t]->slice(s, s + 1);
          if (me == h && me == q) {
            b.axpy(to, 1.0, from);
          } else if (me == q) {
            b.synchronize();
            comm.send(from.raw(), from.numel(), from.dtype(), h, kGradTag);
          } else if (me == h) {
            Tensor got = b.empty(from.shape(), from.dtype());
            b.synchronize();  // `got` may reuse memory a queued op still reads
            comm.recv(got.raw(), got.numel(), got.dtype(), q, kGradTag);
            b.axpy(to, 1.0, got);
          }
        }
      }
    for (Tensor* g : parts(grads_[m])) b.fill(*g, 0.0);
  }
}

}  // namespace fm
