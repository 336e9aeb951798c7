// ModelConfig: the shape of a MoE transformer and its router-level balancing.
// Read from the `model:` mapping of a YAML file in exactly one place
// (ModelConfig::from_yaml), which validates every key.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fm {

class ConfigNode;

// Router-level balancing (see RESEARCH.md):
//   switch_aux  alpha * E * sum_i f_i P_i over the micro-batch (f: top-k assignment fraction)
//   global_aux  the same with f_i from the step's global batch so far (all micro-batches)
//   loss_free   bias b_i added to scores for top-k selection only; after each step
//               b_i += u * sign(mean_load - load_i)
//   phi         m <- EMA of mean soft probabilities, q = grad phi(m), loss alpha * sum q_i p_i
enum class BalanceMethod { none, switch_aux, global_aux, loss_free, phi };
enum class PhiPotential { neg_entropy, l2 };  // q = log m + 1  |  q = m

struct RouterBalanceConfig {
  BalanceMethod method = BalanceMethod::none;
  double alpha = 1e-2;      // switch_aux / global_aux / phi loss weight
  double bias_rate = 1e-3;  // loss_free: u
  PhiPotential potential = PhiPotential::neg_entropy;
  // phi EMA: m <- (1 - eta) * m + eta * p_batch when eta_weights == "new" (the default),
  //          m <- eta * m + (1 - eta) * p_batch when eta_weights == "old".
  double eta = 0.65;
  bool eta_weights_new = true;
  // Reads and validates a `router_balance:` mapping (absent keys: the defaults above).
  static RouterBalanceConfig from_yaml(const ConfigNode& node);
};

struct ModelConfig {
  std::string name = "unnamed";
  int64_t vocab_size = 0;
  int64_t hidden = 0;
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  double rope_theta = 10000.0;
  double rms_eps = 1e-6;
  bool qk_norm = false;
  int64_t n_experts = 0;
  int64_t top_k = 0;
  int64_t moe_ffn = 0;
  int64_t n_shared_experts = 0;
  int64_t shared_ffn = 0;
  int64_t first_k_dense = 0;
  int64_t dense_ffn = 0;
  bool norm_topk_prob = true;
  std::string router_score = "softmax";
  bool tie_embeddings = false;
  // "lm": the LM head (next-token logits). "value": a scalar value head [1, H] + bias
  // (the PPO critic); the trunk is the same.
  std::string head = "lm";
  int64_t max_seq_len = 0;
  double init_std = 0.02;
  RouterBalanceConfig balance;

  bool is_moe_layer(int64_t layer) const { return layer >= first_k_dense; }
  int64_t n_moe_layers() const { return n_layers - first_k_dense; }
  int64_t q_dim() const { return n_heads * head_dim; }
  int64_t kv_dim() const { return n_kv_heads * head_dim; }
  bool value_head() const { return head == "value"; }

  // Reads and validates the mapping `node` (the content under `model:`).
  static ModelConfig from_yaml(const ConfigNode& node);
  // Reads the `model:` mapping of a YAML file or an embedded preset ("tiny"; see
  // model/presets.h); other top-level keys are left to their owners.
  static ModelConfig load(const std::string& name_or_path);
  // The `model:` entry of a run config: a mapping, or a string naming a preset/file.
  static ModelConfig from_entry(const ConfigNode& root);
};

const char* balance_method_name(BalanceMethod m);

// Parameter counts and costs (for `foremoe info` and the benchmarks).
struct ModelCosts {
  int64_t total_params = 0;
  int64_t active_params = 0;            // touched by one token (top-k experts + shared + dense)
  int64_t embedding_params = 0;         // input embedding (+ LM head when untied; a value
                                        // head is not counted here)
  double forward_flops_per_token = 0;   // 2 * active matmul params + attention at seq_len
  double training_flops_per_token = 0;  // 3x forward (backward = 2x)
  int64_t seq_len = 0;
};
ModelCosts model_costs(const ModelConfig& c, int64_t seq_len);

// The device-memory bytes one batched decode step must read at the least: the numerator of
// the decode roofline (step time >= bytes / HBM bandwidth). Each weight the step multiplies
// is read once however many sequences use it: `weights` is every non-routed weight
// (attention, norms, routers, shared experts, dense FFNs, the final norm and the whole LM
// head) plus one embedding row per sequence; `experts` is the routed experts the step's
// tokens choose, each distinct (layer, expert) once; `kv_cache` is every sequence's cached
// keys and values, all layers. Writes (the new token's K and V, the activations) are left
// out: they are small and not reads.
struct DecodeStepBytes {
  int64_t weights = 0, experts = 0, kv_cache = 0;
  int64_t total() const { return weights + experts + kv_cache; }
};
// `weight_bytes` and `kv_bytes`: bytes per weight and per cache element as the step reads
// them (2 for bf16 compute and a bf16 cache); `context`: each sequence's cached tokens the
// new one attends over (itself included); `distinct_experts`: the (MoE layer, routed expert)
// pairs chosen by at least one of the step's tokens, summed over layers. Throws naming the
// argument when one is out of range.
DecodeStepBytes decode_step_bytes(const ModelConfig& c, int64_t weight_bytes, int64_t kv_bytes,
                                  const std::vector<int64_t>& context, int64_t distinct_experts);
// The expected distinct experts of one MoE layer when `tokens` tokens each choose top_k of
// n_experts uniformly at random: E (1 - (1 - k / E)^tokens) (expert e is missed by one token
// with probability 1 - k / E). For rooflines before a run has measured its routing.
double expected_distinct_experts(int64_t n_experts, int64_t top_k, int64_t tokens);

}  // namespace fm
