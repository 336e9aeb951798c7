// MoE FFN block: softmax router, top-k selection (or replay of recorded
// logical ids), token permutation grouped by expert, grouped SwiGLU expert
// GEMMs, gate-weighted combine, shared experts, router balancing terms.
#include <algorithm>

#include "engine/error.h"
#include "model/src/blocks.h"

namespace fm::blocks {

// Counting sort of the N*K assignments by expert, stable in assignment order,
// so the permuted layout (and every sum over it) is deterministic.
static void build_permutation(Backend& b, int64_t E, int64_t K, MoeActs& a) {
  const int64_t NK = static_cast<int64_t>(a.host_ids.size());
  a.load.assign(static_cast<size_t>(E), 0);
  for (int32_t e : a.host_ids) ++a.load[static_cast<size_t>(e)];
  a.offsets.assign(static_cast<size_t>(E + 1), 0);
  for (int64_t e = 0; e < E; ++e) a.offsets[e + 1] = a.offsets[e] + a.load[e];
  std::vector<int64_t> cursor(a.offsets.begin(), a.offsets.end() - 1);
  std::vector<int32_t> token(static_cast<size_t>(NK)), assign(static_cast<size_t>(NK));
  for (int64_t j = 0; j < NK; ++j) {
    const int64_t m = cursor[a.host_ids[j]]++;
    assign[m] = static_cast<int32_t>(j);
    token[m] = static_cast<int32_t>(j / K);
  }
  a.perm_token = b.upload(token, {NK});
  a.perm_assign = b.upload(assign, {NK});
}

static void check_replay_ids(const ModelConfig& c, int64_t N, const std::vector<int32_t>& ids) {
  const int64_t K = c.top_k;
  FM_CHECK(static_cast<int64_t>(ids.size()) == N * K,
           "routing replay: {} ids for {} tokens x top_k {}", ids.size(), N, K);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = ids[n * K + k];
      FM_CHECK(e >= 0 && e < c.n_experts, "routing replay: token {} slot {}: expert id {} >= {}", n,
               k, e, c.n_experts);
      for (int64_t j = 0; j < k; ++j)
        FM_CHECK(ids[n * K + j] != e, "routing replay: token {} lists expert {} twice", n, e);
    }
  }
}

void moe_forward(Backend& b, const ModelConfig& c, const LayerWeights& w,
                 const LayerBalanceState& state, const std::vector<int32_t>* replay_ids, MoeActs& a,
                 Tensor& y, const Tensor& x) {
  const int64_t N = x.dim(0), H = c.hidden, E = c.n_experts, K = c.top_k, F = c.moe_ffn;
  const int64_t NK = N * K;
  const DType dt = x.dtype();

  // Router: probs = softmax(x Wr^T).
  Tensor logits = b.empty({N, E}, dt);
  linear_forward(b, logits, x, w.router);
  a.probs = b.empty({N, E}, dt);
  b.softmax_forward(a.probs, logits);

  // Selection: replayed logical ids, or top-k of probs (+ the loss-free bias, selection only).
  if (replay_ids != nullptr) {
    check_replay_ids(c, N, *replay_ids);
    a.host_ids = *replay_ids;
    a.ids = b.upload(a.host_ids, {N, K});
  } else {
    a.ids = b.empty({N, K}, DType::i32);
    Tensor bias;
    if (c.balance.method == BalanceMethod::loss_free) bias = b.upload(state.bias, {E}, dt);
    b.topk(a.ids, a.probs, bias);
    a.host_ids = b.download_i32(a.ids);
  }
  // Gates are the router's probabilities at the chosen ids, so replay keeps the router gradient.
  a.p_sel = b.empty({N, K}, dt);
  b.gather_cols(a.p_sel, a.probs, a.ids);
  a.gates = b.empty({N, K}, dt);
  if (c.norm_topk_prob)
    b.normalize_rows_forward(a.gates, a.p_sel);
  else
    b.copy(a.gates, a.p_sel);

  build_permutation(b, E, K, a);
  a.perm_gate = b.empty({NK, 1}, dt);
  b.gather_rows(a.perm_gate, a.gates.reshape({NK, 1}), a.perm_assign);

  // Experts: grouped GEMMs over the permuted rows.
  a.xp = b.empty({NK, H}, dt);
  b.gather_rows(a.xp, x, a.perm_token);
  a.gate = b.empty({NK, F}, dt);
  a.up = b.empty({NK, F}, dt);
  a.h = b.empty({NK, F}, dt);
  a.yp = b.empty({NK, H}, dt);
  b.grouped_matmul(a.gate, a.xp, w.experts.w_gate, true, a.offsets);
  b.grouped_matmul(a.up, a.xp, w.experts.w_up, true, a.offsets);
  b.swiglu_forward(a.h, a.gate, a.up);
  b.grouped_matmul(a.yp, a.h, w.experts.w_down, true, a.offsets);

  // Combine: y[n] = sum_k gate[n, k] * yp[row of (n, k)] (+ shared experts).
  if (c.n_shared_experts > 0) {
    ffn_forward(b, w.shared, a.shared, y, x);
  } else {
    b.fill(y, 0.0);
  }
  b.scatter_add_rows(y, a.yp, a.perm_token, a.perm_gate.reshape({NK}));

  Tensor col = b.empty({E}, dt);
  b.column_sum(col, a.probs);
  a.prob_sum = b.download_f64(col);
  a.balance = balance_term(c.balance, state, a.prob_sum, a.load, N, K);
}

