// Attention block: pre-norm, GQA projections, optional per-head q/k RMSNorm,
// RoPE, causal attention over packed sequences, output projection, residual.
#include <cmath>

#include "model/src/blocks.h"

namespace fm::blocks {

void linear_forward(Backend& b, Tensor& y, const Tensor& x, const Tensor& w) {
  b.matmul(y, x, false, w, true);
}

void linear_backward(Backend& b, Tensor* dx, double dx_beta, Tensor& dw, const Tensor& dy,
                     const Tensor& x, const Tensor& w) {
  b.matmul(dw, dy, true, x, false, 1.0, 1.0);
  if (dx != nullptr) b.matmul(*dx, dy, false, w, false, 1.0, dx_beta);
}

void attention_qkv(Backend& b, const ModelConfig& c, const LayerWeights& w, AttentionActs& a,
                   const Tensor& x, const Tensor& pos) {
  const int64_t N = x.dim(0), H = c.hidden, D = c.head_dim;
  const DType dt = x.dtype();
  a.x = x;
  a.xn = b.empty({N, H}, dt);
  a.rstd = b.empty({N}, stat_dtype(dt));
  b.rmsnorm_forward(a.xn, a.rstd, x, w.attn_norm, c.rms_eps);

  a.q = b.empty({N, c.n_heads, D}, dt);
  a.k = b.empty({N, c.n_kv_heads, D}, dt);
  a.v = b.empty({N, c.n_kv_heads, D}, dt);
  Tensor v2 = a.v.reshape({N, c.kv_dim()});
  linear_forward(b, v2, a.xn, w.wv);
  if (c.qk_norm) {
    a.q_pre = b.empty({N * c.n_heads, D}, dt);
    a.k_pre = b.empty({N * c.n_kv_heads, D}, dt);
    a.q_rstd = b.empty({N * c.n_heads}, stat_dtype(dt));
    a.k_rstd = b.empty({N * c.n_kv_heads}, stat_dtype(dt));
    Tensor q2 = a.q_pre.reshape({N, c.q_dim()}), k2 = a.k_pre.reshape({N, c.kv_dim()});
    linear_forward(b, q2, a.xn, w.wq);
    linear_forward(b, k2, a.xn, w.wk);
    Tensor qn = a.q.reshape({N * c.n_heads, D}), kn = a.k.reshape({N * c.n_kv_heads, D});
    b.rmsnorm_forward(qn, a.q_rstd, a.q_pre, w.q_norm, c.rms_eps);
    b.rmsnorm_forward(kn, a.k_rstd, a.k_pre, w.k_norm, c.rms_eps);
  } else {
    Tensor q2 = a.q.reshape({N, c.q_dim()}), k2 = a.k.reshape({N, c.kv_dim()});
    linear_forward(b, q2, a.xn, w.wq);
    linear_forward(b, k2, a.xn, w.wk);
  }
  b.rope(a.q, pos, c.rope_theta, false);
  b.rope(a.k, pos, c.rope_theta, false);
  a.att = b.empty({N, c.n_heads, D}, dt);
}

// x_mid = x + att @ Wo^T
static void attention_output(Backend& b, const ModelConfig& c, const LayerWeights& w,
                             const AttentionActs& a, Tensor& x_mid, const Tensor& x) {
  b.copy(x_mid, x);
  b.matmul(x_mid, a.att.reshape({x.dim(0), c.q_dim()}), false, w.wo, true, 1.0, 1.0);
}

static double attention_scale(const ModelConfig& c) {
  return 1.0 / std::sqrt(static_cast<double>(c.head_dim));
}

void attention_forward(Backend& b, const ModelConfig& c, const LayerWeights& w, AttentionActs& a,
                       Tensor& x_mid, const Tensor& x, const Tensor& pos, const Tensor& seq_off) {
  attention_qkv(b, c, w, a, x, pos);
  a.lse = b.empty({x.dim(0), c.n_heads}, stat_dtype(x.dtype()));
  b.attention_forward(a.att, a.lse, a.q, a.k, a.v, seq_off, attention_scale(c));
  attention_output(b, c, w, a, x_mid, x);
}

void attention_cached_forward(Backend& b, const ModelConfig& c, const LayerWeights& w,
                              AttentionActs& a, Tensor& x_mid, const Tensor& x, const Tensor& pos,
                              Tensor& k_cache, Tensor& v_cache, const Tensor& slot,
                              const Tensor& cache_rows) {
  attention_qkv(b, c, w, a, x, pos);
  const int64_t N = x.dim(0), rows = k_cache.dim(0) * k_cache.dim(1);
  Tensor k_rows = k_cache.reshape({rows, c.kv_dim()}), v_rows = v_cache.reshape({rows, c.kv_dim()});
  b.scatter_rows(k_rows, a.k.reshape({N, c.kv_dim()}), cache_rows);
  b.scatter_rows(v_rows, a.v.reshape({N, c.kv_dim()}), cache_rows);
  b.attention_cached(a.att, a.q, k_cache, v_cache, slot, pos, attention_scale(c));
  attention_output(b, c, w, a, x_mid, x);
}

void attention_backward(Backend& b, const ModelConfig& c, const LayerWeights& w, LayerWeights& g,
                        const AttentionActs& a, Tensor& dx, const Tensor& dx_mid, const Tensor& pos,
                        const Tensor& seq_off) {
  const int64_t N = a.x.dim(0), H = c.hidden, D = c.head_dim;
  const DType dt = a.x.dtype();
  // Output projection.
  Tensor datt = b.empty({N, c.n_heads, D}, dt);
  Tensor datt2 = datt.reshape({N, c.q_dim()});
  linear_backward(b, &datt2, 0.0, g.wo, dx_mid, a.att.reshape({N, c.q_dim()}), w.wo);

  Tensor dq = b.empty({N, c.n_heads, D}, dt);
  Tensor dk = b.empty({N, c.n_kv_heads, D}, dt);
  Tensor dv = b.empty({N, c.n_kv_heads, D}, dt);
  b.attention_backward(dq, dk, dv, datt, a.q, a.k, a.v, a.att, a.lse, seq_off, attention_scale(c));
  // RoPE is a rotation: its backward is the inverse rotation.
  b.rope(dq, pos, c.rope_theta, true);
  b.rope(dk, pos, c.rope_theta, true);

  Tensor dq2, dk2;
  if (c.qk_norm) {
    dq2 = b.empty({N * c.n_heads, D}, dt);
    dk2 = b.empty({N * c.n_kv_heads, D}, dt);
    b.rmsnorm_backward(dq2, g.q_norm, dq.reshape({N * c.n_heads, D}), a.q_pre, w.q_norm, a.q_rstd);
    b.rmsnorm_backward(dk2, g.k_norm, dk.reshape({N * c.n_kv_heads, D}), a.k_pre, w.k_norm,
                       a.k_rstd);
    dq2 = dq2.reshape({N, c.q_dim()});
    dk2 = dk2.reshape({N, c.kv_dim()});
  } else {
    dq2 = dq.reshape({N, c.q_dim()});
    dk2 = dk.reshape({N, c.kv_dim()});
  }
  Tensor dxn = b.empty({N, H}, dt);
  linear_backward(b, &dxn, 0.0, g.wq, dq2, a.xn, w.wq);
  linear_backward(b, &dxn, 1.0, g.wk, dk2, a.xn, w.wk);
  linear_backward(b, &dxn, 1.0, g.wv, dv.reshape({N, c.kv_dim()}), a.xn, w.wv);

  // dx = dx_mid + rmsnorm'(dxn)
  b.rmsnorm_backward(dx, g.attn_norm, dxn, a.x, w.attn_norm, a.rstd);
  b.axpy(dx, 1.0, dx_mid);
}

}  // namespace fm::blocks
