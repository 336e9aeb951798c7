// CpuBackend ops (cpu_backend.h): the dense and grouped GEMMs (engine/cpu/gemm.h) and
// attention (engine/cpu/attention.h).
#include "engine/cpu/cpu_backend.h"

namespace fm::cpu {

void CpuBackend::matmul(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                        double alpha, double beta) {
  if (widened("matmul", {{&c, beta != 0 ? kInOut : kOut}, {&a, kIn}, {&b, kIn}},
              [&](auto& f) { matmul(f[0], f[1], trans_a, f[2], trans_b, alpha, beta); }))
    return;
  ArgCheck chk("matmul");
  const DType dt = chk.float_dtype("a", a, 2);
  const int64_t M = trans_a ? a.dim(1) : a.dim(0), K = trans_a ? a.dim(0) : a.dim(1);
  chk.cpu("b", b);
  FM_CHECK(b.dtype() == dt && b.rank() == 2 && b.dim(trans_b ? 1 : 0) == K,
           "matmul: b must be {} with {} = {} (the inner dim of op(a) for a {}) but is {}",
           dtype_name(dt), trans_b ? "cols" : "rows", K, a.describe(), b.describe());
  const int64_t N = trans_b ? b.dim(0) : b.dim(1);
  chk.is("c", c, dt, {M, N});
  for (int64_t v : {M, N, K}) chk.fits_int("a matrix dim", v);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::GemmProblem<T> p;
    p.m = M, p.n = N, p.k = K;
    p.a = a.data<T>(), p.lda = a.dim(1), p.trans_a = trans_a;
    p.b = b.data<T>(), p.ldb = b.dim(1), p.trans_b = trans_b;
    p.c = c.data<T>(), p.ldc = N;
    p.alpha = static_cast<T>(alpha), p.beta = static_cast<T>(beta);
    cpu::gemm_tiled<T>({p});
  });
}

void CpuBackend::grouped_matmul(Tensor& y, const Tensor& x, const Tensor& w, bool trans_w,
                                const std::vector<int64_t>& off) {
  if (widened("grouped_matmul", {{&y, kOut}, {&x, kIn}, {&w, kIn}},
              [&](auto& f) { grouped_matmul(f[0], f[1], f[2], trans_w, off); }))
    return;
  ArgCheck chk("grouped_matmul");
  const DType dt = chk.float_dtype("w", w, 3);
  const int64_t G = w.dim(0), R = w.dim(1), S = w.dim(2);
  const int64_t in = trans_w ? S : R,
                out = trans_w ? R : S;  // y_g [rows, out] = x_g [rows, in] @ op(w[g])
  chk.cpu("x", x);
  FM_CHECK(x.dtype() == dt && x.rank() == 2 && x.dim(1) == in,
           "grouped_matmul: x must be {}[rows, {}] but is {}", dtype_name(dt), in, x.describe());
  const int64_t rows = x.dim(0);
  chk.is("y", y, dt, {rows, out});
  chk.group_offsets(off, G, rows);
  for (int64_t v : {rows, R, S}) chk.fits_int("a matrix dim", v);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    std::vector<cpu::GemmProblem<T>> problems;
    for (int64_t g = 0; g < G; ++g) {
      cpu::GemmProblem<T> p;
      p.m = off[g + 1] - off[g], p.n = out, p.k = in;
      p.a = x.data<T>() + off[g] * in, p.lda = in;
      p.b = w.data<T>() + g * R * S, p.ldb = S, p.trans_b = trans_w;
      p.c = y.data<T>() + off[g] * out, p.ldc = out;
      problems.push_back(p);
    }
    cpu::gemm_tiled<T>(problems);
  });
}

void CpuBackend::grouped_weight_grad(Tensor& dw, const Tensor& dy, const Tensor& x,
                                     const std::vector<int64_t>& off) {
  if (widened("grouped_weight_grad", {{&dw, kInOut}, {&dy, kIn}, {&x, kIn}},
              [&](auto& f) { grouped_weight_grad(f[0], f[1], f[2], off); }))
    return;
  ArgCheck chk("grouped_weight_grad");
  const DType dt = chk.float_dtype("dw", dw, 3);
  const int64_t G = dw.dim(0), R = dw.dim(1), S = dw.dim(2);
  chk.cpu("dy", dy);
  FM_CHECK(dy.dtype() == dt && dy.rank() == 2 && dy.dim(1) == R,
           "grouped_weight_grad: dy must be {}[rows, {}] but is {}", dtype_name(dt), R,
           dy.describe());
  const int64_t rows = dy.dim(0);
  chk.is("x", x, dt, {rows, S});
  chk.group_offsets(off, G, rows);
  for (int64_t v : {rows, R, S}) chk.fits_int("a matrix dim", v);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    std::vector<cpu::GemmProblem<T>> problems;
    for (int64_t g = 0; g < G; ++g) {  // dw[g] [R, S] += dy_g^T [R, rows_g] @ x_g [rows_g, S]
      cpu::GemmProblem<T> p;
      p.m = R, p.n = S, p.k = off[g + 1] - off[g];
      if (p.k == 0) continue;  // nothing to add
      p.a = dy.data<T>() + off[g] * R, p.lda = R, p.trans_a = true;
      p.b = x.data<T>() + off[g] * S, p.ldb = S;
      p.c = dw.data<T>() + g * R * S, p.ldc = S;
      p.beta = T(1);
      problems.push_back(p);
    }
    cpu::gemm_tiled<T>(problems);
  });
}

