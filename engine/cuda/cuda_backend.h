// The CUDA backend's class, private to engine/cuda/: the op checks every op
// runs (device, dtype, shape) and the CudaBackend declaration. Its ops are
// defined by op family: inline here (memory, elementwise and reductions, RMSNorm, SwiGLU,
// softmax, AdamW), backend_gemm.cpp (matmul and the grouped expert GEMMs on cuBLASLt and
// cuBLAS: gemm_lt.h, gemm.h), backend_attention.cpp (embedding, RoPE, attention),
// backend_routing.cpp (top-k and the router's column ops, token permutation, the LM-head
// log-prob). Each calls the kernel launchers of its family (kernels.h and the family's own
// launcher header). Host compiler only (C++20).
//
// bf16 (engine/mixed_precision.h): the GEMMs run bf16 natively (f32 accumulation on tensor
// cores, a bf16 or f32 output); so do fill, convert, axpy, scale, RMSNorm (f32 rstd), SwiGLU,
// RoPE, the row copies (embedding_forward, gather_rows, scatter_rows) and the row sums
// (embedding_backward, scatter_add_rows) when their data tensors are all bf16, rowwise_dot
// with bf16 a, b (bf16 or f32 out), attention forward / backward / cached with bf16 q, k, v,
// out, gradients and KV cache and an f32 lse, the LM-head log-prob with bf16 logits and f32
// per-row values, and AdamW with a bf16 gradient and f32 param / m / v. Every other call
// with a bf16 argument runs the op's f32 form on widened copies (WidenedArgs) and rounds the
// outputs back, so it gives the CPU's bits wherever the f32 kernels do.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "engine/backend.h"
#include "engine/cuda/allocator.h"
#include "engine/cuda/check.h"
#include "engine/cuda/cudnn_sdpa.h"
#include "engine/cuda/gemm.h"
#include "engine/cuda/gemm_lt.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/staging.h"
#include "engine/error.h"
#include "engine/mixed_precision.h"

namespace fm::cuda {

inline constexpr WidenedArgs::Role kIn = WidenedArgs::in;
inline constexpr WidenedArgs::Role kOut = WidenedArgs::out;
inline constexpr WidenedArgs::Role kInOut = WidenedArgs::inout;

inline bool is_bf16(const Tensor& t) {
  return t.defined() && t.dtype() == DType::bf16;
}

// Calls f(T{}) with T = float or double for the tensor's dtype.
template <class F>
inline void dispatch_float(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32:
      f(float{});
      return;
    case DType::f64:
      f(double{});
      return;
    default:
      throw Error(fmt::format("CUDA backend: {}: dtype {} is not supported (f32 or f64 only)", op,
                              dtype_name(dt)));
  }
}

// Calls f(T{}) with T = float, double or bf16 (storage) for the tensor's dtype.
template <class F>
inline void dispatch_storage(DType dt, const char* op, F&& f) {
  if (dt == DType::bf16) return f(bf16{});
  dispatch_float(dt, op, std::forward<F>(f));
}

// Pointer into a tensor whose dtype was already checked.
template <class T>
inline T* ptr(Tensor& t) {
  return static_cast<T*>(t.raw());
}
template <class T>
inline const T* ptr(const Tensor& t) {
  return static_cast<const T*>(t.raw());
}

inline void check_shape(const Tensor& t, const Shape& expected, const char* op, const char* name) {
  FM_CHECK(t.shape() == expected, "CUDA backend: {}: {} is {}, expected shape {}", op, name,
           t.describe(), shape_str(expected));
}

inline void check_rank(const Tensor& t, int rank, const char* op, const char* name) {
  FM_CHECK(t.rank() == rank, "CUDA backend: {}: {} is {}, expected rank {}", op, name, t.describe(),
           rank);
}

inline void check_same_dtype(const Tensor& t, DType dt, const char* op, const char* name) {
  FM_CHECK(t.dtype() == dt, "CUDA backend: {}: {} is {}, expected dtype {}", op, name, t.describe(),
           dtype_name(dt));
}

// Same shape and dtype as ref.
inline void check_like(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  FM_CHECK(t.shape() == ref.shape() && t.dtype() == ref.dtype(),
           "CUDA backend: {}: {} is {}, expected {}", op, name, t.describe(),
           fmt::format("{}{}", dtype_name(ref.dtype()), shape_str(ref.shape())));
}

