// The transformer's blocks (attention, dense SwiGLU FFN, MoE FFN) as
// forward/backward pairs over Backend ops. Private to fm_model.
#pragma once

#include <vector>

#include "engine/backend.h"
#include "model/config.h"
#include "model/router_balance.h"
#include "model/weights.h"

namespace fm::blocks {

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

// --- MoE FFN: y = sum_k gate_k · Expert_{id_k}(x) (+ shared experts) ---
struct MoeActs {
  Tensor probs;                   // [N, E] softmax of router logits
  Tensor ids;                     // [N, K] i32 selected (or replayed) logical expert ids
  Tensor p_sel;                   // [N, K] probs at ids
  Tensor gates;                   // [N, K] p_sel, renormalised when norm_topk_prob
  std::vector<int32_t> host_ids;  // [N * K]
  std::vector<int64_t> offsets;   // [E + 1] rows of each expert in the permuted order
  Tensor perm_token;              // [N * K] i32 token of permuted row m
  Tensor perm_assign;             // [N * K] i32 flat (n * K + k) of permuted row m
  Tensor perm_gate;               // [N * K, 1] gate weight of permuted row m
  Tensor xp, gate, up, h, yp;     // permuted rows: [NK, H], [NK, F] x3, [NK, H]
  FfnActs shared;
  std::vector<int64_t> load;     // [E] assignments in this forward
  std::vector<double> prob_sum;  // [E]
  BalanceTerm balance;
};
// Routing: ids from `replay_ids` (host [N * K]) when given, else top-k of probs + selection bias.
void moe_forward(Backend& b, const ModelConfig& c, const LayerWeights& w,
                 const LayerBalanceState& state, const std::vector<int32_t>* replay_ids, MoeActs& a,
                 Tensor& y, const Tensor& x);
void moe_backward(Backend& b, const ModelConfig& c, const LayerWeights& w, LayerWeights& g,
                  const MoeActs& a, Tensor& dx, const Tensor& dy, const Tensor& x,
                  double balance_scale);

}  // namespace fm::blocks
