// The CPU reference backend: every Backend op for f32 and f64 tensors (index
// tensors i32). This file checks arguments and dispatches on the dtype; the
// kernels, one template per op family, live in the headers next to it.
// bf16 tensors (engine/mixed_precision.h) run each op's f32 form on widened copies.
// Determinism: OpenBLAS runs single-threaded inside our own fixed tiling, and
// every OpenMP loop either writes independent outputs or reduces in a fixed
// order (see each header), so results are bit-identical for any thread count.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "engine/backend.h"
#include "engine/cpu/arg_check.h"
#include "engine/cpu/attention.h"
#include "engine/cpu/elementwise.h"
#include "engine/cpu/gemm.h"
#include "engine/cpu/loss.h"
#include "engine/cpu/norms.h"
#include "engine/cpu/rope.h"
#include "engine/cpu/router.h"
#include "engine/cpu/rows.h"
#include "engine/error.h"
#include "engine/mixed_precision.h"

namespace fm {
namespace {

using cpu::ArgCheck;

// Calls f(T{}) with T = float or double for the dtype.
template <class F>
void dispatch(DType dtype, F&& f) {
  if (dtype == DType::f32)
    f(float{});
  else
    f(double{});
}

constexpr WidenedArgs::Role kIn = WidenedArgs::in, kOut = WidenedArgs::out,
                            kInOut = WidenedArgs::inout;

template <class T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

template <class T>
void fill_as(Tensor& x, T value) {
  T* p = static_cast<T*>(x.raw());
  std::fill(p, p + x.numel(), value);
}

template <class T>
void fill_integer(const char* op, Tensor& x, double value) {
  FM_CHECK(std::isfinite(value) && value == std::trunc(value) &&
               value >= static_cast<double>(std::numeric_limits<T>::min()) &&
               value < static_cast<double>(std::numeric_limits<T>::max()) + 1.0,
           "{}: {} cannot hold the value {} (tensor {})", op, dtype_name(x.dtype()), value,
           x.describe());
  fill_as<T>(x, static_cast<T>(value));
}

class CpuBackend final : public Backend {
 public:
  // BLAS runs single-threaded; the threads come from our fixed tiling (engine/cpu/gemm.h).
  CpuBackend() { openblas_set_num_threads(1); }

  Device device() const override { return Device::cpu(); }
  const char* name() const override { return "cpu"; }

  // --- memory -------------------------------------------------------------------------------

  void fill(Tensor& x, double value) override {
    ArgCheck chk("fill");
    chk.cpu("x", x);
    switch (x.dtype()) {
      case DType::f32:
        return fill_as<float>(x, static_cast<float>(value));
      case DType::f64:
        return fill_as<double>(x, value);
      case DType::bf16:
        return fill_as<uint16_t>(x, f32_to_bf16(static_cast<float>(value)));
      case DType::f16:
        return fill_as<uint16_t>(x, f32_to_f16(static_cast<float>(value)));
      case DType::i32:
        return fill_integer<int32_t>(chk.op(), x, value);
      case DType::i64:
        return fill_integer<int64_t>(chk.op(), x, value);
      case DType::u8:
        return fill_integer<uint8_t>(chk.op(), x, value);
      case DType::u16:
        return fill_integer<uint16_t>(chk.op(), x, value);
    }
    throw Error(fmt::format("fill: unknown dtype of {}", x.describe()));
  }

  void copy(Tensor& dst, const Tensor& src) override {
    FM_CHECK(dst.defined() && src.defined(), "copy: dst and src must be defined");
    for (const Tensor* t : {static_cast<const Tensor*>(&dst), &src})
      FM_CHECK(t->is_cpu(),
               "copy: the CPU backend cannot reach {} (tensor {}); copy with the "
               "backend of that device",
               device_name(t->device()), t->describe());
    FM_CHECK(dst.dtype() == src.dtype() && dst.shape() == src.shape(),
             "copy: dst {} and src {} must have the same dtype and shape", dst.describe(),
             src.describe());
    if (dst.nbytes() > 0) std::memmove(dst.raw(), src.raw(), src.nbytes());
  }

