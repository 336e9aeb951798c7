// The CUDA backend's class, private to engine/cuda/: the op checks every op
// runs (device, dtype, shape) and the CudaBackend declaration. Its ops are
// defined by op family: cuda_backend.cpp (memory, GEMMs, elementwise and
// reductions, RMSNorm, SwiGLU, softmax, AdamW), backend_attention.cpp
// (embedding, RoPE, attention), backend_routing.cpp (top-k and the router's
// column ops, token permutation, the LM-head log-prob). Each calls the kernel
// launchers of its family (kernels.h and the family's own launcher header)
// and cuBLAS (gemm.h). Host compiler only (C++20).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "engine/backend.h"
#include "engine/cuda/allocator.h"
#include "engine/cuda/check.h"
#include "engine/cuda/gemm.h"
#include "engine/cuda/kernels.h"
#include "engine/error.h"

namespace fm::cuda {

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
      default:
        throw Error(fmt::format("CUDA backend: fill: dtype {} is not supported (f32, f64, i32)",
                                dtype_name(x.dtype())));
    }
  }

  // Host <-> device copies wait for the stream before returning: the host side
  // is then safe to read (D2H) or to reuse or free (H2D, whatever kind of host
  // memory it is). Device -> device copies are queued on the stream.
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
    FM_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), bytes, kind, stream_));
    if (kind != cudaMemcpyDeviceToDevice) FM_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // --- dense linear algebra ---------------------------------------------------
  void matmul(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, double alpha,
              double beta) override {
    const char* op = "matmul";
    on_device(c, op, "c");
    on_device(a, op, "a");
    on_device(b, op, "b");
    check_rank(a, 2, op, "a");
    check_rank(b, 2, op, "b");
    check_rank(c, 2, op, "c");
    const int64_t m = trans_a ? a.dim(1) : a.dim(0);
    const int64_t k = trans_a ? a.dim(0) : a.dim(1);
    const int64_t kb = trans_b ? b.dim(1) : b.dim(0);
    const int64_t n = trans_b ? b.dim(0) : b.dim(1);
    FM_CHECK(k == kb,
             "CUDA backend: matmul: inner dimensions differ: op(a) is [{}, {}], op(b) is "
             "[{}, {}] (a {}, trans_a {}, b {}, trans_b {})",
             m, k, kb, n, a.describe(), trans_a, b.describe(), trans_b);
    check_shape(c, {m, n}, op, "c");
    check_same_dtype(a, c.dtype(), op, "a");
    check_same_dtype(b, c.dtype(), op, "b");
    activate();
    dispatch_float(c.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      cuda::gemm_row_major<T>(cublas_, stream_, ptr<T>(c), n, ptr<T>(a), a.dim(1), trans_a,
                              ptr<T>(b), b.dim(1), trans_b, m, n, k, alpha, beta);
    });
  }

  // All problems of a grouped op in one cuBLAS call (alpha 1), pointer arrays in a scratch
  // buffer from the caching allocator (stream-ordered, so freeing it after the call is safe).
  template <class T>
  void grouped_gemm(const std::vector<cuda::GemmProblem<T>>& problems, double beta) {
    if (problems.empty()) return;
    const size_t bytes = cuda::gemm_grouped_workspace_bytes(problems.size());
    Tensor pointers = empty({static_cast<int64_t>(bytes)}, DType::u8);
    cuda::gemm_grouped_row_major<T>(cublas_, stream_, problems, 1.0, beta, pointers.raw(), bytes);
  }

  void grouped_matmul(Tensor& y, const Tensor& x, const Tensor& w, bool trans_w,
                      const std::vector<int64_t>& off) override {
    const char* op = "grouped_matmul";
    on_device(y, op, "y");
    on_device(x, op, "x");
    on_device(w, op, "w");
    check_rank(x, 2, op, "x");
    check_rank(w, 3, op, "w");
    const int64_t groups = w.dim(0), r = w.dim(1), s = w.dim(2);
    const int64_t rows = x.dim(0);
    const int64_t k = trans_w ? s : r;  // x_g [m_g, k] @ op(w[g]) [k, n]
    const int64_t n = trans_w ? r : s;
    check_shape(x, {rows, k}, op, "x");
    check_shape(y, {rows, n}, op, "y");
    check_same_dtype(x, y.dtype(), op, "x");
    check_same_dtype(w, y.dtype(), op, "w");
    check_offsets(off, groups, rows, op);
    activate();
    dispatch_float(y.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      std::vector<cuda::GemmProblem<T>> problems;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t m = off[g + 1] - off[g];
        if (m == 0) continue;
        problems.push_back({ptr<T>(y) + off[g] * n, n, ptr<T>(x) + off[g] * k, k, false,
                            ptr<T>(w) + g * r * s, s, trans_w, m, n, k});
      }
      grouped_gemm(problems, 0.0);
    });
  }

  void grouped_weight_grad(Tensor& dw, const Tensor& dy, const Tensor& x,
                           const std::vector<int64_t>& off) override {
    const char* op = "grouped_weight_grad";
    on_device(dw, op, "dw");
    on_device(dy, op, "dy");
    on_device(x, op, "x");
    check_rank(dw, 3, op, "dw");
    check_rank(dy, 2, op, "dy");
    const int64_t groups = dw.dim(0), r = dw.dim(1), s = dw.dim(2);
    const int64_t rows = dy.dim(0);
    check_shape(dy, {rows, r}, op, "dy");
    check_shape(x, {rows, s}, op, "x");
    check_same_dtype(dy, dw.dtype(), op, "dy");
    check_same_dtype(x, dw.dtype(), op, "x");
    check_offsets(off, groups, rows, op);
    activate();
    dispatch_float(dw.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      std::vector<cuda::GemmProblem<T>> problems;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t m = off[g + 1] - off[g];
        if (m == 0) continue;  // dw[g] += 0
        // dw[g] [r, s] += dy_g^T [r, m] @ x_g [m, s]
        problems.push_back({ptr<T>(dw) + g * r * s, s, ptr<T>(dy) + off[g] * r, r, true,
                            ptr<T>(x) + off[g] * s, s, false, r, s, m});
      }
      grouped_gemm(problems, 1.0);
    });
  }

  // --- elementwise and reductions ----------------------------------------------
  void axpy(Tensor& y, double alpha, const Tensor& x) override {
    on_device(y, "axpy", "y");
    on_device(x, "axpy", "x");
    check_like(x, y, "axpy", "x");
    activate();
    dispatch_float(y.dtype(), "axpy", [&](auto tag) {
      using T = decltype(tag);
      cuda::launch_axpy<T>(ptr<T>(y), static_cast<T>(alpha), ptr<T>(x), y.numel(), stream_);
    });
  }

  void scale(Tensor& x, double alpha) override {
    on_device(x, "scale", "x");
    activate();
    dispatch_float(x.dtype(), "scale", [&](auto tag) {
      using T = decltype(tag);
      cuda::launch_scale<T>(ptr<T>(x), static_cast<T>(alpha), x.numel(), stream_);
    });
  }

  double sum_squares(const Tensor& x) override {
    on_device(x, "sum_squares", "x");
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
    check_rank(a, 2, op, "a");
    check_like(b, a, op, "b");
    check_shape(out, {a.dim(0)}, op, "out");
    check_same_dtype(out, a.dtype(), op, "out");
    activate();
    dispatch_float(out.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      cuda::launch_rowwise_dot<T>(ptr<T>(out), ptr<T>(a), ptr<T>(b), a.dim(0), a.dim(1), stream_);
    });
  }

  void column_sum(Tensor& out, const Tensor& x) override {
    const char* op = "column_sum";
    on_device(out, op, "out");
    on_device(x, op, "x");
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
    check_rank(x, 2, op, "x");
    const int64_t n = x.dim(0), c = x.dim(1);
    check_like(y, x, op, "y");
    check_shape(w, {c}, op, "w");
    check_shape(rstd, {n}, op, "rstd");
    check_same_dtype(w, x.dtype(), op, "w");
    check_same_dtype(rstd, x.dtype(), op, "rstd");
    activate();
    dispatch_float(x.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      cuda::launch_rmsnorm_forward<T>(ptr<T>(y), ptr<T>(rstd), ptr<T>(x), ptr<T>(w),
                                      static_cast<T>(eps), n, c, stream_);
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
    check_rank(x, 2, op, "x");
    const int64_t n = x.dim(0), c = x.dim(1);
    check_like(dx, x, op, "dx");
    check_like(dy, x, op, "dy");
    check_shape(w, {c}, op, "w");
    check_same_dtype(w, x.dtype(), op, "w");
    check_like(dw, w, op, "dw");
    check_shape(rstd, {n}, op, "rstd");
    check_same_dtype(rstd, x.dtype(), op, "rstd");
    activate();
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
    check_like(gate, h, op, "gate");
    check_like(up, h, op, "up");
    activate();
    dispatch_float(h.dtype(), op, [&](auto tag) {
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
    check_like(dgate, dh, op, "dgate");
    check_like(dup, dh, op, "dup");
    check_like(gate, dh, op, "gate");
    check_like(up, dh, op, "up");
    activate();
    dispatch_float(dh.dtype(), op, [&](auto tag) {
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
    check_same_dtype(param, DType::f32, op, "param");
    check_like(grad, param, op, "grad");
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
    if (cublas_ != nullptr) (void)cublasDestroy(cublas_);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    scratch_ = nullptr;
    cublas_ = nullptr;
    stream_ = nullptr;
  }

  int index_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  double* scratch_ = nullptr;  // sum_squares: [0] the result, [1 ..] the per-block partials
};

}  // namespace fm::cuda
