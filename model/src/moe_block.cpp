// MoE FFN block: softmax router, top-k selection (or replay of recorded
// logical ids), token permutation grouped by expert, grouped SwiGLU expert
// GEMMs, gate-weighted combine, shared experts, router balancing terms.
// The expert-parallel layer (moe_dispatch.cpp) reuses the routing, expert and
// combine pieces.
#include <algorithm>

#include "engine/assignments.h"
#include "engine/error.h"
#include "model/src/blocks.h"

namespace fm::blocks {

std::vector<int64_t> permute_assignments(Backend& b, const std::vector<int32_t>& key,
                                         int64_t n_keys, int64_t K, MoeActs& a) {
  AssignmentOrder o = sort_assignments_host(key, n_keys, K, "expert permutation");
  const int64_t NK = static_cast<int64_t>(key.size());
  a.perm_token = b.upload(o.token, {NK});
  a.perm_assign = b.upload(o.assign, {NK});
  return std::move(o.offsets);
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

void moe_route(Backend& b, const ModelConfig& c, const LayerWeights& w,
               const LayerBalanceState& state, const std::vector<int32_t>* replay_ids, MoeActs& a,
               const Tensor& x, bool download_ids) {
  const int64_t N = x.dim(0), E = c.n_experts, K = c.top_k;
  const DType dt = stat_dtype(x.dtype());  // the router is f32 under mixed precision

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
    if (download_ids) a.host_ids = b.download_i32(a.ids);
  }
  // Gates are the router's probabilities at the chosen ids, so replay keeps the router gradient.
  a.p_sel = b.empty({N, K}, dt);
  b.gather_cols(a.p_sel, a.probs, a.ids);
  a.gates = b.empty({N, K}, dt);
  if (c.norm_topk_prob)
    b.normalize_rows_forward(a.gates, a.p_sel);
  else
    b.copy(a.gates, a.p_sel);
}

void experts_forward(Backend& b, const FfnWeights& w, ExpertRows& r, Tensor& y) {
  const int64_t rows = r.x.dim(0), F = w.w_gate.dim(1);
  const DType dt = r.x.dtype();
  r.gate = b.empty({rows, F}, dt);
  r.up = b.empty({rows, F}, dt);
  r.h = b.empty({rows, F}, dt);
  const auto grouped = [&](Tensor& out, const Tensor& in, const Tensor& weights) {
    if (r.device_offsets.defined())
      b.grouped_matmul_device(out, in, weights, true, r.device_offsets);
    else
      b.grouped_matmul(out, in, weights, true, r.offsets);
  };
  grouped(r.gate, r.x, w.w_gate);
  grouped(r.up, r.x, w.w_up);
  b.swiglu_forward(r.h, r.gate, r.up);
  grouped(y, r.h, w.w_down);
}

void experts_backward(Backend& b, const FfnWeights& w, FfnWeights& g, const ExpertRows& r,
                      const Tensor& dy, Tensor& dx) {
  const int64_t rows = r.x.dim(0), H = r.x.dim(1), F = w.w_gate.dim(1);
  const DType dt = r.x.dtype();
  b.grouped_weight_grad(g.w_down, dy, r.h, r.offsets);
  Tensor dh = b.empty({rows, F}, dt);
  b.grouped_matmul(dh, dy, w.w_down, false, r.offsets);
  Tensor dgate = b.empty({rows, F}, dt), dup = b.empty({rows, F}, dt);
  b.swiglu_backward(dgate, dup, dh, r.gate, r.up);
  b.grouped_weight_grad(g.w_gate, dgate, r.x, r.offsets);
  b.grouped_weight_grad(g.w_up, dup, r.x, r.offsets);
  Tensor dx_up = b.empty({rows, H}, dt);
  b.grouped_matmul(dx, dgate, w.w_gate, false, r.offsets);
  b.grouped_matmul(dx_up, dup, w.w_up, false, r.offsets);
  b.axpy(dx, 1.0, dx_up);
}

void moe_combine(Backend& b, const ModelConfig& c, const LayerWeights& w, MoeActs& a, Tensor& y,
                 const Tensor& x) {
  const int64_t NK = a.yp.dim(0);
  // y[n] = sum_k gate[n, k] * yp[row of (n, k)] (+ shared experts).
  if (c.n_shared_experts > 0) {
    ffn_forward(b, w.shared, a.shared, y, x);
  } else {
    b.fill(y, 0.0);
  }
  b.scatter_add_rows(y, a.yp, a.perm_token, a.perm_gate.reshape({NK}));
}

// The single-rank layer after its permutation (a.perm_* and a.experts' offsets set): the
// permuted gates and rows, the grouped expert GEMMs, the combine.
static void permuted_experts_forward(Backend& b, const ModelConfig& c, const LayerWeights& w,
                                     MoeActs& a, Tensor& y, const Tensor& x) {
  const int64_t NK = a.perm_assign.numel(), H = c.hidden;
  const DType dt = x.dtype();
  a.perm_gate = b.empty({NK, 1}, dt);
  b.gather_rows(a.perm_gate, a.gates.reshape({NK, 1}), a.perm_assign);
  a.experts.x = b.empty({NK, H}, dt);
  b.gather_rows(a.experts.x, x, a.perm_token);
  a.yp = b.empty({NK, H}, dt);
  experts_forward(b, w.experts, a.experts, a.yp);
  moe_combine(b, c, w, a, y, x);
}

void moe_forward(Backend& b, const ModelConfig& c, const LayerWeights& w,
                 const LayerBalanceState& state, const std::vector<int32_t>* replay_ids, MoeActs& a,
                 Tensor& y, const Tensor& x, bool router_stats) {
  const int64_t N = x.dim(0), E = c.n_experts, K = c.top_k;
  moe_route(b, c, w, state, replay_ids, a, x);

  a.experts.offsets = permute_assignments(b, a.host_ids, E, K, a);
  a.load.resize(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) a.load[e] = a.experts.offsets[e + 1] - a.experts.offsets[e];
  permuted_experts_forward(b, c, w, a, y, x);
  if (!router_stats) return;

  Tensor col = b.empty({E}, a.probs.dtype());
  b.column_sum(col, a.probs);
  a.prob_sum = b.download_f64(col);
  a.tokens = N;
  a.balance = balance_term(c.balance, state, a.prob_sum, a.load, N, K);
}

void moe_forward_device_routed(Backend& b, const ModelConfig& c, const LayerWeights& w,
                               const LayerBalanceState& state, MoeActs& a, Tensor& y,
                               const Tensor& x) {
  const int64_t NK = x.dim(0) * c.top_k, E = c.n_experts;
  moe_route(b, c, w, state, nullptr, a, x, /*download_ids=*/false);

  a.experts.device_offsets = b.empty({E + 1}, DType::i32);
  a.perm_assign = b.empty({NK}, DType::i32);
  a.perm_token = b.empty({NK}, DType::i32);
  b.sort_assignments(a.experts.device_offsets, a.perm_assign, a.perm_token, a.ids);
  permuted_experts_forward(b, c, w, a, y, x);
}

void moe_combine_backward(Backend& b, const MoeActs& a, const Tensor& dy, Tensor& dperm_gate,
                          Tensor& dyp) {
  const int64_t NK = a.yp.dim(0), H = a.yp.dim(1);
  // d gate = <dy[n], yp[m]>, d yp[m] = gate[m] * dy[n].
  Tensor dyp_raw = b.empty({NK, H}, a.yp.dtype());
  b.gather_rows(dyp_raw, dy, a.perm_token);
  b.rowwise_dot(dperm_gate, dyp_raw, a.yp);
  b.scale_rows(dyp, dyp_raw, a.perm_gate.reshape({NK}));
}

void moe_input_backward(Backend& b, const ModelConfig& c, const LayerWeights& w, LayerWeights& g,
                        const MoeActs& a, const Tensor& dperm_gate, const Tensor& dxp, Tensor& dx,
                        const Tensor& dy, const Tensor& x, double balance_scale) {
  const int64_t N = x.dim(0), E = c.n_experts, K = c.top_k;
  const int64_t NK = N * K;
  if (c.n_shared_experts > 0)
    ffn_backward(b, w.shared, g.shared, a.shared, dx, 0.0, dy, x);
  else
    b.fill(dx, 0.0);
  b.scatter_add_rows(dx, dxp, a.perm_token, Tensor());

  // Router backward: gates -> p_sel -> probs (+ balancing loss) -> logits, in the router's
  // dtype (f32 under mixed precision).
  const DType dt = a.probs.dtype();
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

void moe_backward(Backend& b, const ModelConfig& c, const LayerWeights& w, LayerWeights& g,
                  const MoeActs& a, Tensor& dx, const Tensor& dy, const Tensor& x,
                  double balance_scale) {
  const int64_t N = x.dim(0), H = c.hidden, K = c.top_k;
  const int64_t NK = N * K;
  const DType dt = x.dtype();
  Tensor dperm_gate = b.empty({NK}, stat_dtype(dt)), dyp = b.empty({NK, H}, dt);
  moe_combine_backward(b, a, dy, dperm_gate, dyp);
  Tensor dxp = b.empty({NK, H}, dt);
  experts_backward(b, w.experts, g.experts, a.experts, dyp, dxp);
  moe_input_backward(b, c, w, g, a, dperm_gate, dxp, dx, dy, x, balance_scale);
}

}  // namespace fm::blocks
