// CudaBackend ops: the GEMM family. matmul (dense: f32 and bf16 on cuBLASLt by default,
// gemm_lt.h; f64, the classic switch and shapes cuBLASLt has no algorithm for on classic
// cuBLAS, gemm.h), grouped_matmul and grouped_weight_grad (every expert's GEMM in one cuBLAS
// grouped-batched call, gemm.h, except bf16 -> f32 GEMMs, which cuBLAS only runs one per
// expert; set_cuda_grouped_wgrad moves the bf16 weight gradient onto grouped_gemm.cu's
// one-launch kernel) and grouped_matmul_device (grouped_gemm.cu). Each checks its arguments
// the way the CPU backend does (engine/cpu/cpu_gemm_attention.cpp); bf16 inputs run natively
// with f32 accumulation, other f32/bf16 mixes through WidenedArgs.
#include <climits>

#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/grouped_gemm_kernels.h"

namespace fm::cuda {

namespace {
// cuBLAS's name for a GEMM output's element type (f32 or bf16).
cudaDataType_t cuda_type(const Tensor& t) {
  return t.dtype() == DType::f32 ? CUDA_R_32F : CUDA_R_16BF;
}

// grouped_matmul's shapes: x_g [m_g, k] @ op(w[g]) [k, n] -> y_g [m_g, n], w [G, R, S].
struct GroupedShape {
  int64_t groups, r, s, rows, k, n;
};
GroupedShape grouped_shape(const Tensor& y, const Tensor& x, const Tensor& w, bool trans_w,
                           const char* op) {
  check_rank(x, 2, op, "x");
  check_rank(w, 3, op, "w");
  GroupedShape g{w.dim(0), w.dim(1), w.dim(2), x.dim(0), 0, 0};
  g.k = trans_w ? g.s : g.r;
  g.n = trans_w ? g.r : g.s;
  check_shape(x, {g.rows, g.k}, op, "x");
  check_shape(y, {g.rows, g.n}, op, "y");
  return g;
}
}  // namespace

bool CudaBackend::run_lt(const cuda::TypedGemm& p, double alpha, double beta) {
  if (dense_gemm_ != CudaDenseGemm::lt || p.m == 0 || p.n == 0 || p.k == 0) return false;
  const bool ran = lt_->run(stream_, p, static_cast<float>(alpha), static_cast<float>(beta));
  ++(ran ? gemm_stats_.lt_calls : gemm_stats_.lt_fallbacks);
  gemm_stats_.lt_plans = static_cast<int64_t>(lt_->plans());
  return ran;
}

void CudaBackend::matmul(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                         double alpha, double beta) {
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
  if (is_bf16(a) && is_bf16(b) && (is_bf16(c) || c.dtype() == DType::f32)) {
    activate();
    const cuda::TypedGemm p{c.raw(), cuda_type(c), n, a.raw(), a.dim(1), trans_a, b.raw(), b.dim(1),
                            trans_b, CUDA_R_16BF,  m, n,       k};
    if (!run_lt(p, alpha, beta)) cuda::gemm_bf16_row_major(cublas_, stream_, p, alpha, beta);
    return;
  }
  if (WidenedArgs w(*this, op, {{&c, beta == 0.0 ? kOut : kInOut}, {&a, kIn}, {&b, kIn}});
      w.any()) {
    matmul(w[0], w[1], trans_a, w[2], trans_b, alpha, beta);
    return w.finish();
  }
  check_same_dtype(a, c.dtype(), op, "a");
  check_same_dtype(b, c.dtype(), op, "b");
  activate();
  if (c.dtype() == DType::f32 && run_lt({c.raw(), CUDA_R_32F, n, a.raw(), a.dim(1), trans_a,
                                         b.raw(), b.dim(1), trans_b, CUDA_R_32F, m, n, k},
                                        alpha, beta))
    return;
  dispatch_float(c.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    ++gemm_stats_.classic_calls;
    cuda::gemm_row_major<T>(cublas_, stream_, ptr<T>(c), n, ptr<T>(a), a.dim(1), trans_a, ptr<T>(b),
                            b.dim(1), trans_b, m, n, k, alpha, beta);
  });
}