void moe_backward(Backend& b, const ModelConfig& c, const LayerWeights& w, LayerWeights& g,
                  const MoeActs& a, Tensor& dx, const Tensor& dy, const Tensor& x,
                  double balance_scale) {
  const int64_t N = x.dim(0), H = c.hidden, E = c.n_experts, K = c.top_k, F = c.moe_ffn;
  const int64_t NK = N * K;
  const DType dt = x.dtype();

  // Combine backward: d gate = <dy[n], yp[m]>, d yp[m] = gate[m] * dy[n].
  Tensor dyp_raw = b.empty({NK, H}, dt);
  b.gather_rows(dyp_raw, dy, a.perm_token);
  Tensor dperm_gate = b.empty({NK}, dt);
  b.rowwise_dot(dperm_gate, dyp_raw, a.yp);
  Tensor dyp = b.empty({NK, H}, dt);
  b.scale_rows(dyp, dyp_raw, a.perm_gate.reshape({NK}));

  // Experts backward.
  b.grouped_weight_grad(g.experts.w_down, dyp, a.h, a.offsets);
  Tensor dh = b.empty({NK, F}, dt);
  b.grouped_matmul(dh, dyp, w.experts.w_down, false, a.offsets);
  Tensor dgate = b.empty({NK, F}, dt), dup = b.empty({NK, F}, dt);
  b.swiglu_backward(dgate, dup, dh, a.gate, a.up);
  b.grouped_weight_grad(g.experts.w_gate, dgate, a.xp, a.offsets);
  b.grouped_weight_grad(g.experts.w_up, dup, a.xp, a.offsets);
  Tensor dxp = b.empty({NK, H}, dt), dxp_up = b.empty({NK, H}, dt);
  b.grouped_matmul(dxp, dgate, w.experts.w_gate, false, a.offsets);
  b.grouped_matmul(dxp_up, dup, w.experts.w_up, false, a.offsets);
  b.axpy(dxp, 1.0, dxp_up);

  if (c.n_shared_experts > 0)
    ffn_backward(b, w.shared, g.shared, a.shared, dx, 0.0, dy, x);
  else
    b.fill(dx, 0.0);
  b.scatter_add_rows(dx, dxp, a.perm_token, Tensor());

  // Router backward: gates -> p_sel -> probs (+ balancing loss) -> logits.
  Tensor dgates = b.zeros({NK, 1}, dt);
  b.scatter_add_rows(dgates, dperm_gate.reshape({NK, 1}), a.perm_assign, Tensor());
  Tensor dp_sel = b.empty({N, K}, dt);
  if (c.norm_topk_prob)
    b.normalize_rows_backward(dp_sel, dgates.reshape({N, K}), a.p_sel);
  else
    b.copy(dp_sel, dgates.reshape({N, K}));
  Tensor dprobs = b.zeros({N, E}, dt);
  b.scatter_add_cols(dprobs, dp_sel, a.ids);
  if (!a.balance.dprobs.empty() && balance_scale != 0.0)
    b.add_row_vector(dprobs, b.upload(a.balance.dprobs, {E}, dt), balance_scale);
  Tensor dlogits = b.empty({N, E}, dt);
  b.softmax_backward(dlogits, dprobs, a.probs);
  linear_backward(b, &dx, 1.0, g.router, dlogits, x, w.router);
}

}  // namespace fm::blocks
