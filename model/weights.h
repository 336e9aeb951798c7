// ModelWeights: named views of every parameter of the MoE transformer, laid
// out in one flat arena (so the optimizer, the grad norm and checkpoints see
// one buffer). The same layout serves parameters and their gradients.
//
// Under expert parallelism over W ranks (model/expert_parallel.h) a rank's arena holds
// its E/W home experts only (expert tensors [E/W, ...]) and puts every expert tensor after
// the replicated ones, so the data-parallel gradient all-reduce is one contiguous range.
#pragma once

#include <string>
#include <vector>

#include "engine/backend.h"
#include "model/config.h"

namespace fm {

struct FfnWeights {
  Tensor w_gate;  // dense [F, H] | experts [E, F, H]
  Tensor w_up;    // dense [F, H] | experts [E, F, H]
  Tensor w_down;  // dense [H, F] | experts [E, H, F]
};

struct LayerWeights {
  Tensor attn_norm;    // [H]
  Tensor wq;           // [Hq * D, H]
  Tensor wk;           // [Hkv * D, H]
  Tensor wv;           // [Hkv * D, H]
  Tensor wo;           // [H, Hq * D]
  Tensor q_norm;       // [D] (qk_norm only)
  Tensor k_norm;       // [D] (qk_norm only)
  Tensor ffn_norm;     // [H]
  Tensor router;       // [E, H] (MoE layers)
  FfnWeights experts;  // MoE layers
  FfnWeights shared;   // MoE layers with shared experts: F = n_shared * shared_ffn
  FfnWeights dense;    // the first first_k_dense layers
};

struct ModelWeights {
  Tensor embed;            // [V, H]
  Tensor final_norm;       // [H]
  Tensor lm_head;          // [V, H]; a view of embed when tie_embeddings; absent for head: value
  Tensor value_head;       // [1, H] (head: value)
  Tensor value_head_bias;  // [1]    (head: value)
  std::vector<LayerWeights> layers;
};

enum class ParamInit { normal, normal_residual, ones, zeros };

struct ParamSlot {
  std::string name;  // Hugging Face style, e.g. "model.layers.0.mlp.experts.gate_proj"
  Shape shape;
  ParamInit init;
  bool weight_decay;  // matrices decay, norms do not
  Tensor* slot;
  // A routed-expert tensor [E, ...]: sharded over the ranks under expert parallelism.
  bool expert = false;
};

// Every parameter of `c`, bound to the fields of `w`, in arena order. With expert_shards
// W > 1 the expert tensors have E/W experts and come after all the others.
std::vector<ParamSlot> param_slots(const ModelConfig& c, ModelWeights& w,
                                   int64_t expert_shards = 1);

// A flat arena holding one ModelWeights on a backend (a rank's shard when expert_shards > 1).
class ParamArena {
 public:
  ParamArena(const ModelConfig& c, Backend& backend, DType dtype, int64_t expert_shards = 1);
  ParamArena(const ParamArena&) = delete;
  ParamArena& operator=(const ParamArena&) = delete;

  ModelWeights& weights() { return weights_; }
  const ModelWeights& weights() const { return weights_; }
  Tensor& flat() { return flat_; }  // [numel]
  const Tensor& flat() const { return flat_; }
  const std::vector<ParamSlot>& slots() const { return slots_; }
  const ParamSlot& slot(const std::string& name) const;  // throws naming the parameter
  int64_t expert_shards() const { return expert_shards_; }
  // Elements [0, replicated_numel()) of flat() are the parameters every rank holds whole;
  // with expert_shards > 1 the rest are this rank's experts.
  int64_t replicated_numel() const { return replicated_numel_; }
  // Counts writes to the values: whoever changes them (the optimizer step, a checkpoint load,
  // init_weights, or code writing flat() directly) calls touch(), so that copies made from
  // them (a model's bf16 compute weights) know to refresh.
  uint64_t version() const { return version_; }
  void touch() { ++version_; }

 private:
  ModelWeights weights_;
  std::vector<ParamSlot> slots_;
  Tensor flat_;
  int64_t expert_shards_ = 1, replicated_numel_ = 0;
  uint64_t version_ = 0;
};

}  // namespace fm