template <class T>
void CudaBackend::grouped_gemm(const std::vector<cuda::GemmProblem<T>>& problems, double beta) {
  if (problems.empty()) return;
  const size_t bytes = cuda::gemm_grouped_workspace_bytes(problems.size());
  Tensor pointers = empty({static_cast<int64_t>(bytes)}, DType::u8);
  cuda::gemm_grouped_row_major<T>(cublas_, stream_, problems, 1.0, beta, pointers.raw(), bytes);
}

void CudaBackend::grouped_gemm_bf16(const std::vector<cuda::TypedGemm>& problems, double beta) {
  if (problems.empty()) return;
  const size_t bytes = cuda::gemm_grouped_workspace_bytes(problems.size());
  Tensor pointers = empty({static_cast<int64_t>(bytes)}, DType::u8);
  cuda::gemm_bf16_grouped_row_major(cublas_, stream_, problems, 1.0, beta, pointers.raw(), bytes);
}

void CudaBackend::grouped_matmul(Tensor& y, const Tensor& x, const Tensor& w, bool trans_w,
                                 const std::vector<int64_t>& off) {
  const char* op = "grouped_matmul";
  on_device(y, op, "y");
  on_device(x, op, "x");
  on_device(w, op, "w");
  const auto [groups, r, s, rows, k, n] = grouped_shape(y, x, w, trans_w, op);
  check_offsets(off, groups, rows, op);
  if (is_bf16(x) && is_bf16(w) && (is_bf16(y) || y.dtype() == DType::f32)) {
    activate();
    const size_t ys = dtype_size(y.dtype());
    const cudaDataType_t y_type = cuda_type(y);
    std::vector<cuda::TypedGemm> problems;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t m = off[g + 1] - off[g];
      if (m == 0) continue;
      problems.push_back({static_cast<char*>(y.raw()) + off[g] * n * ys, y_type, n,
                          ptr<cuda::bf16>(x) + off[g] * k, k, false, ptr<cuda::bf16>(w) + g * r * s,
                          s, trans_w, CUDA_R_16BF, m, n, k});
    }
    grouped_gemm_bf16(problems, 0.0);
    return;
  }
  if (WidenedArgs wa(*this, op, {{&y, kOut}, {&x, kIn}, {&w, kIn}}); wa.any()) {
    grouped_matmul(wa[0], wa[1], wa[2], trans_w, off);
    return wa.finish();
  }
  check_same_dtype(x, y.dtype(), op, "x");
  check_same_dtype(w, y.dtype(), op, "w");
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

void CudaBackend::grouped_matmul_device(Tensor& y, const Tensor& x, const Tensor& w, bool trans_w,
                                        const Tensor& off) {
  const char* op = "grouped_matmul_device";
  on_device(y, op, "y");
  on_device(x, op, "x");
  on_device(w, op, "w");
  on_device(off, op, "off");
  const GroupedShape g = grouped_shape(y, x, w, trans_w, op);
  check_shape(off, {g.groups + 1}, op, "off");
  check_same_dtype(off, DType::i32, op, "off");
  FM_CHECK(g.groups <= 65535 && g.rows < INT_MAX,
           "CUDA backend: {}: {} groups of {} rows exceed the kernel's limits (65535, 2^31)", op,
           g.groups, g.rows);
  const bool bf16_path = is_bf16(x) && is_bf16(w) && (is_bf16(y) || y.dtype() == DType::f32);
  const bool same_float = (x.dtype() == DType::f32 || x.dtype() == DType::f64) &&
                          w.dtype() == x.dtype() && y.dtype() == x.dtype();
  if (!bf16_path && !same_float) return Backend::grouped_matmul_device(y, x, w, trans_w, off);
  activate();
  if (index_checks_) {  // checks on: the offsets are read back and checked (one sync)
    const std::vector<int32_t> host = download_i32(off);
    check_offsets(std::vector<int64_t>(host.begin(), host.end()), g.groups, g.rows, op);
  }
  const int32_t* o = ptr<int32_t>(off);
  if (bf16_path) {
    if (is_bf16(y))
      launch_grouped_gemm_device_bf16(ptr<bf16>(y), ptr<bf16>(x), ptr<bf16>(w), o, g.groups, g.rows,
                                      g.n, g.k, trans_w, stream_);
    else
      launch_grouped_gemm_device_bf16(ptr<float>(y), ptr<bf16>(x), ptr<bf16>(w), o, g.groups,
                                      g.rows, g.n, g.k, trans_w, stream_);
    return;
  }
  dispatch_float(y.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_grouped_gemm_device<T>(ptr<T>(y), ptr<T>(x), ptr<T>(w), o, g.groups, g.rows, g.n, g.k,
                                  trans_w, stream_);
  });
}

