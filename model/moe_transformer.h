// MoeTransformer: the model — parameters, forward over packed sequences with
// routing record/replay, backward from per-token log-prob gradients (LM head) or
// value gradients (value head, the PPO critic), and the router-balancing state.
// Written once against Backend ops.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "balancer/placement.h"
#include "balancer/routing_trace.h"
#include "engine/backend.h"
#include "model/config.h"
#include "model/expert_parallel.h"
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
  // One placement per MoE layer (balancer/placement.h), checked against this rank's load;
  // null: every token to its expert's home. Under expert parallelism every rank passes the
  // same plans. A single-rank model checks the plans and computes every token on the home
  // experts (the same result).
  const std::vector<LayerPlacement>* placements = nullptr;
  // Rows of the LM head computed at once. Its [rows, V] logits are the largest activation
  // of a long batch (16k tokens x 152k vocabulary is 10 GB in f32), so the forward keeps
  // only each token's log-prob, entropy and log-sum-exp and the backward recomputes the
  // logits one chunk at a time. kLmHeadAuto: the whole batch when its logits fit in
  // kLmHeadChunkBytes, else chunks that do; kLmHeadWhole: always the whole batch (logits()
  // then works after any forward); > 0: at most this many rows per chunk.
  int64_t lm_head_rows = 0;
};

inline constexpr int64_t kLmHeadAuto = 0;
inline constexpr int64_t kLmHeadWhole = -1;
inline constexpr int64_t kLmHeadChunkBytes = int64_t{256} << 20;
// Rows per LM-head chunk for a forward of N tokens over a vocabulary of V in `dtype` when
// ForwardOptions::lm_head_rows is `requested`; throws for requested < kLmHeadWhole.
int64_t lm_head_rows_for(int64_t requested, int64_t N, int64_t V, DType dtype);

struct LayerRouterStats {
  // [E] assignments of this forward (all ranks' tokens under expert parallelism)
  std::vector<int64_t> load;
  double max_vio = 0.0;  // (max load - mean) / mean
  double balance_loss = 0.0;
};

struct ForwardResult {
  std::vector<double> logp;     // [N] log p(targets[n]); 0 where targets[n] < 0
  std::vector<double> entropy;  // [N] entropy of the next-token distribution
  // [N] v[n] = w . final_norm(x[n]) + b for a value model (head: value), whose logp and
  // entropy are zeros; empty for an LM.
  std::vector<double> values;
  double balance_loss = 0.0;             // sum over MoE layers (global under EP: count once)
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
  // Device routing with deferred routes (forward_cached's defer_routes): every MoE layer's ids
  // [n_moe, N, K] on the backend until finish_cached moves them into `routes`.
  Tensor pending_ids;
};

class MoeTransformer {
 public:
  // dtype f32 is the model; f64 exists for finite-difference checks on the CPU.
  // `ep` spreads the routed experts over the ranks of a communicator (expert_parallel.h).
  MoeTransformer(ModelConfig config, Backend& backend, DType dtype = DType::f32,
                 ExpertParallel ep = {});
  ~MoeTransformer();

  const ModelConfig& config() const { return config_; }
  Backend& backend() { return backend_; }
  // The parameters' dtype: gradients, optimizer state and checkpoints have it too.
  DType dtype() const { return dtype_; }

  // Mixed precision. With bf16, forward and backward compute from a bf16 copy of the f32
  // parameters (the master weights), refreshed whenever ParamArena::version changes;
  // gradients, AdamW and checkpoints stay f32. Activations and the KV cache are bf16; the
  // router (logits, probabilities, gates), the norms' statistics and the LM head's
  // log-probs, entropies and sampling logits stay f32. Backends give bf16 ops f32
  // arithmetic (engine/mixed_precision.h). f32 (the default) computes in the parameters'
  // dtype. bf16 needs f32 parameters; it runs on any number of expert-parallel ranks (the
  // token exchange moves bf16 rows) and with replica slots (bf16 slots hold the master weights
  // rounded to bf16, as the home experts' compute copy; f32 slots are rounded for compute).
  void set_compute_dtype(DType dtype);
  DType compute_dtype() const { return act_; }
  // The weights forward and backward read: the parameters, or their bf16 copy (refreshed
  // here when the parameters changed; replica slots are filled from it).
  const ModelWeights& compute_weights();

  // Normal(0, init_std) matrices (residual outputs scaled by 1/sqrt(2 n_layers)), unit norms.
  // Under expert parallelism every rank gets exactly its slice of the single-rank model of
  // the same seed (each expert tensor is drawn whole on the host, then sliced).
  void init_weights(uint64_t seed);

