// The CPU reference backend's class, private to engine/cpu/: every Backend op for f32 and f64
// tensors (index tensors i32); bf16 tensors (engine/mixed_precision.h) run each op's f32 form
// on widened copies. The ops check arguments and dispatch on the dtype; the kernels, one
// template per op family, live in the headers next to this one. The op bodies are defined by
// family: cpu_backend.cpp (memory, elementwise and reductions, embedding, RMSNorm, RoPE,
// SwiGLU, AdamW; the factory), cpu_gemm_attention.cpp (dense and grouped GEMMs, attention),
// cpu_routing.cpp (router pieces, token permutation, the LM-head loss).
// Determinism: OpenBLAS runs single-threaded inside our own fixed tiling, and every OpenMP
// loop either writes independent outputs or reduces in a fixed order (see each header), so
// results are bit-identical for any thread count.
#pragma once

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

namespace fm::cpu {

// Calls f(T{}) with T = float or double for the dtype.
template <class F>
inline void dispatch(DType dtype, F&& f) {
  if (dtype == DType::f32)
    f(float{});
  else
    f(double{});
}

inline constexpr WidenedArgs::Role kIn = WidenedArgs::in, kOut = WidenedArgs::out,
                                   kInOut = WidenedArgs::inout;

template <class T>
inline const T* data_or_null(const Tensor& t) {
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

  // --- memory ---------------------------------------------------------------------------------
  void fill(Tensor& x, double value) override;
  void copy(Tensor& dst, const Tensor& src) override;

  // --- dense linear algebra -------------------------------------------------------------------
  void matmul(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, double alpha,
              double beta) override;
  void grouped_matmul(Tensor& y, const Tensor& x, const Tensor& w, bool trans_w,
                      const std::vector<int64_t>& off) override;
  void grouped_weight_grad(Tensor& dw, const Tensor& dy, const Tensor& x,
                           const std::vector<int64_t>& off) override;

  // --- elementwise and reductions -------------------------------------------------------------
  void axpy(Tensor& y, double alpha, const Tensor& x) override;
  void scale(Tensor& x, double alpha) override;
  double sum_squares(const Tensor& x) override;
  void rowwise_dot(Tensor& out, const Tensor& a, const Tensor& b) override;
  void column_sum(Tensor& out, const Tensor& x) override;
  void add_row_vector(Tensor& x, const Tensor& v, double alpha) override;
  void scale_rows(Tensor& out, const Tensor& x, const Tensor& w) override;

  // --- embedding ------------------------------------------------------------------------------
  void embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) override;
  void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) override;

  // --- RMSNorm --------------------------------------------------------------------------------
  void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w,
                       double eps) override;
  void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                        const Tensor& rstd) override;

  // --- rotary position embedding --------------------------------------------------------------
  void rope(Tensor& x, const Tensor& pos, double theta, bool inverse) override;

  // --- attention ------------------------------------------------------------------------------
  // Checks q, k, v, seq_off; returns the dims and each token's sequence span.
  static cpu::AttentionDims check_attention(const ArgCheck& chk, const Tensor& q, const Tensor& k,
                                            const Tensor& v, const Tensor& seq_off,
                                            cpu::TokenSpans* spans);
  void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                         const Tensor& v, const Tensor& seq_off, double scale) override;
  void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q,
                          const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                          const Tensor& seq_off, double scale) override;
  void attention_cached(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& slot, const Tensor& pos, double scale) override;

  // --- SwiGLU ---------------------------------------------------------------------------------
  void swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up) override;
  void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dh, const Tensor& gate,
                       const Tensor& up) override;

  // --- router pieces --------------------------------------------------------------------------
  void softmax_forward(Tensor& probs, const Tensor& logits) override;
  void softmax_backward(Tensor& dlogits, const Tensor& dprobs, const Tensor& probs) override;
  void topk(Tensor& ids, const Tensor& scores, const Tensor& bias) override;
  void gather_cols(Tensor& out, const Tensor& x, const Tensor& ids) override;
  void scatter_add_cols(Tensor& dx, const Tensor& dout, const Tensor& ids) override;
  void normalize_rows_forward(Tensor& g, const Tensor& p) override;
  void normalize_rows_backward(Tensor& dp, const Tensor& dg, const Tensor& p) override;

  // --- token permutation ----------------------------------------------------------------------
  void gather_rows(Tensor& out, const Tensor& src, const Tensor& idx) override;
  void scatter_rows(Tensor& dst, const Tensor& src, const Tensor& idx) override;
  void scatter_add_rows(Tensor& dst, const Tensor& src, const Tensor& idx,
                        const Tensor& w) override;

  // --- LM head loss ---------------------------------------------------------------------------
  // Targets are i32 [N] with every entry < V (negative = no target).
  static void check_targets(const ArgCheck& chk, const Tensor& targets, int64_t N, int64_t V);
  void logprob_forward(Tensor& logp, Tensor& entropy, Tensor& lse, const Tensor& logits,
                       const Tensor& targets) override;
  void logprob_backward(Tensor& dlogits, const Tensor& dlogp, const Tensor& dentropy,
                        const Tensor& logits, const Tensor& lse, const Tensor& targets) override;

  // --- optimizer ------------------------------------------------------------------------------
  void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr, double beta1,
                  double beta2, double eps, double weight_decay, int64_t step) override;

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

}  // namespace fm::cpu