  // --- dense linear algebra ---------------------------------------------------------------

  void matmul(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, double alpha,
              double beta) override {
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

  void grouped_matmul(Tensor& y, const Tensor& x, const Tensor& w, bool trans_w,
                      const std::vector<int64_t>& off) override {
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

  void grouped_weight_grad(Tensor& dw, const Tensor& dy, const Tensor& x,
                           const std::vector<int64_t>& off) override {
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

  // --- elementwise and reductions ---------------------------------------------------------

  void axpy(Tensor& y, double alpha, const Tensor& x) override {
    if (widened("axpy", {{&y, kInOut}, {&x, kIn}}, [&](auto& f) { axpy(f[0], alpha, f[1]); }))
      return;
    ArgCheck chk("axpy");
    const DType dt = chk.float_dtype("y", y, y.rank());
    chk.same("x", x, "y", y);
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::axpy<T>(y.data<T>(), static_cast<T>(alpha), x.data<T>(), y.numel());
    });
  }

  void scale(Tensor& x, double alpha) override {
    if (widened("scale", {{&x, kInOut}}, [&](auto& f) { scale(f[0], alpha); })) return;
    ArgCheck chk("scale");
    const DType dt = chk.float_dtype("x", x, x.rank());
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::scale<T>(x.data<T>(), static_cast<T>(alpha), x.numel());
    });
  }

