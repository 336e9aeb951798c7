#include "model/config.h"

#include <cmath>

#include "engine/config.h"
#include "engine/error.h"
#include "model/presets.h"

namespace fm {

const char* balance_method_name(BalanceMethod m) {
  switch (m) {
    case BalanceMethod::none:
      return "none";
    case BalanceMethod::switch_aux:
      return "switch_aux";
    case BalanceMethod::global_aux:
      return "global_aux";
    case BalanceMethod::loss_free:
      return "loss_free";
    case BalanceMethod::phi:
      return "phi";
  }
  return "?";
}

RouterBalanceConfig RouterBalanceConfig::from_yaml(const ConfigNode& n) {
  RouterBalanceConfig b;
  const std::string method =
      n.get_choice("method", {"none", "switch_aux", "global_aux", "loss_free", "phi"}, "none");
  for (BalanceMethod m : {BalanceMethod::none, BalanceMethod::switch_aux, BalanceMethod::global_aux,
                          BalanceMethod::loss_free, BalanceMethod::phi})
    if (method == balance_method_name(m)) b.method = m;
  b.alpha = n.get_in_range("alpha", 0.0, 100.0, 1e-2);
  b.bias_rate = n.get_in_range("bias_rate", 0.0, 1.0, 1e-3);
  b.potential = n.get_choice("potential", {"neg_entropy", "l2"}, "neg_entropy") == "l2"
                    ? PhiPotential::l2
                    : PhiPotential::neg_entropy;
  b.eta = n.get_in_range("eta", 0.0, 1.0, 0.65);
  b.eta_weights_new = n.get_choice("eta_weights", {"new", "old"}, "new") == "new";
  return b;
}

ModelConfig ModelConfig::from_yaml(const ConfigNode& n) {
  ModelConfig c;
  c.name = n.get<std::string>("name", "unnamed");
  c.vocab_size = n.get_positive("vocab_size");
  c.hidden = n.get_positive("hidden");
  c.n_layers = n.get_positive("n_layers");
  c.n_heads = n.get_positive("n_heads");
  c.n_kv_heads = n.get_positive("n_kv_heads");
  c.head_dim = n.get_positive("head_dim");
  c.rope_theta = n.get_in_range("rope_theta", 1.0, 1e9, 10000.0);
  c.rms_eps = n.get_in_range("rms_eps", 1e-12, 1e-2, 1e-6);
  c.qk_norm = n.get<bool>("qk_norm", false);
  c.n_experts = n.get_positive("n_experts");
  c.top_k = n.get_positive("top_k");
  c.moe_ffn = n.get_positive("moe_ffn");
  c.n_shared_experts = n.get<int64_t>("n_shared_experts", 0);
  c.shared_ffn = n.get<int64_t>("shared_ffn", 0);
  c.first_k_dense = n.get<int64_t>("first_k_dense", 0);
  c.dense_ffn = n.get<int64_t>("dense_ffn", 0);
  c.norm_topk_prob = n.get<bool>("norm_topk_prob", true);
  c.router_score = n.get_choice("router_score", {"softmax"}, "softmax");
  c.tie_embeddings = n.get<bool>("tie_embeddings", false);
  c.head = n.get_choice("head", {"lm", "value"}, "lm");
  c.max_seq_len = n.get_positive("max_seq_len");
  c.init_std = n.get_in_range("init_std", 1e-6, 1.0, 0.02);
  c.balance = RouterBalanceConfig::from_yaml(n.child_or_empty("router_balance"));

  if (c.n_heads % c.n_kv_heads != 0)
    n.fail("n_kv_heads",
           fmt::format("must divide n_heads ({} % {} != 0)", c.n_heads, c.n_kv_heads));
  if (c.head_dim % 2 != 0)
    n.fail("head_dim", fmt::format("must be even for RoPE (got {})", c.head_dim));
  if (c.top_k > c.n_experts)
    n.fail("top_k", fmt::format("must be <= n_experts ({} > {})", c.top_k, c.n_experts));
  if (c.n_experts > 65536)
    n.fail("n_experts",
           fmt::format("at most 65536 experts fit a uint16 routing trace (got {})", c.n_experts));
  if (c.n_shared_experts < 0) n.fail("n_shared_experts", "must be >= 0");
  if (c.n_shared_experts > 0 && c.shared_ffn <= 0)
    n.fail("shared_ffn", "must be > 0 when n_shared_experts > 0");
  if (c.first_k_dense < 0 || c.first_k_dense > c.n_layers)
    n.fail("first_k_dense",
           fmt::format("must be in [0, n_layers] = [0, {}] (got {}; n_layers makes a dense model)",
                       c.n_layers, c.first_k_dense));
  if (c.value_head() && c.tie_embeddings)
    n.fail("tie_embeddings", "must be false with head: value (a value head has no LM head to tie)");
  if (c.first_k_dense > 0 && c.dense_ffn <= 0)
    n.fail("dense_ffn", "must be > 0 when first_k_dense > 0");
  return c;
}

ModelConfig ModelConfig::load(const std::string& name_or_path) {
  std::string origin;
  const std::string text = resolve_config(name_or_path, &origin);
  const ConfigNode root = ConfigNode::parse(text, origin);
  const ConfigNode node = root.child("model");
  ModelConfig c = from_yaml(node);
  node.finish();
  return c;
}

ModelConfig ModelConfig::from_entry(const ConfigNode& root) {
  // A mapping is the model itself; a string names a preset or a YAML file.
  if (root.is_mapping("model")) return from_yaml(root.child("model"));
  return load(root.get<std::string>("model"));
}

ModelCosts model_costs(const ModelConfig& c, int64_t seq_len) {
  ModelCosts k;
  k.seq_len = seq_len;
  const int64_t H = c.hidden;
  const int64_t attn = H * c.q_dim() * 2 + H * c.kv_dim() * 2 + (c.qk_norm ? 2 * c.head_dim : 0);
  const int64_t norms = 2 * H;
  const int64_t expert = 3 * H * c.moe_ffn;
  const int64_t shared = c.n_shared_experts * 3 * H * c.shared_ffn;
  const int64_t router = c.n_experts * H;
  const int64_t dense = 3 * H * c.dense_ffn;
  const int64_t embed = c.vocab_size * H;
  const int64_t head = c.tie_embeddings || c.value_head() ? 0 : c.vocab_size * H;
  const int64_t value_head = c.value_head() ? H + 1 : 0;  // [1, H] weight + bias
  int64_t total = embed + head + value_head + H;          // + final norm
  // The head matmul runs for every token: LM head (or the tied embedding) or value head.
  int64_t active_matmul = c.value_head() ? H : head > 0 ? head : embed;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    total += attn + norms;
    active_matmul += attn - (c.qk_norm ? 2 * c.head_dim : 0);
    if (c.is_moe_layer(l)) {
      total += router + c.n_experts * expert + shared;
      active_matmul += router + c.top_k * expert + shared;
    } else {
      total += dense;
      active_matmul += dense;
    }
  }
  k.total_params = total;
  k.embedding_params = embed + head;
  k.active_params = total - (c.n_layers - c.first_k_dense) * (c.n_experts - c.top_k) * expert;
  // Causal attention: QK^T and PV each cost 2 * q_dim flops per (query, key) pair; a query at
  // position i sees i + 1 keys, (seq_len + 1) / 2 on average.
  const double attn_flops = static_cast<double>(c.n_layers) * 2.0 * 2.0 *
                            static_cast<double>(c.q_dim()) * (static_cast<double>(seq_len) + 1.0) /
                            2.0;
  k.forward_flops_per_token = 2.0 * static_cast<double>(active_matmul) + attn_flops;
  k.training_flops_per_token = 3.0 * k.forward_flops_per_token;
  return k;
}

