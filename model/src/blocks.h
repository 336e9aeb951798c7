// The transformer's blocks (attention, dense SwiGLU FFN, MoE FFN) as
// forward/backward pairs over Backend ops. Private to fm_model.
#pragma once

#include <string>
#include <vector>

#include "balancer/placement.h"
#include "engine/backend.h"
#include "engine/comm.h"
#include "model/config.h"
#include "model/expert_parallel.h"
#include "model/router_balance.h"
#include "model/weights.h"

namespace fm::blocks {

// The dtype of statistics and routing tensors (norms' rstd, attention's lse, the router)
// next to activations of `data`: f32 for bf16 activations (mixed precision), else `data`.
inline DType stat_dtype(DType data) {
  return data == DType::bf16 ? DType::f32 : data;
}

// y[N, O] = x[N, I] @ w[O, I]^T
void linear_forward(Backend& b, Tensor& y, const Tensor& x, const Tensor& w);
// dw += dy^T x;  dx = dy @ w + dx_beta * dx  (dx may be null)
void linear_backward(Backend& b, Tensor* dx, double dx_beta, Tensor& dw, const Tensor& dy,
                     const Tensor& x, const Tensor& w);

// --- attention: x_mid = x + Wo · attention(rope(norm_qk(Wq xn)), rope(norm_qk(Wk xn)), Wv xn) ---
struct AttentionActs {
  Tensor x;  // block input [N, H]
  Tensor xn, rstd;
  Tensor q_pre, k_pre, q_rstd, k_rstd;  // qk_norm only: projections before the head norm
  Tensor q, k, v;                       // after norm + RoPE: [N, Hq, D], [N, Hkv, D]
  Tensor att, lse;                      // [N, Hq, D], [N, Hq]
};
// Fills a.x, a.xn, a.rstd, a.q, a.k, a.v (normed, projected, q/k-normed, rotated) and
// allocates a.att.
void attention_qkv(Backend& b, const ModelConfig& c, const LayerWeights& w, AttentionActs& a,
                   const Tensor& x, const Tensor& pos);
// Writes x_mid = x + attention output.
void attention_forward(Backend& b, const ModelConfig& c, const LayerWeights& w, AttentionActs& a,
                       Tensor& x_mid, const Tensor& x, const Tensor& pos, const Tensor& seq_off);
// The same block for new tokens against a KV cache (k_cache/v_cache [S, T, Hkv, D]): writes
// the tokens' k/v at cache_rows (slot * T + pos), then attends to positions 0..pos of the slot.
// Forward only (generation); a.lse is not filled.
void attention_cached_forward(Backend& b, const ModelConfig& c, const LayerWeights& w,
                              AttentionActs& a, Tensor& x_mid, const Tensor& x, const Tensor& pos,
                              Tensor& k_cache, Tensor& v_cache, const Tensor& slot,
                              const Tensor& cache_rows);
// dx = dx_mid + d(attention path)/dx; weight grads accumulate into g.
void attention_backward(Backend& b, const ModelConfig& c, const LayerWeights& w, LayerWeights& g,
                        const AttentionActs& a, Tensor& dx, const Tensor& dx_mid, const Tensor& pos,
                        const Tensor& seq_off);

// --- SwiGLU FFN: y = Wd (silu(Wg x) * (Wu x)) ---
struct FfnActs {
  Tensor gate, up, h;  // [N, F]
};
void ffn_forward(Backend& b, const FfnWeights& w, FfnActs& a, Tensor& y, const Tensor& x);
// dx = dy-path gradient * dx_beta-accumulated (dx = d + dx_beta * dx); grads into g.
void ffn_backward(Backend& b, const FfnWeights& w, FfnWeights& g, const FfnActs& a, Tensor& dx,
                  double dx_beta, const Tensor& dy, const Tensor& x);

// --- routed experts: y_g = Wd_g (silu(Wg_g x_g) * (Wu_g x_g)) over row groups ---
// Rows [offsets[g], offsets[g+1]) of x belong to expert (or group) g of the weights.
struct ExpertRows {
  std::vector<int64_t> offsets;  // [G + 1]
  // The same offsets as an i32 [G + 1] tensor on the backend, for the forward of a layer
  // routed on the device (moe_forward_device_routed: `offsets` stays empty there).
  Tensor device_offsets;
  Tensor x, gate, up, h;  // [rows, H], [rows, F] x3 (saved for backward)
};
// Writes y [rows, H]; r.x must be set.
void experts_forward(Backend& b, const FfnWeights& w, ExpertRows& r, Tensor& y);
// Writes dx [rows, H] from dy [rows, H]; weight grads accumulate into g.
void experts_backward(Backend& b, const FfnWeights& w, FfnWeights& g, const ExpertRows& r,
                      const Tensor& dy, Tensor& dx);

// --- MoE FFN: y = sum_k gate_k · Expert_{id_k}(x) (+ shared experts) ---
// Expert parallelism: where this rank's rows went and the rows it computed for others.
struct MoeDispatch {
  Communicator* comm = nullptr;               // null: single rank
  std::vector<int64_t> send_rows, recv_rows;  // [W] rows to / received from each rank
  // The received rows [R, H] arrive by source rank; the experts take them by group (home
  // experts, then replica slots), by source within a group: grouped row i is received row
  // regroup[i], and received row j is grouped row ungroup[j].
  Tensor regroup, ungroup;
  int64_t home_rows = 0;                     // grouped rows [0, home_rows) go to the home experts
  ExpertRows slots;                          // grouped rows [home_rows, R): replica slots
  const FfnWeights* slot_weights = nullptr;  // [S, ...] (null when no slot has rows)
  FfnWeights* slot_grads = nullptr;
  // The slots' weights in the compute dtype when the slots hold another (bf16 compute: the
  // f32 slots rounded once, the same bits as the home experts' bf16 compute copy); undefined
  // when the slots are used as they are. compute_slot_weights picks.
  FfnWeights slot_compute;
};
inline const FfnWeights& compute_slot_weights(const MoeDispatch& d) {
  return d.slot_compute.w_gate.defined() ? d.slot_compute : *d.slot_weights;
}
struct MoeActs {
  Tensor probs;                   // [N, E] softmax of router logits
  Tensor ids;                     // [N, K] i32 selected (or replayed) logical expert ids
  Tensor p_sel;                   // [N, K] probs at ids
  Tensor gates;                   // [N, K] p_sel, renormalised when norm_topk_prob
  std::vector<int32_t> host_ids;  // [N * K]
  // This rank's N * K assignments in permuted order: grouped by expert (single rank), or by
  // destination rank and group there (expert parallel); stable in assignment order.
  Tensor perm_token;   // [N * K] i32 token of permuted row m
  Tensor perm_assign;  // [N * K] i32 flat (n * K + k) of permuted row m
  Tensor perm_gate;    // [N * K, 1] gate weight of permuted row m
  Tensor yp;           // [N * K, H] expert output of permuted row m
  ExpertRows experts;  // rows computed here on the (home) experts
  MoeDispatch ep;
  FfnActs shared;
  // Router statistics over the whole batch (all ranks' tokens under expert parallelism).
  std::vector<int64_t> load;     // [E] assignments
  std::vector<double> prob_sum;  // [E]
  int64_t tokens = 0;
  BalanceTerm balance;
};
// Routing: ids from `replay_ids` (host [N * K]) when given, else top-k of probs + selection bias.
// `router_stats`: the router statistics of the balance term (a.prob_sum, a.tokens, a.balance; a
// download of the probability column sums). Generation, which has no balance loss, passes
// false and saves the layer that download (a device synchronisation per layer and step).
void moe_forward(Backend& b, const ModelConfig& c, const LayerWeights& w,
                 const LayerBalanceState& state, const std::vector<int32_t>* replay_ids, MoeActs& a,
                 Tensor& y, const Tensor& x, bool router_stats = true);
// The same forward (top-k selection, no replay, no router statistics) with the routing kept
// where the ids are: the expert permutation by Backend::sort_assignments and the expert GEMMs
// by grouped_matmul_device, so on a device backend the layer never waits for the host.
// a.host_ids stays empty (a.ids holds the choices); a.load is not filled; no backward. The
// KV-cached forward runs decode steps with it.
void moe_forward_device_routed(Backend& b, const ModelConfig& c, const LayerWeights& w,
                               const LayerBalanceState& state, MoeActs& a, Tensor& y,
                               const Tensor& x);
void moe_backward(Backend& b, const ModelConfig& c, const LayerWeights& w, LayerWeights& g,
                  const MoeActs& a, Tensor& dx, const Tensor& dy, const Tensor& x,
                  double balance_scale);

// The pieces both MoE layers share (moe_block.cpp).
// Counting sort of the N * K assignments by key[j] in [0, n_keys) (the expert, or the
// destination and group), stable in assignment order, so the permuted layout (and every sum
// over it) is deterministic. Fills a.perm_token and a.perm_assign; returns the row offsets
// of the keys [n_keys + 1].
std::vector<int64_t> permute_assignments(Backend& b, const std::vector<int32_t>& key,
                                         int64_t n_keys, int64_t K, MoeActs& a);
// Router and selection: fills a.probs, a.ids, a.host_ids (unless !download_ids: top-k ids
// stay on the backend), a.p_sel, a.gates.
void moe_route(Backend& b, const ModelConfig& c, const LayerWeights& w,
               const LayerBalanceState& state, const std::vector<int32_t>* replay_ids, MoeActs& a,
               const Tensor& x, bool download_ids = true);
// y = shared experts(x) (or 0) + sum over permuted rows m of perm_gate[m] * yp[m] at token m.
void moe_combine(Backend& b, const ModelConfig& c, const LayerWeights& w, MoeActs& a, Tensor& y,
                 const Tensor& x);
// Combine backward: dperm_gate [NK] = <dy[token], yp>, dyp [NK, H] = perm_gate * dy[token].
void moe_combine_backward(Backend& b, const MoeActs& a, const Tensor& dy, Tensor& dperm_gate,
                          Tensor& dyp);
// dx = shared-expert path (or 0) + scatter of dxp [NK, H] to the tokens, then the router
// backward (gates -> probs (+ balancing) -> logits) from dperm_gate; router grads into g.
void moe_input_backward(Backend& b, const ModelConfig& c, const LayerWeights& w, LayerWeights& g,
                        const MoeActs& a, const Tensor& dperm_gate, const Tensor& dxp, Tensor& dx,
                        const Tensor& dy, const Tensor& x, double balance_scale);

// The expert-parallel MoE layer (moe_dispatch.cpp): the same math over W ranks, each with
// its own tokens and its E/W home experts, executing `plan` (null: every token to its
// expert's home). Collective: every rank of `comm` calls it for the same layer. A problem
// with this rank's part of the plan (or `caller_error`, when not empty) is reported on
// every rank after the counts exchange, so no rank waits for one that gave up.
struct MoeParallelLayer {
  Communicator* comm = nullptr;
  int64_t moe_layer = 0;
  const LayerPlacement* plan = nullptr;
  ReplicaWeights* replicas = nullptr;
  std::string caller_error;
};
// `router_stats` as for moe_forward (false: no statistics and no all-reduce of them; every rank
// must pass the same).
void moe_parallel_forward(Backend& b, const ModelConfig& c, const LayerWeights& w,
                          const LayerBalanceState& state, const std::vector<int32_t>* replay_ids,
                          const MoeParallelLayer& p, MoeActs& a, Tensor& y, const Tensor& x,
                          bool router_stats = true);
void moe_parallel_backward(Backend& b, const ModelConfig& c, const LayerWeights& w, LayerWeights& g,
                           const MoeActs& a, Tensor& dx, const Tensor& dy, const Tensor& x,
                           double balance_scale);

}  // namespace fm::blocks