void CudaBackend::grouped_weight_grad(Tensor& dw, const Tensor& dy, const Tensor& x,
                                      const std::vector<int64_t>& off) {
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
  check_offsets(off, groups, rows, op);
  if (is_bf16(dy) && is_bf16(x) && (is_bf16(dw) || dw.dtype() == DType::f32)) {
    if (dw.numel() == 0) return;  // no groups or an empty R x S: nothing to add to
    if (grouped_wgrad_ == CudaGroupedWgrad::kernel)
      return grouped_weight_grad_kernel(dw, dy, x, off);
    activate();
    ++gemm_stats_.grouped_wgrad_cublas_calls;
    const size_t ws = dtype_size(dw.dtype());
    const cudaDataType_t dw_type = cuda_type(dw);
    std::vector<cuda::TypedGemm> problems;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t m = off[g + 1] - off[g];
      if (m == 0) continue;  // dw[g] += 0
      problems.push_back({static_cast<char*>(dw.raw()) + g * r * s * ws, dw_type, s,
                          ptr<cuda::bf16>(dy) + off[g] * r, r, true,
                          ptr<cuda::bf16>(x) + off[g] * s, s, false, CUDA_R_16BF, r, s, m});
    }
    grouped_gemm_bf16(problems, 1.0);
    return;
  }
  if (WidenedArgs w(*this, op, {{&dw, kInOut}, {&dy, kIn}, {&x, kIn}}); w.any()) {
    grouped_weight_grad(w[0], w[1], w[2], off);
    return w.finish();
  }
  check_same_dtype(dy, dw.dtype(), op, "dy");
  check_same_dtype(x, dw.dtype(), op, "x");
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

void CudaBackend::grouped_weight_grad_kernel(Tensor& dw, const Tensor& dy, const Tensor& x,
                                             const std::vector<int64_t>& off) {
  const char* op = "grouped_weight_grad";
  const int64_t groups = dw.dim(0), r = dw.dim(1), s = dw.dim(2), rows = dy.dim(0);
  // The kernel's grid is (S / 64, R / 64, G) and its offsets are i32.
  FM_CHECK(groups <= 65535 && (r + 63) / 64 <= 65535 && rows <= INT_MAX,
           "CUDA backend: {}: {} groups of dw [{}, {}] over {} rows exceed the grouped "
           "weight-gradient kernel's limits (65535 groups, R <= 65535 * 64, rows < 2^31)",
           op, groups, r, s, rows);
  activate();
  ++gemm_stats_.grouped_wgrad_kernel_calls;
  // Queued through the pinned staging ring: no wait for the stream, and the caching
  // allocator is stream-ordered, so `o` may be freed on return while the kernel reads it.
  const Tensor o = upload(std::vector<int32_t>(off.begin(), off.end()), {groups + 1});
  if (is_bf16(dw))
    launch_grouped_weight_grad_bf16(ptr<bf16>(dw), ptr<bf16>(dy), ptr<bf16>(x), ptr<int32_t>(o),
                                    groups, rows, r, s, stream_);
  else
    launch_grouped_weight_grad_bf16(ptr<float>(dw), ptr<bf16>(dy), ptr<bf16>(x), ptr<int32_t>(o),
                                    groups, rows, r, s, stream_);
}

}  // namespace fm::cuda