DecodeStepBytes decode_step_bytes(const ModelConfig& c, int64_t weight_bytes, int64_t kv_bytes,
                                  const std::vector<int64_t>& context, int64_t distinct_experts) {
  FM_CHECK(weight_bytes > 0 && kv_bytes > 0,
           "decode_step_bytes: bytes per element must be positive (weights {}, kv {})",
           weight_bytes, kv_bytes);
  FM_CHECK(!context.empty(), "decode_step_bytes: no sequences");
  FM_CHECK(distinct_experts >= 0 && distinct_experts <= c.n_moe_layers() * c.n_experts,
           "decode_step_bytes: distinct_experts {} is outside [0, {} MoE layers x {} experts]",
           distinct_experts, c.n_moe_layers(), c.n_experts);
  const int64_t H = c.hidden, B = static_cast<int64_t>(context.size());
  int64_t weights = B * H + H;  // embedding rows, final norm
  weights += c.value_head() ? H + 1 : c.vocab_size * H;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    weights += H * c.q_dim() * 2 + H * c.kv_dim() * 2 + 2 * H + (c.qk_norm ? 2 * c.head_dim : 0);
    weights += c.is_moe_layer(l) ? c.n_experts * H + c.n_shared_experts * 3 * H * c.shared_ffn
                                 : 3 * H * c.dense_ffn;
  }
  int64_t cached = 0;
  for (int64_t len : context) {
    FM_CHECK(len >= 1 && len <= c.max_seq_len,
             "decode_step_bytes: a context of {} tokens is outside [1, max_seq_len {}]", len,
             c.max_seq_len);
    cached += len;
  }
  DecodeStepBytes b;
  b.weights = weight_bytes * weights;
  b.experts = weight_bytes * distinct_experts * 3 * H * c.moe_ffn;
  b.kv_cache = kv_bytes * cached * c.n_layers * 2 * c.kv_dim();
  return b;
}

double expected_distinct_experts(int64_t n_experts, int64_t top_k, int64_t tokens) {
  FM_CHECK(n_experts >= 1 && top_k >= 1 && top_k <= n_experts && tokens >= 0,
           "expected_distinct_experts: need 1 <= top_k ({}) <= n_experts ({}) and tokens ({}) "
           ">= 0",
           top_k, n_experts, tokens);
  const double e = static_cast<double>(n_experts);
  return e * (1.0 - std::pow(1.0 - static_cast<double>(top_k) / e, static_cast<double>(tokens)));
}

}  // namespace fm