// off: G + 1 non-decreasing row offsets from 0 to rows.
inline void check_offsets(const std::vector<int64_t>& off, int64_t groups, int64_t rows,
                          const char* op) {
  FM_CHECK(static_cast<int64_t>(off.size()) == groups + 1,
           "CUDA backend: {}: off has {} entries, expected G + 1 = {}", op, off.size(), groups + 1);
  FM_CHECK(off.front() == 0 && off.back() == rows,
           "CUDA backend: {}: off must run from 0 to rows = {}, got {} .. {}", op, rows,
           off.front(), off.back());
  for (size_t g = 0; g + 1 < off.size(); ++g)
    FM_CHECK(off[g] <= off[g + 1], "CUDA backend: {}: off decreases at group {} ({} > {})", op, g,
             off[g], off[g + 1]);
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int index) : index_(index) {
    try {
      FM_CUDA_CHECK(cudaSetDevice(index_));
      FM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      FM_CUBLAS_CHECK(cublasCreate(&cublas_));
      FM_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
      // Default math: full fp32 for sgemm (TF32 only when asked for). cuBLAS results
      // are bit-reproducible run to run on one GPU model and toolkit version.
      FM_CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
      FM_CUDA_CHECK(cudaMalloc(&scratch_, sizeof(double) * (1 + cuda::kSumSquaresBlocks)));
      FM_CUDA_CHECK(cudaMalloc(&deferred_, sizeof(int64_t) * kDeferredChecks));
      FM_CUDA_CHECK(cudaMemset(deferred_, 0xff, sizeof(int64_t) * kDeferredChecks));  // -1
      lt_ = std::make_unique<LtGemm>();
      staging_ = std::make_unique<StagingRing>();
    } catch (...) {
      release();
      throw;
    }
    set_allocator(DeviceKind::cuda, cuda::cuda_allocator());
  }
  ~CudaBackend() override { release(); }

  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  Device device() const override { return Device::cuda(index_); }
  const char* name() const override { return "cuda"; }

  // The device and stream become the calling thread's (cheap; lets backends on different
  // devices share a thread, and points the caching allocator at this stream's pool).
  void activate() const override {
    FM_CUDA_CHECK(cudaSetDevice(index_));
    set_current_stream(stream_);
  }

  void synchronize() override {
    activate();
    FM_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // --- memory ---------------------------------------------------------------
  void fill(Tensor& x, double value) override {
    on_device(x, "fill", "x");
    activate();
    switch (x.dtype()) {
      case DType::f32:
        cuda::launch_fill(ptr<float>(x), x.numel(), static_cast<float>(value), stream_);
        return;
      case DType::f64:
        cuda::launch_fill(ptr<double>(x), x.numel(), value, stream_);
        return;
      case DType::i32:
        cuda::launch_fill(ptr<int32_t>(x), x.numel(), static_cast<int32_t>(value), stream_);
        return;
      case DType::bf16:  // the CPU's bits: value -> f32 -> bf16, to nearest even
        cuda::launch_fill(ptr<uint16_t>(x), x.numel(), f32_to_bf16(static_cast<float>(value)),
                          stream_);
        return;
      default:
        throw Error(
            fmt::format("CUDA backend: fill: dtype {} is not supported (f32, f64, bf16, i32)",
                        dtype_name(x.dtype())));
    }
  }

  // Device -> host copies wait for the stream before returning: the host side is then safe
  // to read. Host -> device copies of up to StagingRing::kMaxCopyBytes are copied into the
  // backend's pinned staging ring and queued (staging.h): the host side may be reused or
  // freed at once and the stream does not drain; larger ones wait for the stream. Device ->
  // device copies are queued on the stream.
  void copy(Tensor& dst, const Tensor& src) override {
    FM_CHECK(dst.defined() && src.defined(), "CUDA backend: copy: undefined tensor");
    FM_CHECK(dst.shape() == src.shape() && dst.dtype() == src.dtype(),
             "CUDA backend: copy: dst {} and src {} differ in shape or dtype", dst.describe(),
             src.describe());
    reachable(dst, "copy", "dst");
    reachable(src, "copy", "src");
    const size_t bytes = src.nbytes();
    if (bytes == 0) return;
    if (dst.is_cpu() && src.is_cpu()) {
      std::memcpy(dst.raw(), src.raw(), bytes);
      return;
    }
    activate();
    if (!dst.is_cpu() && !src.is_cpu() && dst.device().index != src.device().index) {
      FM_CUDA_CHECK(cudaMemcpyPeerAsync(dst.raw(), dst.device().index, src.raw(),
                                        src.device().index, bytes, stream_));
      return;
    }
    const cudaMemcpyKind kind = dst.is_cpu()   ? cudaMemcpyDeviceToHost
                                : src.is_cpu() ? cudaMemcpyHostToDevice
                                               : cudaMemcpyDeviceToDevice;
    if (kind == cudaMemcpyHostToDevice && dst.device().index == index_ &&
        staging_->copy_to_device(dst.raw(), src.raw(), bytes, stream_))
      return;
    FM_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), bytes, kind, stream_));
    if (kind != cudaMemcpyDeviceToDevice) FM_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  int64_t staged_uploads() const { return static_cast<int64_t>(staging_->copies()); }

  // Between float dtypes on this device: one kernel (convert.cu). Anything touching the
  // host or another device goes through the host (Backend::convert).
  void convert(Tensor& dst, const Tensor& src) override {
    if (!dst.defined() || !src.defined() || dst.device() != device() || src.device() != device())
      return Backend::convert(dst, src);
    FM_CHECK(dst.shape() == src.shape(), "CUDA backend: convert: dst {} and src {} differ in shape",
             dst.describe(), src.describe());
    for (const Tensor* t : {static_cast<const Tensor*>(&dst), &src})
      FM_CHECK(t->dtype() == DType::f32 || t->dtype() == DType::f64 || t->dtype() == DType::bf16,
               "CUDA backend: convert: {} is not a float tensor this engine converts (f32, f64, "
               "bf16)",
               t->describe());
    if (dst.dtype() == src.dtype()) return copy(dst, src);
    activate();
    dispatch_storage(dst.dtype(), "convert", [&](auto to_tag) {
      dispatch_storage(src.dtype(), "convert", [&](auto from_tag) {
        using To = decltype(to_tag);
        using From = decltype(from_tag);
        if constexpr (!std::is_same_v<To, From>)
          cuda::launch_convert<To, From>(ptr<To>(dst), ptr<From>(src), src.numel(), stream_);
      });
    });
  }

  // --- dense linear algebra (backend_gemm.cpp) -----------------------------------
  void matmul(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, double alpha,
              double beta) override;
  void grouped_matmul(Tensor& y, const Tensor& x, const Tensor& w, bool trans_w,
                      const std::vector<int64_t>& off) override;
  void grouped_weight_grad(Tensor& dw, const Tensor& dy, const Tensor& x,
                           const std::vector<int64_t>& off) override;
  // bf16 x and w (bf16 or f32 y): grouped_gemm.cu's tensor-core kernel; all-f32 or all-f64:
  // its SIMT kernel; other dtype mixes: the default (offsets downloaded, grouped_matmul).
  void grouped_matmul_device(Tensor& y, const Tensor& x, const Tensor& w, bool trans_w,
                             const Tensor& off) override;
  void set_device_index_checks(bool on) override { index_checks_ = on; }
  bool device_index_checks() const override { return index_checks_; }
  void raise_deferred_errors() override;

  void set_dense_gemm(CudaDenseGemm api) { dense_gemm_ = api; }
  void set_grouped_wgrad(CudaGroupedWgrad path) { grouped_wgrad_ = path; }
  const CudaGemmStats& gemm_stats() const { return gemm_stats_; }
  void set_attention(CudaAttention path) { attention_ = path; }
  CudaAttentionStats attention_stats() const {
    CudaAttentionStats s = attention_stats_;
    s.cudnn_plans = sdpa_ ? static_cast<int64_t>(sdpa_->plans()) : 0;
    return s;
  }

  // --- elementwise and reductions ----------------------------------------------
  void axpy(Tensor& y, double alpha, const Tensor& x) override {
    on_device(y, "axpy", "y");
    on_device(x, "axpy", "x");
    if (!(is_bf16(y) && is_bf16(x)))
      if (WidenedArgs w(*this, "axpy", {{&y, kInOut}, {&x, kIn}}); w.any()) {
        axpy(w[0], alpha, w[1]);
        return w.finish();
      }
    check_like(x, y, "axpy", "x");
    activate();
    dispatch_storage(y.dtype(), "axpy", [&](auto tag) {
      using T = decltype(tag);
      using C = cuda::compute_t<T>;
      cuda::launch_axpy<T>(ptr<T>(y), static_cast<C>(alpha), ptr<T>(x), y.numel(), stream_);
    });
  }

  void scale(Tensor& x, double alpha) override {
    on_device(x, "scale", "x");
    activate();
    dispatch_storage(x.dtype(), "scale", [&](auto tag) {
      using T = decltype(tag);
      using C = cuda::compute_t<T>;
      cuda::launch_scale<T>(ptr<T>(x), static_cast<C>(alpha), x.numel(), stream_);
    });
  }

  double sum_squares(const Tensor& x) override {
    on_device(x, "sum_squares", "x");
    if (WidenedArgs w(*this, "sum_squares", {{&x, kIn}}); w.any()) return sum_squares(w[0]);
    activate();
    dispatch_float(x.dtype(), "sum_squares", [&](auto tag) {
      using T = decltype(tag);
      cuda::launch_sum_squares<T>(scratch_, scratch_ + 1, ptr<T>(x), x.numel(), stream_);
    });
    double result = 0.0;
    FM_CUDA_CHECK(
        cudaMemcpyAsync(&result, scratch_, sizeof(double), cudaMemcpyDeviceToHost, stream_));
    FM_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return result;
  }

  void rowwise_dot(Tensor& out, const Tensor& a, const Tensor& b) override {
    const char* op = "rowwise_dot";
    on_device(out, op, "out");
    on_device(a, op, "a");
    on_device(b, op, "b");
    // bf16 a, b with a bf16 or f32 out: native (summed in f32, rounded once).
    const bool native_bf16 =
        is_bf16(a) && is_bf16(b) && (is_bf16(out) || out.dtype() == DType::f32);
    if (!native_bf16)
      if (WidenedArgs w(*this, op, {{&out, kOut}, {&a, kIn}, {&b, kIn}}); w.any()) {
        rowwise_dot(w[0], w[1], w[2]);
        return w.finish();
      }
    check_rank(a, 2, op, "a");
    check_like(b, a, op, "b");
    check_shape(out, {a.dim(0)}, op, "out");
    activate();
    if (native_bf16) {
      using T = cuda::bf16;
      if (out.dtype() == DType::f32)
        cuda::launch_rowwise_dot<T, float>(ptr<float>(out), ptr<T>(a), ptr<T>(b), a.dim(0),
                                           a.dim(1), stream_);
      else
        cuda::launch_rowwise_dot<T, T>(ptr<T>(out), ptr<T>(a), ptr<T>(b), a.dim(0), a.dim(1),
                                       stream_);
      return;
    }
    check_same_dtype(out, a.dtype(), op, "out");
    dispatch_float(out.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      cuda::launch_rowwise_dot<T>(ptr<T>(out), ptr<T>(a), ptr<T>(b), a.dim(0), a.dim(1), stream_);
    });
  }

  void column_sum(Tensor& out, const Tensor& x) override {
    const char* op = "column_sum";
    on_device(out, op, "out");
    on_device(x, op, "x");
    if (WidenedArgs w(*this, op, {{&out, kOut}, {&x, kIn}}); w.any()) {
      column_sum(w[0], w[1]);
      return w.finish();
    }
    check_rank(x, 2, op, "x");
    check_shape(out, {x.dim(1)}, op, "out");
    check_same_dtype(x, out.dtype(), op, "x");
    activate();
    dispatch_float(out.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      cuda::launch_column_sum<T>(ptr<T>(out), ptr<T>(x), x.dim(0), x.dim(1), stream_);
    });
  }

  void add_row_vector(Tensor& x, const Tensor& v, double alpha) override {
    const char* op = "add_row_vector";
    on_device(x, op, "x");
    on_device(v, op, "v");
    if (WidenedArgs w(*this, op, {{&x, kInOut}, {&v, kIn}}); w.any()) {
      add_row_vector(w[0], w[1], alpha);
      return w.finish();
    }
    check_rank(x, 2, op, "x");
    check_shape(v, {x.dim(1)}, op, "v");
    check_same_dtype(v, x.dtype(), op, "v");
    activate();
    dispatch_float(x.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      cuda::launch_add_row_vector<T>(ptr<T>(x), ptr<T>(v), static_cast<T>(alpha), x.dim(0),
                                     x.dim(1), stream_);
    });
  }

  // --- embedding (backend_attention.cpp)
  // ----------------------------------------------------------------
  void embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) override;
  void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) override;

  // --- RMSNorm --------------------------------------------------------------------
  void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w,
                       double eps) override {
    const char* op = "rmsnorm_forward";
    on_device(y, op, "y");
    on_device(rstd, op, "rstd");
    on_device(x, op, "x");
    on_device(w, op, "w");
    const bool native_bf16 = is_bf16(x) && is_bf16(y) && is_bf16(w) && rstd.dtype() == DType::f32;
    if (!native_bf16)
      if (WidenedArgs wa(*this, op, {{&y, kOut}, {&rstd, kOut}, {&x, kIn}, {&w, kIn}}); wa.any()) {
        rmsnorm_forward(wa[0], wa[1], wa[2], wa[3], eps);
        return wa.finish();
      }
    check_rank(x, 2, op, "x");
    const int64_t n = x.dim(0), c = x.dim(1);
    check_like(y, x, op, "y");
    check_shape(w, {c}, op, "w");
    check_shape(rstd, {n}, op, "rstd");
    check_same_dtype(w, x.dtype(), op, "w");
    check_same_dtype(rstd, native_bf16 ? DType::f32 : x.dtype(), op, "rstd");
    activate();
    dispatch_storage(x.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      using C = cuda::compute_t<T>;
      cuda::launch_rmsnorm_forward<T>(ptr<T>(y), ptr<C>(rstd), ptr<T>(x), ptr<T>(w),
                                      static_cast<C>(eps), n, c, stream_);
    });
  }

  void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                        const Tensor& rstd) override {
    const char* op = "rmsnorm_backward";
    on_device(dx, op, "dx");
    on_device(dw, op, "dw");
    on_device(dy, op, "dy");
    on_device(x, op, "x");
    on_device(w, op, "w");
    on_device(rstd, op, "rstd");
    const bool native_bf16 = is_bf16(dx) && is_bf16(dy) && is_bf16(x) && is_bf16(w) &&
                             (is_bf16(dw) || dw.dtype() == DType::f32) &&
                             rstd.dtype() == DType::f32;
    if (!native_bf16)
      if (WidenedArgs wa(
              *this, op,
              {{&dx, kOut}, {&dw, kInOut}, {&dy, kIn}, {&x, kIn}, {&w, kIn}, {&rstd, kIn}});
          wa.any()) {
        rmsnorm_backward(wa[0], wa[1], wa[2], wa[3], wa[4], wa[5]);
        return wa.finish();
      }
    check_rank(x, 2, op, "x");
    const int64_t n = x.dim(0), c = x.dim(1);
    check_like(dx, x, op, "dx");
    check_like(dy, x, op, "dy");
    check_shape(w, {c}, op, "w");
    check_same_dtype(w, x.dtype(), op, "w");
    check_shape(rstd, {n}, op, "rstd");
    activate();
    if (native_bf16) {
      check_shape(dw, {c}, op, "dw");
      using T = cuda::bf16;
      if (dw.dtype() == DType::f32)
        cuda::launch_rmsnorm_backward<T, float>(ptr<T>(dx), ptr<float>(dw), ptr<T>(dy), ptr<T>(x),
                                                ptr<T>(w), ptr<float>(rstd), n, c, stream_);
      else
        cuda::launch_rmsnorm_backward<T, T>(ptr<T>(dx), ptr<T>(dw), ptr<T>(dy), ptr<T>(x),
                                            ptr<T>(w), ptr<float>(rstd), n, c, stream_);
      return;
    }
    check_like(dw, w, op, "dw");
    check_same_dtype(rstd, x.dtype(), op, "rstd");
    dispatch_float(x.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      cuda::launch_rmsnorm_backward<T>(ptr<T>(dx), ptr<T>(dw), ptr<T>(dy), ptr<T>(x), ptr<T>(w),
                                       ptr<T>(rstd), n, c, stream_);
    });
  }

  // --- rotary position embedding, attention (backend_attention.cpp)
  // ----------------------------------------
  void rope(Tensor& x, const Tensor& pos, double theta, bool inverse) override;
  void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                         const Tensor& v, const Tensor& seq_off, double scale) override;
  void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q,
                          const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                          const Tensor& seq_off, double scale) override;
  void attention_cached(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& slot, const Tensor& pos, double scale) override;

  // --- SwiGLU ------------------------------------------------------------------------
  void swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up) override {
    const char* op = "swiglu_forward";
    on_device(h, op, "h");
    on_device(gate, op, "gate");
    on_device(up, op, "up");
    if (!(is_bf16(h) && is_bf16(gate) && is_bf16(up)))
      if (WidenedArgs w(*this, op, {{&h, kOut}, {&gate, kIn}, {&up, kIn}}); w.any()) {
        swiglu_forward(w[0], w[1], w[2]);
        return w.finish();
      }
    check_like(gate, h, op, "gate");
    check_like(up, h, op, "up");
    activate();
    dispatch_storage(h.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      cuda::launch_swiglu_forward<T>(ptr<T>(h), ptr<T>(gate), ptr<T>(up), h.numel(), stream_);
    });
  }

  void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dh, const Tensor& gate,
                       const Tensor& up) override {
    const char* op = "swiglu_backward";
    on_device(dgate, op, "dgate");
    on_device(dup, op, "dup");
    on_device(dh, op, "dh");
    on_device(gate, op, "gate");
    on_device(up, op, "up");
    if (!(is_bf16(dgate) && is_bf16(dup) && is_bf16(dh) && is_bf16(gate) && is_bf16(up)))
      if (WidenedArgs w(*this, op,
                        {{&dgate, kOut}, {&dup, kOut}, {&dh, kIn}, {&gate, kIn}, {&up, kIn}});
          w.any()) {
        swiglu_backward(w[0], w[1], w[2], w[3], w[4]);
        return w.finish();
      }
    check_like(dgate, dh, op, "dgate");
    check_like(dup, dh, op, "dup");
    check_like(gate, dh, op, "gate");
    check_like(up, dh, op, "up");
    activate();
    dispatch_storage(dh.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      cuda::launch_swiglu_backward<T>(ptr<T>(dgate), ptr<T>(dup), ptr<T>(dh), ptr<T>(gate),
                                      ptr<T>(up), dh.numel(), stream_);
    });
  }

  // --- router pieces --------------------------------------------------------------------
  void softmax_forward(Tensor& probs, const Tensor& logits) override {
    const char* op = "softmax_forward";
    on_device(probs, op, "probs");
    on_device(logits, op, "logits");
    if (WidenedArgs w(*this, op, {{&probs, kOut}, {&logits, kIn}}); w.any()) {
      softmax_forward(w[0], w[1]);
      return w.finish();
    }
    check_rank(logits, 2, op, "logits");
    check_like(probs, logits, op, "probs");
    activate();
    dispatch_float(logits.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      cuda::launch_softmax_forward<T>(ptr<T>(probs), ptr<T>(logits), logits.dim(0), logits.dim(1),
                                      stream_);
    });
  }

  void softmax_backward(Tensor& dlogits, const Tensor& dprobs, const Tensor& probs) override {
    const char* op = "softmax_backward";
    on_device(dlogits, op, "dlogits");
    on_device(dprobs, op, "dprobs");
    on_device(probs, op, "probs");
    if (WidenedArgs w(*this, op, {{&dlogits, kOut}, {&dprobs, kIn}, {&probs, kIn}}); w.any()) {
      softmax_backward(w[0], w[1], w[2]);
      return w.finish();
    }
    check_rank(probs, 2, op, "probs");
    check_like(dprobs, probs, op, "dprobs");
    check_like(dlogits, probs, op, "dlogits");
    activate();
    dispatch_float(probs.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      cuda::launch_softmax_backward<T>(ptr<T>(dlogits), ptr<T>(dprobs), ptr<T>(probs), probs.dim(0),
                                       probs.dim(1), stream_);
    });
  }

  void topk(Tensor& ids, const Tensor& scores, const Tensor& bias) override;
  void gather_cols(Tensor& out, const Tensor& x, const Tensor& ids) override;
  void scatter_add_cols(Tensor& dx, const Tensor& dout, const Tensor& ids) override;
  void normalize_rows_forward(Tensor& g, const Tensor& p) override;
  void normalize_rows_backward(Tensor& dp, const Tensor& dg, const Tensor& p) override;

  // --- token permutation, LM head loss ----------------------------------------------------
  void gather_rows(Tensor& out, const Tensor& src, const Tensor& idx) override;
  void scatter_rows(Tensor& dst, const Tensor& src, const Tensor& idx) override;
  void scatter_add_rows(Tensor& dst, const Tensor& src, const Tensor& idx,
                        const Tensor& w) override;
  void sort_assignments(Tensor& offsets, Tensor& perm_assign, Tensor& perm_token,
                        const Tensor& key) override;
  void logprob_forward(Tensor& logp, Tensor& entropy, Tensor& lse, const Tensor& logits,
                       const Tensor& targets) override;
  void logprob_backward(Tensor& dlogits, const Tensor& dlogp, const Tensor& dentropy,
                        const Tensor& logits, const Tensor& lse, const Tensor& targets) override;

  // --- next-token sampling (sampling.cu) -----------------------------------------------------
  bool samples_on_device() const override { return true; }
  void sample_rows(Tensor& ids, Tensor& logp, Tensor& model_logp, const Tensor& logits,
                   const Tensor& u, const SamplingParams& params) override;

  // --- optimizer --------------------------------------------------------------------------
  void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr, double beta1,
                  double beta2, double eps, double weight_decay, int64_t step) override {
    const char* op = "adamw_step";
    on_device(param, op, "param");
    on_device(grad, op, "grad");
    on_device(m, op, "m");
    on_device(v, op, "v");
    // f32 state with a bf16 gradient: native (the gradient is widened as it is loaded).
    const bool bf16_grad = is_bf16(grad) && param.dtype() == DType::f32 &&
                           m.dtype() == DType::f32 && v.dtype() == DType::f32;
    if (!bf16_grad)
      if (WidenedArgs w(*this, op, {{&param, kInOut}, {&grad, kIn}, {&m, kInOut}, {&v, kInOut}});
          w.any()) {
        adamw_step(w[0], w[1], w[2], w[3], lr, beta1, beta2, eps, weight_decay, step);
        return w.finish();
      }
    check_same_dtype(param, DType::f32, op, "param");
    check_shape(grad, param.shape(), op, "grad");
    if (!bf16_grad) check_same_dtype(grad, DType::f32, op, "grad");
    check_like(m, param, op, "m");
    check_like(v, param, op, "v");
    FM_CHECK(step >= 1, "CUDA backend: adamw_step: step must be >= 1, got {}", step);
    const cuda::AdamWParams p{static_cast<float>(lr),
                              static_cast<float>(beta1),
                              static_cast<float>(beta2),
                              static_cast<float>(eps),
                              static_cast<float>(weight_decay),
                              static_cast<float>(1.0 - std::pow(beta1, static_cast<double>(step))),
                              static_cast<float>(1.0 - std::pow(beta2, static_cast<double>(step)))};
    activate();
    if (bf16_grad)
      cuda::launch_adamw_step(ptr<float>(param), ptr<cuda::bf16>(grad), ptr<float>(m),
                              ptr<float>(v), param.numel(), p, stream_);
    else
      cuda::launch_adamw_step(ptr<float>(param), ptr<float>(grad), ptr<float>(m), ptr<float>(v),
                              param.numel(), p, stream_);
  }

 private:
  // An op's tensors must live on this backend's device.
  void on_device(const Tensor& t, const char* op, const char* name) const {
    FM_CHECK(t.defined(), "CUDA backend: {}: {} is undefined", op, name);
    FM_CHECK(t.device() == device(), "CUDA backend: {}: {} is {}, expected a tensor on {}", op,
             name, t.describe(), device_name(device()));
  }
  // copy() also reaches host memory and other CUDA devices.
  // The dense matmul on cuBLASLt when that is the chosen API and the problem is not empty
  // (k == 0 and empty outputs stay on gemm.h's path); false: run classic cuBLAS.
  bool run_lt(const cuda::TypedGemm& p, double alpha, double beta);
  // All problems of a grouped op in one cuBLAS call (alpha 1), pointer arrays in a scratch
  // buffer from the caching allocator (stream-ordered, so freeing it after the call is safe).
  template <class T>
  void grouped_gemm(const std::vector<cuda::GemmProblem<T>>& problems, double beta);
  void grouped_gemm_bf16(const std::vector<cuda::TypedGemm>& problems, double beta);
  // grouped_weight_grad's bf16 dy and x on CudaGroupedWgrad::kernel (grouped_gemm.cu): the
  // offsets uploaded as i32 through the staging ring, then every group in one launch.
  void grouped_weight_grad_kernel(Tensor& dw, const Tensor& dy, const Tensor& x,
                                  const std::vector<int64_t>& off);

  void reachable(const Tensor& t, const char* op, const char* name) const {
    FM_CHECK(t.is_cpu() || t.device().kind == DeviceKind::cuda,
             "CUDA backend: {}: {} is {}, which this backend cannot reach", op, name, t.describe());
  }

  // Destructor path: must not throw, so errors are ignored here (a sticky
  // device fault has already been reported by the op that caused it).
  void release() noexcept {
    if (cudaSetDevice(index_) != cudaSuccess) (void)cudaGetLastError();
    if (stream_ != nullptr && cudaStreamSynchronize(stream_) != cudaSuccess)
      (void)cudaGetLastError();
    if (scratch_ != nullptr) (void)cudaFree(scratch_);
    if (deferred_ != nullptr) (void)cudaFree(deferred_);
    deferred_ = nullptr;
    if (cublas_ != nullptr) (void)cublasDestroy(cublas_);
    lt_.reset();
    sdpa_.reset();
    staging_.reset();  // after the stream sync above: no DMA reads the ring any more
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    scratch_ = nullptr;
    cublas_ = nullptr;
    stream_ = nullptr;
  }

  int index_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  double* scratch_ = nullptr;   // sum_squares: [0] the result, [1 ..] the per-block partials
  std::unique_ptr<LtGemm> lt_;  // the dense matmul's cuBLASLt handle, workspace and plans
  std::unique_ptr<StagingRing> staging_;  // pinned host staging for uploads
  CudaDenseGemm dense_gemm_ = CudaDenseGemm::lt;
  CudaGroupedWgrad grouped_wgrad_ = CudaGroupedWgrad::cublas;
  // attention_forward / attention_backward in bf16: cuDNN where the build has it
  // (backend_attention.cpp); the handle and plans are made on the first such call.
  CudaAttention attention_ = CudnnSdpa::available() ? CudaAttention::cudnn : CudaAttention::kernel;
  std::unique_ptr<CudnnSdpa> sdpa_;
  CudaAttentionStats attention_stats_;
  // Runs the problem on cuDNN when the path is cudnn and cuDNN has a plan for it; false
  // (counted, with the reason) otherwise, and the caller runs its kernel.
  bool try_cudnn_attention(const char* op, SdpaProblem problem, const std::vector<int32_t>& off,
                           SdpaArgs args);
  bool index_checks_ = true;  // Backend::set_device_index_checks
  // The checks deferred while index checks are off (raise_deferred_errors): per check, the
  // first bad row or position a kernel found since the last raise, -1 for none.
  enum DeferredCheck { kTopkNan, kSortKeyRange, kDeferredChecks };
  int64_t* deferred_ = nullptr;
  // Where an op's kernel reports the first bad row (-1: none): with index checks on, a fresh
  // word (set to -1 here) that the op reads back after the kernel; off, the check's deferred
  // word, and the op returns without waiting.
  struct StatusWord {
    Tensor owned;  // the fresh word; undefined when deferred
    int64_t* word;
    bool deferred() const { return !owned.defined(); }
  };
  StatusWord status_word(DeferredCheck check);
  CudaGemmStats gemm_stats_;
};

}  // namespace fm::cuda