  double sum_squares(const Tensor& x) override {
    double r = 0;
    if (widened("sum_squares", {{&x, kIn}}, [&](auto& f) { r = sum_squares(f[0]); })) return r;
    ArgCheck chk("sum_squares");
    const DType dt = chk.float_dtype("x", x, x.rank());
    double result = 0;
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      result = cpu::sum_squares<T>(x.data<T>(), x.numel());
    });
    return result;
  }

  void rowwise_dot(Tensor& out, const Tensor& a, const Tensor& b) override {
    if (widened("rowwise_dot", {{&out, kOut}, {&a, kIn}, {&b, kIn}},
                [&](auto& f) { rowwise_dot(f[0], f[1], f[2]); }))
      return;
    ArgCheck chk("rowwise_dot");
    const DType dt = chk.float_dtype("a", a, 2);
    chk.same("b", b, "a", a);
    chk.is("out", out, dt, {a.dim(0)});
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::rowwise_dot<T>(out.data<T>(), a.data<T>(), b.data<T>(), a.dim(0), a.dim(1));
    });
  }

  void column_sum(Tensor& out, const Tensor& x) override {
    if (widened("column_sum", {{&out, kOut}, {&x, kIn}}, [&](auto& f) { column_sum(f[0], f[1]); }))
      return;
    ArgCheck chk("column_sum");
    const DType dt = chk.float_dtype("x", x, 2);
    chk.is("out", out, dt, {x.dim(1)});
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::column_sum<T>(out.data<T>(), x.data<T>(), x.dim(0), x.dim(1));
    });
  }

  void add_row_vector(Tensor& x, const Tensor& v, double alpha) override {
    if (widened("add_row_vector", {{&x, kInOut}, {&v, kIn}},
                [&](auto& f) { add_row_vector(f[0], f[1], alpha); }))
      return;
    ArgCheck chk("add_row_vector");
    const DType dt = chk.float_dtype("x", x, 2);
    chk.is("v", v, dt, {x.dim(1)});
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::add_row_vector<T>(x.data<T>(), v.data<T>(), static_cast<T>(alpha), x.dim(0), x.dim(1));
    });
  }

  void scale_rows(Tensor& out, const Tensor& x, const Tensor& w) override {
    if (widened("scale_rows", {{&out, kOut}, {&x, kIn}, {&w, kIn}},
                [&](auto& f) { scale_rows(f[0], f[1], f[2]); }))
      return;
    ArgCheck chk("scale_rows");
    const DType dt = chk.float_dtype("x", x, 2);
    chk.is("w", w, dt, {x.dim(0)});
    chk.same("out", out, "x", x);
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::scale_rows<T>(out.data<T>(), x.data<T>(), w.data<T>(), x.dim(0), x.dim(1));
    });
  }

  // --- embedding ----------------------------------------------------------------------------

  void embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) override {
    if (widened("embedding_forward", {{&out, kOut}, {&table, kIn}},
                [&](auto& f) { embedding_forward(f[0], f[1], ids); }))
      return;
    ArgCheck chk("embedding_forward");
    const DType dt = chk.float_dtype("table", table, 2);
    const int64_t V = table.dim(0), C = table.dim(1);
    chk.is("ids", ids, DType::i32, {ids.numel()});
    chk.is("out", out, dt, {ids.numel(), C});
    chk.ids_below("ids", ids, V);
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::gather_rows<T>(out.data<T>(), table.data<T>(), ids.data<int32_t>(), ids.numel(), C);
    });
  }

  void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) override {
    if (widened("embedding_backward", {{&dtable, kInOut}, {&dout, kIn}},
                [&](auto& f) { embedding_backward(f[0], f[1], ids); }))
      return;
    ArgCheck chk("embedding_backward");
    const DType dt = chk.float_dtype("dtable", dtable, 2);
    const int64_t V = dtable.dim(0), C = dtable.dim(1);
    chk.is("ids", ids, DType::i32, {ids.numel()});
    chk.is("dout", dout, dt, {ids.numel(), C});
    chk.ids_below("ids", ids, V);
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::scatter_add_rows<T>(dtable.data<T>(), dout.data<T>(), ids.data<int32_t>(), nullptr,
                               ids.numel(), V, C);
    });
  }

  // --- RMSNorm ------------------------------------------------------------------------------

  void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w,
                       double eps) override {
    if (widened("rmsnorm_forward", {{&y, kOut}, {&rstd, kOut}, {&x, kIn}, {&w, kIn}},
                [&](auto& f) { rmsnorm_forward(f[0], f[1], f[2], f[3], eps); }))
      return;
    ArgCheck chk("rmsnorm_forward");
    const DType dt = chk.float_dtype("x", x, 2);
    const int64_t N = x.dim(0), C = x.dim(1);
    chk.is("w", w, dt, {C});
    chk.is("y", y, dt, {N, C});
    chk.is("rstd", rstd, dt, {N});
    FM_CHECK(eps >= 0, "rmsnorm_forward: eps must be >= 0 but is {}", eps);
    FM_CHECK(C > 0, "rmsnorm_forward: x must have at least one column but is {}", x.describe());
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::rmsnorm_forward<T>(y.data<T>(), rstd.data<T>(), x.data<T>(), w.data<T>(), N, C,
                              static_cast<T>(eps));
    });
  }

  void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                        const Tensor& rstd) override {
    if (widened("rmsnorm_backward",
                {{&dx, kOut}, {&dw, kInOut}, {&dy, kIn}, {&x, kIn}, {&w, kIn}, {&rstd, kIn}},
                [&](auto& f) { rmsnorm_backward(f[0], f[1], f[2], f[3], f[4], f[5]); }))
      return;
    ArgCheck chk("rmsnorm_backward");
    const DType dt = chk.float_dtype("x", x, 2);
    const int64_t N = x.dim(0), C = x.dim(1);
    chk.is("w", w, dt, {C});
    chk.is("dw", dw, dt, {C});
    chk.is("dy", dy, dt, {N, C});
    chk.is("dx", dx, dt, {N, C});
    chk.is("rstd", rstd, dt, {N});
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::rmsnorm_backward<T>(dx.data<T>(), dw.data<T>(), dy.data<T>(), x.data<T>(), w.data<T>(),
                               rstd.data<T>(), N, C);
    });
  }

  // --- rotary position embedding ------------------------------------------------------------

  void rope(Tensor& x, const Tensor& pos, double theta, bool inverse) override {
    if (widened("rope", {{&x, kInOut}}, [&](auto& f) { rope(f[0], pos, theta, inverse); })) return;
    ArgCheck chk("rope");
    const DType dt = chk.float_dtype("x", x, 3);
    const int64_t N = x.dim(0), H = x.dim(1), D = x.dim(2);
    FM_CHECK(D % 2 == 0, "rope: the head dim of x must be even but x is {}", x.describe());
    FM_CHECK(theta > 0, "rope: theta must be > 0 but is {}", theta);
    chk.is("pos", pos, DType::i32, {N});
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::rope<T>(x.data<T>(), pos.data<int32_t>(), N, H, D, theta, inverse);
    });
  }

  // --- attention ----------------------------------------------------------------------------

  // Checks q, k, v, seq_off; returns the dims and each token's sequence span.
  static cpu::AttentionDims check_attention(const ArgCheck& chk, const Tensor& q, const Tensor& k,
                                            const Tensor& v, const Tensor& seq_off,
                                            cpu::TokenSpans* spans) {
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
               "{}: seq_off must be non-decreasing but seq_off[{}] = {} > seq_off[{}] = {}",
               chk.op(), s, off[s], s + 1, off[s + 1]);
    *spans = cpu::token_spans(off, S, N);
    return {N, Hq, Hkv, D};
  }

  void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                         const Tensor& v, const Tensor& seq_off, double scale) override {
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

  void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q,
                          const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                          const Tensor& seq_off, double scale) override {
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
                                 q.data<T>(), k.data<T>(), v.data<T>(), out.data<T>(),
                                 lse.data<T>(), spans, d, static_cast<T>(scale));
    });
  }

  void attention_cached(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& slot, const Tensor& pos, double scale) override {
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

  // --- SwiGLU -------------------------------------------------------------------------------

  void swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up) override {
    if (widened("swiglu_forward", {{&h, kOut}, {&gate, kIn}, {&up, kIn}},
                [&](auto& f) { swiglu_forward(f[0], f[1], f[2]); }))
      return;
    ArgCheck chk("swiglu_forward");
    const DType dt = chk.float_dtype("gate", gate, 2);
    chk.same("up", up, "gate", gate);
    chk.same("h", h, "gate", gate);
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::swiglu_forward<T>(h.data<T>(), gate.data<T>(), up.data<T>(), gate.numel());
    });
  }

  void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dh, const Tensor& gate,
                       const Tensor& up) override {
    if (widened("swiglu_backward",
                {{&dgate, kOut}, {&dup, kOut}, {&dh, kIn}, {&gate, kIn}, {&up, kIn}},
                [&](auto& f) { swiglu_backward(f[0], f[1], f[2], f[3], f[4]); }))
      return;
    ArgCheck chk("swiglu_backward");
    const DType dt = chk.float_dtype("gate", gate, 2);
    chk.same("up", up, "gate", gate);
    chk.same("dh", dh, "gate", gate);
    chk.same("dgate", dgate, "gate", gate);
    chk.same("dup", dup, "gate", gate);
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::swiglu_backward<T>(dgate.data<T>(), dup.data<T>(), dh.data<T>(), gate.data<T>(),
                              up.data<T>(), gate.numel());
    });
  }

  // --- router pieces ------------------------------------------------------------------------

  void softmax_forward(Tensor& probs, const Tensor& logits) override {
    if (widened("softmax_forward", {{&probs, kOut}, {&logits, kIn}},
                [&](auto& f) { softmax_forward(f[0], f[1]); }))
      return;
    ArgCheck chk("softmax_forward");
    const DType dt = chk.float_dtype("logits", logits, 2);
    chk.same("probs", probs, "logits", logits);
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::softmax_forward<T>(probs.data<T>(), logits.data<T>(), logits.dim(0), logits.dim(1));
    });
  }

  void softmax_backward(Tensor& dlogits, const Tensor& dprobs, const Tensor& probs) override {
    if (widened("softmax_backward", {{&dlogits, kOut}, {&dprobs, kIn}, {&probs, kIn}},
                [&](auto& f) { softmax_backward(f[0], f[1], f[2]); }))
      return;
    ArgCheck chk("softmax_backward");
    const DType dt = chk.float_dtype("probs", probs, 2);
    chk.same("dprobs", dprobs, "probs", probs);
    chk.same("dlogits", dlogits, "probs", probs);
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::softmax_backward<T>(dlogits.data<T>(), dprobs.data<T>(), probs.data<T>(), probs.dim(0),
                               probs.dim(1));
    });
  }

  void topk(Tensor& ids, const Tensor& scores, const Tensor& bias) override {
    if (widened("topk", {{&scores, kIn}, {&bias, kIn}}, [&](auto& f) { topk(ids, f[0], f[1]); }))
      return;
    ArgCheck chk("topk");
    const DType dt = chk.float_dtype("scores", scores, 2);
    const int64_t N = scores.dim(0), E = scores.dim(1);
    chk.cpu("ids", ids);
    FM_CHECK(ids.dtype() == DType::i32 && ids.rank() == 2 && ids.dim(0) == N && ids.dim(1) <= E,
             "topk: ids must be i32[{}, K] with K <= E = {} but is {}", N, E, ids.describe());
    const int64_t K = ids.dim(1);
    if (bias.defined()) chk.is("bias", bias, dt, {E});
    int64_t nan_row = -1;
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      nan_row = cpu::topk<T>(ids.data<int32_t>(), scores.data<T>(), data_or_null<T>(bias), N, E, K);
    });
    FM_CHECK(nan_row < 0, "topk: row {} of scores + bias contains a NaN", nan_row);
  }

  void gather_cols(Tensor& out, const Tensor& x, const Tensor& ids) override {
    if (widened("gather_cols", {{&out, kOut}, {&x, kIn}},
                [&](auto& f) { gather_cols(f[0], f[1], ids); }))
      return;
    ArgCheck chk("gather_cols");
    const DType dt = chk.float_dtype("x", x, 2);
    const int64_t N = x.dim(0), E = x.dim(1);
    chk.cpu("ids", ids);
    FM_CHECK(ids.dtype() == DType::i32 && ids.rank() == 2 && ids.dim(0) == N,
             "gather_cols: ids must be i32[{}, K] but is {}", N, ids.describe());
    const int64_t K = ids.dim(1);
    chk.is("out", out, dt, {N, K});
    chk.ids_below("ids", ids, E);
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::gather_cols<T>(out.data<T>(), x.data<T>(), ids.data<int32_t>(), N, E, K);
    });
  }

  void scatter_add_cols(Tensor& dx, const Tensor& dout, const Tensor& ids) override {
    if (widened("scatter_add_cols", {{&dx, kInOut}, {&dout, kIn}},
                [&](auto& f) { scatter_add_cols(f[0], f[1], ids); }))
      return;
    ArgCheck chk("scatter_add_cols");
    const DType dt = chk.float_dtype("dx", dx, 2);
    const int64_t N = dx.dim(0), E = dx.dim(1);
    chk.cpu("ids", ids);
    FM_CHECK(ids.dtype() == DType::i32 && ids.rank() == 2 && ids.dim(0) == N,
             "scatter_add_cols: ids must be i32[{}, K] but is {}", N, ids.describe());
    const int64_t K = ids.dim(1);
    chk.is("dout", dout, dt, {N, K});
    chk.ids_below("ids", ids, E);
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::scatter_add_cols<T>(dx.data<T>(), dout.data<T>(), ids.data<int32_t>(), N, E, K);
    });
  }

  void normalize_rows_forward(Tensor& g, const Tensor& p) override {
    if (widened("normalize_rows_forward", {{&g, kOut}, {&p, kIn}},
                [&](auto& f) { normalize_rows_forward(f[0], f[1]); }))
      return;
    ArgCheck chk("normalize_rows_forward");
    const DType dt = chk.float_dtype("p", p, 2);
    chk.same("g", g, "p", p);
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::normalize_rows_forward<T>(g.data<T>(), p.data<T>(), p.dim(0), p.dim(1));
    });
  }

  void normalize_rows_backward(Tensor& dp, const Tensor& dg, const Tensor& p) override {
    if (widened("normalize_rows_backward", {{&dp, kOut}, {&dg, kIn}, {&p, kIn}},
                [&](auto& f) { normalize_rows_backward(f[0], f[1], f[2]); }))
      return;
    ArgCheck chk("normalize_rows_backward");
    const DType dt = chk.float_dtype("p", p, 2);
    chk.same("dg", dg, "p", p);
    chk.same("dp", dp, "p", p);
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::normalize_rows_backward<T>(dp.data<T>(), dg.data<T>(), p.data<T>(), p.dim(0), p.dim(1));
    });
  }

  // --- token permutation --------------------------------------------------------------------

  void gather_rows(Tensor& out, const Tensor& src, const Tensor& idx) override {
    if (widened("gather_rows", {{&out, kOut}, {&src, kIn}},
                [&](auto& f) { gather_rows(f[0], f[1], idx); }))
      return;
    ArgCheck chk("gather_rows");
    const DType dt = chk.float_dtype("src", src, 2);
    const int64_t R = src.dim(0), C = src.dim(1);
    chk.is("idx", idx, DType::i32, {idx.numel()});
    const int64_t M = idx.numel();
    chk.is("out", out, dt, {M, C});
    chk.ids_below("idx", idx, R);
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::gather_rows<T>(out.data<T>(), src.data<T>(), idx.data<int32_t>(), M, C);
    });
  }

  void scatter_rows(Tensor& dst, const Tensor& src, const Tensor& idx) override {
    if (widened("scatter_rows", {{&dst, kInOut}, {&src, kIn}},
                [&](auto& f) { scatter_rows(f[0], f[1], idx); }))
      return;
    ArgCheck chk("scatter_rows");
    const DType dt = chk.float_dtype("dst", dst, 2);
    const int64_t R = dst.dim(0), C = dst.dim(1);
    chk.is("idx", idx, DType::i32, {idx.numel()});
    const int64_t M = idx.numel();
    chk.is("src", src, dt, {M, C});
    chk.ids_below("idx", idx, R);
    std::vector<char> seen(static_cast<size_t>(R), 0);
    for (int64_t m = 0; m < M; ++m) {
      const int32_t r = idx.data<int32_t>()[m];
      FM_CHECK(!seen[r], "scatter_rows: idx[{}] = {} repeats an earlier destination row", m, r);
      seen[r] = 1;
    }
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::scatter_rows<T>(dst.data<T>(), src.data<T>(), idx.data<int32_t>(), M, C);
    });
  }

  void scatter_add_rows(Tensor& dst, const Tensor& src, const Tensor& idx,
                        const Tensor& w) override {
    if (widened("scatter_add_rows", {{&dst, kInOut}, {&src, kIn}, {&w, kIn}},
                [&](auto& f) { scatter_add_rows(f[0], f[1], idx, f[2]); }))
      return;
    ArgCheck chk("scatter_add_rows");
    const DType dt = chk.float_dtype("dst", dst, 2);
    const int64_t R = dst.dim(0), C = dst.dim(1);
    chk.is("idx", idx, DType::i32, {idx.numel()});
    const int64_t M = idx.numel();
    chk.is("src", src, dt, {M, C});
    if (w.defined()) chk.is("w", w, dt, {M});
    chk.ids_below("idx", idx, R);
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::scatter_add_rows<T>(dst.data<T>(), src.data<T>(), idx.data<int32_t>(),
                               data_or_null<T>(w), M, R, C);
    });
  }

  // --- LM head loss -------------------------------------------------------------------------

  // Targets are i32 [N] with every entry < V (negative = no target).
  static void check_targets(const ArgCheck& chk, const Tensor& targets, int64_t N, int64_t V) {
    chk.is("targets", targets, DType::i32, {N});
    const int32_t* t = targets.data<int32_t>();
    for (int64_t n = 0; n < N; ++n)
      FM_CHECK(t[n] < V, "{}: targets[{}] = {} is out of range (V = {}; negative = no target)",
               chk.op(), n, t[n], V);
  }

  void logprob_forward(Tensor& logp, Tensor& entropy, Tensor& lse, const Tensor& logits,
                       const Tensor& targets) override {
    if (widened("logprob_forward", {{&logp, kOut}, {&entropy, kOut}, {&lse, kOut}, {&logits, kIn}},
                [&](auto& f) { logprob_forward(f[0], f[1], f[2], f[3], targets); }))
      return;
    ArgCheck chk("logprob_forward");
    const DType dt = chk.float_dtype("logits", logits, 2);
    const int64_t N = logits.dim(0), V = logits.dim(1);
    FM_CHECK(V > 0, "logprob_forward: logits must have at least one column but is {}",
             logits.describe());
    check_targets(chk, targets, N, V);
    chk.is("logp", logp, dt, {N});
    chk.is("entropy", entropy, dt, {N});
    chk.is("lse", lse, dt, {N});
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::logprob_forward<T>(logp.data<T>(), entropy.data<T>(), lse.data<T>(), logits.data<T>(),
                              targets.data<int32_t>(), N, V);
    });
  }

  void logprob_backward(Tensor& dlogits, const Tensor& dlogp, const Tensor& dentropy,
                        const Tensor& logits, const Tensor& lse, const Tensor& targets) override {
    if (widened("logprob_backward",
                {{&dlogits, kOut}, {&dlogp, kIn}, {&dentropy, kIn}, {&logits, kIn}, {&lse, kIn}},
                [&](auto& f) { logprob_backward(f[0], f[1], f[2], f[3], f[4], targets); }))
      return;
    ArgCheck chk("logprob_backward");
    const DType dt = chk.float_dtype("logits", logits, 2);
    const int64_t N = logits.dim(0), V = logits.dim(1);
    check_targets(chk, targets, N, V);
    chk.same("dlogits", dlogits, "logits", logits);
    chk.is("dlogp", dlogp, dt, {N});
    if (dentropy.defined()) chk.is("dentropy", dentropy, dt, {N});
    chk.is("lse", lse, dt, {N});
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::logprob_backward<T>(dlogits.data<T>(), dlogp.data<T>(), data_or_null<T>(dentropy),
                               logits.data<T>(), lse.data<T>(), targets.data<int32_t>(), N, V);
    });
  }

  // --- optimizer ----------------------------------------------------------------------------

  void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr, double beta1,
                  double beta2, double eps, double weight_decay, int64_t step) override {
    if (widened("adamw_step", {{&param, kInOut}, {&grad, kIn}, {&m, kInOut}, {&v, kInOut}},
                [&](auto& f) {
                  adamw_step(f[0], f[1], f[2], f[3], lr, beta1, beta2, eps, weight_decay, step);
                }))
      return;
    ArgCheck chk("adamw_step");
    const DType dt = chk.float_dtype("param", param, param.rank());
    chk.same("grad", grad, "param", param);
    chk.same("m", m, "param", param);
    chk.same("v", v, "param", param);
    FM_CHECK(step >= 1, "adamw_step: step must be >= 1 (bias corrections use beta^step) but is {}",
             step);
    FM_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1,
             "adamw_step: beta1 and beta2 must be in [0, 1) but are {} and {}", beta1, beta2);
    const cpu::AdamWConfig cfg{lr, beta1, beta2, eps, weight_decay, step};
    dispatch(dt, [&](auto tag) {
      using T = decltype(tag);
      cpu::adamw_step<T>(param.data<T>(), grad.data<T>(), m.data<T>(), v.data<T>(), param.numel(),
                         cfg);
    });
  }

 private:
  // bf16 storage, f32 arithmetic (engine/mixed_precision.h). When some float argument is
  // bf16, runs `f32_form(f)` (f[i]: argument i widened to f32), narrows the outputs back
  // and returns true; otherwise returns false and the op runs as written. The f32 form's
  // argument checks see the widened copies (same shapes, dtype f32), and say so.
  template <class F>
  bool widened(const char* op, std::initializer_list<WidenedArgs::Arg> args, F&& f32_form) {
    WidenedArgs f(*this, op, args);
    if (!f.any()) return false;
    try {
      f32_form(f);
    } catch (const Error& e) {
      throw Error(fmt::format("{} (bf16 arguments are checked as their f32 widening)", e.what()));
    }
    f.finish();
    return true;
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() {
  return std::make_unique<CpuBackend>();
}

}  // namespace fm