  // Expert parallelism (expert_parallel.h); ep_world() == 1 without.
  int ep_world() const { return ep_world_; }
  int ep_rank() const { return ep_rank_; }
  Communicator* ep_comm() const { return comm_; }
  // The replica slots' weights and gradients for plans with replica shares (null: none).
  // Must outlive every forward/backward that uses them.
  void set_replica_weights(ReplicaWeights* replicas) { replicas_ = replicas; }
  // Collective under EP: sums the replicated parameters' gradients over the ranks (one
  // all-reduce); expert gradients stay (each rank already holds its experts' full
  // gradient). No-op on a single rank. Call after the backward passes of a step.
  void all_reduce_grads();
  // The global L2 norm of the gradient (collective under EP, after all_reduce_grads): the
  // replicated part once plus every rank's experts. For AdamW::step(grads, norm).
  double grad_norm();

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
  // Under EP: the mean over all ranks' targets, the same loss on every rank.
  double lm_loss_and_backward(const Batch& batch, const ForwardOptions& options,
                              double scale = 1.0);

  // Incremental forward for generation: writes the tokens' keys/values into `cache`,
  // returns the wanted logits and every token's routing (LM models only). Routing is recorded
  // (top-k with the current selection bias); no activations are kept and no balancing state
  // changes. Under expert parallelism it is collective: every rank calls it for the same step
  // with its own tokens (at least one; generate() feeds an idle rank a throw-away token) and
  // each MoE layer sends every token to its expert's home rank (the null plan). A bad input
  // on one rank makes every rank throw at the first MoE layer, none waits.
  // defer_routes: return without waiting for the device; out.routes is filled (and errors the
  // device found are raised) by finish_cached, which the caller must call before reading
  // them - generation samples first, so one wait covers the step and the sampling.
  void forward_cached(const CachedInput& input, KvCache& cache, CachedOutput& out,
                      bool defer_routes = false);
  void finish_cached(CachedOutput& out);
  // Where forward_cached routes its tokens on a single rank. host: each MoE layer downloads
  // its top-k ids and permutes them on the host (a device synchronisation per layer), then
  // runs the grouped GEMMs of the backend's library (cuBLAS on CUDA). device: the ids stay
  // where they are (Backend::sort_assignments, grouped_matmul_device), and all layers' ids
  // come back in one download after the last layer (one synchronisation per call).
  // automatic (the default): device when the call's assignments average at most
  // kDeviceRoutedRowsPerExpert rows per expert (decode steps: the small groups the device
  // path's GEMM is for), host otherwise (prefill, whose big groups want the library's GEMM
  // and whose one synchronisation per layer is paid once per sequence). Both choose the
  // same experts; under expert parallelism routing is always on the host (the token
  // exchange needs the counts there).
  enum class CachedRouting { automatic, host, device };
  static constexpr int64_t kDeviceRoutedRowsPerExpert = 64;
  void set_cached_routing(CachedRouting routing) { cached_routing_ = routing; }
  CachedRouting cached_routing() const { return cached_routing_; }

  // The result of the last forward (also after lm_loss_and_backward).
  const ForwardResult& forward_result() const { return result_; }
  // The LM-head logits [N, V] of the last forward (on the backend; LM models only). Kept
  // only when that forward computed the head in one chunk (ForwardOptions::lm_head_rows).
  const Tensor& logits() const;
  // Rows per LM-head chunk of the last forward (N when it was one chunk).
  int64_t lm_head_chunk_rows() const;

  void zero_grad();
  ParamArena& params() { return *params_; }
  ParamArena& grads() { return *grads_; }
  std::vector<LayerBalanceState>& balance_state() { return balance_; }
  // Apply the per-step router-balancing updates (call once after each optimizer step).
  void end_balance_step();

 private:
  friend class MoeLayer;  // model/moe_layer.h: one MoE layer on this class's parameters
  struct Activations;
  // Checks that a forward ran and its batch has N == `n` entries for `what`.
  void check_backward(const char* what, size_t n) const;
  // Backpropagates dxf (the gradient at the final norm's output) through the trunk.
  void backward_trunk(const Tensor& dxf, double balance_scale);
  DType stat_dtype() const { return act_ == DType::bf16 ? DType::f32 : act_; }
  ModelConfig config_;
  Backend& backend_;
  DType dtype_, act_;                    // parameters; activations
  std::unique_ptr<ParamArena> compute_;  // the bf16 copy of params_ (mixed precision)
  uint64_t compute_version_ = 0;
  Communicator* comm_ = nullptr;  // set when ep_world_ > 1
  int ep_world_ = 1, ep_rank_ = 0;
  CachedRouting cached_routing_ = CachedRouting::automatic;
  ReplicaWeights* replicas_ = nullptr;
  std::unique_ptr<ParamArena> params_, grads_;
  std::vector<LayerBalanceState> balance_;
  std::unique_ptr<Activations> acts_;
  ForwardResult result_;
};

// Checks a batch against the model config; the message names the problem.
void validate_batch(const ModelConfig& c, const Batch& batch);

}  // namespace fm