cpu::AttentionDims CpuBackend::check_attention(const ArgCheck& chk, const Tensor& q,
                                               const Tensor& k, const Tensor& v,
                                               const Tensor& seq_off, cpu::TokenSpans* spans) {
  const DType dt = chk.float_dtype("q", q, 3);
  const int64_t N = q.dim(0), Hq = q.dim(1), D = q.dim(2);
  chk.cpu("k", k);
  FM_CHECK(k.dtype() == dt && k.rank() == 3 && k.dim(0) == N && k.dim(2) == D && k.dim(1) > 0 &&
               Hq % k.dim(1) == 0,
           "{}: k must be {}[{}, Hkv, {}] with Hkv dividing Hq = {} but is {}", chk.op(),
           dtype_name(dt), N, D, Hq, k.describe());
  const int64_t Hkv = k.dim(1);
  chk.same("v", v, "k", k);
  chk.cpu("seq_off", seq_off);
  FM_CHECK(seq_off.dtype() == DType::i32 && seq_off.rank() == 1 && seq_off.dim(0) >= 1,
           "{}: seq_off must be i32[S + 1] but is {}", chk.op(), seq_off.describe());
  const int32_t* off = seq_off.data<int32_t>();
  const int64_t S = seq_off.dim(0) - 1;
  FM_CHECK(off[0] == 0 && off[S] == N, "{}: seq_off must run from 0 to N = {} but is {}..{}",
           chk.op(), N, off[0], off[S]);
  for (int64_t s = 0; s < S; ++s)
    FM_CHECK(off[s] <= off[s + 1],
             "{}: seq_off must be non-decreasing but seq_off[{}] = {} > seq_off[{}] = {}", chk.op(),
             s, off[s], s + 1, off[s + 1]);
  *spans = cpu::token_spans(off, S, N);
  return {N, Hq, Hkv, D};
}

void CpuBackend::attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                                   const Tensor& v, const Tensor& seq_off, double scale) {
  if (widened("attention_forward", {{&out, kOut}, {&lse, kOut}, {&q, kIn}, {&k, kIn}, {&v, kIn}},
              [&](auto& f) { attention_forward(f[0], f[1], f[2], f[3], f[4], seq_off, scale); }))
    return;
  ArgCheck chk("attention_forward");
  cpu::TokenSpans spans;
  const cpu::AttentionDims d = check_attention(chk, q, k, v, seq_off, &spans);
  chk.same("out", out, "q", q);
  chk.is("lse", lse, q.dtype(), {d.N, d.Hq});
  dispatch(q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    cpu::attention_forward<T>(out.data<T>(), lse.data<T>(), q.data<T>(), k.data<T>(), v.data<T>(),
                              spans, d, static_cast<T>(scale));
  });
}

void CpuBackend::attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                                    const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& out, const Tensor& lse, const Tensor& seq_off,
                                    double scale) {
  // clang-format off
  if (widened("attention_backward", {{&dq, kOut}, {&dk, kOut}, {&dv, kOut}, {&dout, kIn},
                                     {&q, kIn}, {&k, kIn}, {&v, kIn}, {&out, kIn}, {&lse, kIn}},
              [&](auto& f) { attention_backward(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7],
                                                f[8], seq_off, scale); }))
    return;
  // clang-format on
  ArgCheck chk("attention_backward");
  cpu::TokenSpans spans;
  const cpu::AttentionDims d = check_attention(chk, q, k, v, seq_off, &spans);
  chk.same("out", out, "q", q);
  chk.same("dout", dout, "q", q);
  chk.same("dq", dq, "q", q);
  chk.same("dk", dk, "k", k);
  chk.same("dv", dv, "k", k);
  chk.is("lse", lse, q.dtype(), {d.N, d.Hq});
  dispatch(q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    cpu::attention_backward<T>(dq.data<T>(), dk.data<T>(), dv.data<T>(), dout.data<T>(),
                               q.data<T>(), k.data<T>(), v.data<T>(), out.data<T>(), lse.data<T>(),
                               spans, d, static_cast<T>(scale));
  });
}

void CpuBackend::attention_cached(Tensor& out, const Tensor& q, const Tensor& k_cache,
                                  const Tensor& v_cache, const Tensor& slot, const Tensor& pos,
                                  double scale) {
  if (widened("attention_cached", {{&out, kOut}, {&q, kIn}, {&k_cache, kIn}, {&v_cache, kIn}},
              [&](auto& f) { attention_cached(f[0], f[1], f[2], f[3], slot, pos, scale); }))
    return;
  ArgCheck chk("attention_cached");
  const DType dt = chk.float_dtype("q", q, 3);
  const int64_t N = q.dim(0), Hq = q.dim(1), D = q.dim(2);
  chk.cpu("k_cache", k_cache);
  FM_CHECK(k_cache.dtype() == dt && k_cache.rank() == 4 && k_cache.dim(3) == D &&
               k_cache.dim(2) > 0 && Hq % k_cache.dim(2) == 0,
           "attention_cached: k_cache must be {}[S, T, Hkv, {}] with Hkv dividing Hq = {} but is "
           "{}",
           dtype_name(dt), D, Hq, k_cache.describe());
  const int64_t S = k_cache.dim(0), T_max = k_cache.dim(1), Hkv = k_cache.dim(2);
  chk.same("v_cache", v_cache, "k_cache", k_cache);
  chk.same("out", out, "q", q);
  chk.is("slot", slot, DType::i32, {N});
  chk.is("pos", pos, DType::i32, {N});
  chk.ids_below("slot", slot, S);
  chk.ids_below("pos", pos, T_max);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::attention_cached<T>(out.data<T>(), q.data<T>(), k_cache.data<T>(), v_cache.data<T>(),
                             slot.data<int32_t>(), pos.data<int32_t>(), {N, Hq, Hkv, D}, T_max,
                             static_cast<T>(scale));
  });
}

}  // namespace fm::cpu
