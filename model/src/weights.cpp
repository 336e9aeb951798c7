#include "model/weights.h"

#include <algorithm>

#include "engine/error.h"

namespace fm {

// groups > 0: routed experts [groups, ...]; 0: one dense FFN.
static void add_ffn(std::vector<ParamSlot>& out, const std::string& prefix, FfnWeights& f,
                    int64_t groups, int64_t F, int64_t H) {
  auto shape = [groups](Shape s) {
    if (groups > 0) s.insert(s.begin(), groups);
    return s;
  };
  const std::string suffix = groups > 0 ? "" : ".weight";
  const bool expert = groups > 0;
  out.push_back(
      {prefix + "gate_proj" + suffix, shape({F, H}), ParamInit::normal, true, &f.w_gate, expert});
  out.push_back(
      {prefix + "up_proj" + suffix, shape({F, H}), ParamInit::normal, true, &f.w_up, expert});
  out.push_back({prefix + "down_proj" + suffix, shape({H, F}), ParamInit::normal_residual, true,
                 &f.w_down, expert});
}

std::vector<ParamSlot> param_slots(const ModelConfig& c, ModelWeights& w, int64_t expert_shards) {
  FM_CHECK(expert_shards >= 1 && c.n_experts % expert_shards == 0,
           "expert parallelism: {} experts cannot be split evenly over {} ranks", c.n_experts,
           expert_shards);
  const int64_t H = c.hidden;
  std::vector<ParamSlot> s;
  w.layers.assign(static_cast<size_t>(c.n_layers), LayerWeights{});
  s.push_back({"model.embed_tokens.weight", {c.vocab_size, H}, ParamInit::normal, true, &w.embed});
  for (int64_t l = 0; l < c.n_layers; ++l) {
    LayerWeights& L = w.layers[static_cast<size_t>(l)];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    s.push_back({p + "input_layernorm.weight", {H}, ParamInit::ones, false, &L.attn_norm});
    s.push_back({p + "self_attn.q_proj.weight", {c.q_dim(), H}, ParamInit::normal, true, &L.wq});
    s.push_back({p + "self_attn.k_proj.weight", {c.kv_dim(), H}, ParamInit::normal, true, &L.wk});
    s.push_back({p + "self_attn.v_proj.weight", {c.kv_dim(), H}, ParamInit::normal, true, &L.wv});
    s.push_back(
        {p + "self_attn.o_proj.weight", {H, c.q_dim()}, ParamInit::normal_residual, true, &L.wo});
    if (c.qk_norm) {
      s.push_back({p + "self_attn.q_norm.weight", {c.head_dim}, ParamInit::ones, false, &L.q_norm});
      s.push_back({p + "self_attn.k_norm.weight", {c.head_dim}, ParamInit::ones, false, &L.k_norm});
    }
    s.push_back({p + "post_attention_layernorm.weight", {H}, ParamInit::ones, false, &L.ffn_norm});
    if (c.is_moe_layer(l)) {
      s.push_back({p + "mlp.gate.weight", {c.n_experts, H}, ParamInit::normal, true, &L.router});
      add_ffn(s, p + "mlp.experts.", L.experts, c.n_experts / expert_shards, c.moe_ffn, H);
      if (c.n_shared_experts > 0)
        add_ffn(s, p + "mlp.shared_expert.", L.shared, 0, c.n_shared_experts * c.shared_ffn, H);
    } else {
      add_ffn(s, p + "mlp.", L.dense, 0, c.dense_ffn, H);
    }
  }
  s.push_back({"model.norm.weight", {H}, ParamInit::ones, false, &w.final_norm});
  if (c.value_head()) {
    s.push_back({"value_head.weight", {1, H}, ParamInit::normal, true, &w.value_head});
    s.push_back({"value_head.bias", {1}, ParamInit::zeros, false, &w.value_head_bias});
  } else if (!c.tie_embeddings) {
    s.push_back({"lm_head.weight", {c.vocab_size, H}, ParamInit::normal, true, &w.lm_head});
  }
  if (expert_shards > 1)
    std::stable_partition(s.begin(), s.end(), [](const ParamSlot& p) { return !p.expert; });
  return s;
}

ParamArena::ParamArena(const ModelConfig& c, Backend& backend, DType dtype, int64_t expert_shards)
    : expert_shards_(expert_shards) {
  slots_ = param_slots(c, weights_, expert_shards);
  int64_t total = 0;
  for (const ParamSlot& p : slots_) {
    total += shape_numel(p.shape);
    if (!p.expert || expert_shards == 1) replicated_numel_ = total;
  }
  flat_ = backend.zeros({total}, dtype);
  int64_t offset = 0;
  for (ParamSlot& p : slots_) {
    const int64_t n = shape_numel(p.shape);
    *p.slot = flat_.slice(offset, offset + n).reshape(p.shape);
    offset += n;
  }
  if (c.tie_embeddings && !c.value_head()) weights_.lm_head = weights_.embed;
}

const ParamSlot& ParamArena::slot(const std::string& name) const {
  for (const ParamSlot& p : slots_)
    if (p.name == name) return p;
  throw Error(fmt::format("no parameter named '{}' in this model", name));
}

}  // namespace fm
