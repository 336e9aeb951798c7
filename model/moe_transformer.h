// MoeTransformer: the model — parameters, forward over packed sequences with
// routing record/replay, backward from per-token log-prob gradients (LM head) or
// value gradients (value head, the PPO critic), and the router-balancing state.
// Written once against Backend ops.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "balancer/routing_trace.h"
#include "engine/backend.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/router_balance.h"
#include "model/weights.h"

namespace fm {

// Packed sequences: sequence s is tokens[seq_offsets[s] .. seq_offsets[s+1]).
// targets[n] is the token whose log-prob is reported at position n (usually
// tokens[n + 1]); -1 means none.
struct Batch {
  std::vector<int32_t> tokens;
  std::vector<int32_t> targets;
  std::vector<int64_t> seq_offsets;
  int64_t size() const { return static_cast<int64_t>(tokens.size()); }
};

struct ForwardOptions {
  // Replay these logical expert ids instead of choosing top-k (same tokens, all MoE layers).
  const RoutingTrace* replay = nullptr;
  // Training forwards add their router statistics to the step accumulators
  // (loss_free / phi / global_aux state); evaluation forwards leave state alone.
  bool training = true;
};

struct LayerRouterStats {
  std::vector<int64_t> load;  // [E] assignments of this forward
  double max_vio = 0.0;       // (max load - mean) / mean
  double balance_loss = 0.0;
};

struct ForwardResult {
  std::vector<double> logp;     // [N] log p(targets[n]); 0 where targets[n] < 0
  std::vector<double> entropy;  // [N] entropy of the next-token distribution
  // [N] v[n] = w . final_norm(x[n]) + b for a value model (head: value), whose logp and
  // entropy are zeros; empty for an LM.
  std::vector<double> values;
  double balance_loss = 0.0;             // sum over MoE layers
  RoutingTrace routes;                   // the logical ids used (recorded or replayed)
  std::vector<LayerRouterStats> router;  // per MoE layer
};

// New tokens of sequences held in KV-cache slots (prefill and decode alike): token n
// sits at position pos[n] of slot slot[n]; a sequence's earlier positions are already in
// the cache or come earlier in this input.
struct CachedInput {
  std::vector<int32_t> tokens;      // [N]
  std::vector<int32_t> slot;        // [N]
  std::vector<int32_t> pos;         // [N]
  std::vector<int32_t> logit_rows;  // the n whose next-token logits are wanted
};

struct CachedOutput {
  Tensor logits;                 // [logit_rows, V] on the backend
  std::vector<uint16_t> routes;  // [N, n_moe_layers, top_k] logical expert ids chosen
};

class MoeTransformer {
 public:
  // dtype f32 is the model; f64 exists for finite-difference checks on the CPU.
  MoeTransformer(ModelConfig config, Backend& backend, DType dtype = DType::f32);
  ~MoeTransformer();

  const ModelConfig& config() const { return config_; }
  Backend& backend() { return backend_; }
  DType dtype() const { return dtype_; }

  // Normal(0, init_std) matrices (residual outputs scaled by 1/sqrt(2 n_layers)), unit norms.
  void init_weights(uint64_t seed);

  const ForwardResult& forward(const Batch& batch, const ForwardOptions& options = {});
  // Backpropagates sum_n dlogp[n] * logp[n] + dentropy[n] * entropy[n]
  // + balance_scale * balance_loss through the last forward; gradients accumulate.
  // LM models only.
  void backward(const std::vector<double>& dlogp, const std::vector<double>& dentropy,
                double balance_scale);
  // Value models only: backpropagates sum_n dvalues[n] * values[n]
  // + balance_scale * balance_loss through the last forward; gradients accumulate.
  void backward_values(const std::vector<double>& dvalues, double balance_scale);
  // Token-mean next-token cross entropy of the targets (+ balance loss) and its
  // gradient times `scale` (for micro-batch accumulation). Returns the unscaled loss.
  double lm_loss_and_backward(const Batch& batch, const ForwardOptions& options,
                              double scale = 1.0);

  // Incremental forward for generation: writes the tokens' keys/values into `cache`,
  // returns the wanted logits and every token's routing (LM models only). Routing is recorded
  // (top-k with the current selection bias); no activations are kept and no balancing state
  // changes.
  void forward_cached(const CachedInput& input, KvCache& cache, CachedOutput& out);

  // The result of the last forward (also after lm_loss_and_backward).
  const ForwardResult& forward_result() const { return result_; }
  // The LM-head logits [N, V] of the last forward (on the backend; LM models only).
  const Tensor& logits() const;

  void zero_grad();
  ParamArena& params() { return *params_; }
  ParamArena& grads() { return *grads_; }
  std::vector<LayerBalanceState>& balance_state() { return balance_; }
  // Apply the per-step router-balancing updates (call once after each optimizer step).
  void end_balance_step();

 private:
  struct Activations;
  // Checks that a forward ran and its batch has N == `n` entries for `what`.
  void check_backward(const char* what, size_t n) const;
  // Backpropagates dxf (the gradient at the final norm's output) through the trunk.
  void backward_trunk(const Tensor& dxf, double balance_scale);
  ModelConfig config_;
  Backend& backend_;
  DType dtype_;
  std::unique_ptr<ParamArena> params_, grads_;
  std::vector<LayerBalanceState> balance_;
  std::unique_ptr<Activations> acts_;
  ForwardResult result_;
};

// Checks a batch against the model config; the message names the problem.
void validate_batch(const ModelConfig& c, const Batch& batch);

}  // namespace fm
