// GEMM family on cuBLAS: matmul, and the per-group loops of grouped_matmul and
// grouped_weight_grad. Shapes: op(a) [M, K] @ op(b) [K, N] -> c [M, N],
// row-major. Precision: f32 (sgemm, full fp32: the default math mode, no
// TF32), f64 (dgemm), and bf16 a/b with f32 accumulation on tensor cores and a bf16 or
// f32 c (cublasGemmEx / cublasGemmGroupedBatchedEx). Speed: math bound for large M, N, K
// (fp32 SIMT ~60 TFLOP/s on H100; bf16 tensor cores ~990 TFLOP/s dense). The grouped ops
// issue all their groups in one cuBLAS grouped-batched call (gemm_grouped_row_major), so many
// small experts cost one launch, not one each (bf16 with an f32 output: one cublasGemmEx per
// group, see gemm.h).
//
// Row-major <-> column-major: a row-major [r, s] matrix is the column-major
// [s, r] matrix with leading dimension s, i.e. its transpose. So row-major
// c = op(a) op(b) is column-major c^T = op(b)^T op(a)^T: call cuBLAS with the
// operands swapped (b first), m and n swapped, and each operand's own
// transpose flag (the stored column-major matrix already is the transpose of
// the row-major one, so N means "as given" and T means "transposed").
#include "engine/cuda/gemm.h"

#include <climits>

#include "engine/cuda/check.h"
#include "engine/cuda/kernels.h"
#include "engine/error.h"

namespace fm::cuda {

namespace {

int to_int(int64_t v, const char* what) {
  FM_CHECK(v >= 0 && v <= INT_MAX, "CUDA backend: matmul: {} = {} does not fit cuBLAS's int", what,
           v);
  return static_cast<int>(v);
}

cublasStatus_t gemm_call(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                         int k, const float* alpha, const float* a, int lda, const float* b,
                         int ldb, const float* beta, float* c, int ldc) {
  return cublasSgemm(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
cublasStatus_t gemm_call(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                         int k, const double* alpha, const double* a, int lda, const double* b,
                         int ldb, const double* beta, double* c, int ldc) {
  return cublasDgemm(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

cublasStatus_t grouped_call(cublasHandle_t h, const cublasOperation_t* ta,
                            const cublasOperation_t* tb, const int* m, const int* n, const int* k,
                            const float* alpha, const float* const* a, const int* lda,
                            const float* const* b, const int* ldb, const float* beta,
                            float* const* c, const int* ldc, int groups, const int* size) {
  return cublasSgemmGroupedBatched(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, groups,
                                   size);
}
cublasStatus_t grouped_call(cublasHandle_t h, const cublasOperation_t* ta,
                            const cublasOperation_t* tb, const int* m, const int* n, const int* k,
                            const double* alpha, const double* const* a, const int* lda,
                            const double* const* b, const int* ldb, const double* beta,
                            double* const* c, const int* ldc, int groups, const int* size) {
  return cublasDgemmGroupedBatched(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, groups,
                                   size);
}

}  // namespace

size_t gemm_grouped_workspace_bytes(size_t problems) {
  return 3 * problems * sizeof(void*);
}

namespace {

// The column-major call of each row-major problem of a grouped GEMM, as in gemm_row_major
// (operands swapped, m and n swapped), in cuBLAS's per-group arrays; the A/B/C pointer
// arrays are copied to `workspace` (device) on `stream`. P: GemmProblem<T> or
// TypedGemm.
struct GroupedArrays {
  std::vector<cublasOperation_t> ta, tb;
  std::vector<int> m, n, k, lda, ldb, ldc, size;
};
template <class P>
GroupedArrays grouped_arrays(cudaStream_t stream, const std::vector<P>& problems, void* workspace,
                             size_t workspace_bytes) {
  const size_t count = problems.size();
  FM_CHECK(workspace_bytes >= gemm_grouped_workspace_bytes(count),
           "CUDA backend: grouped GEMM: workspace of {} bytes is too small for {} problems",
           workspace_bytes, count);
  FM_CHECK(count <= INT_MAX, "CUDA backend: grouped GEMM: {} problems", count);
  GroupedArrays g;
  g.ta.resize(count);
  g.tb.resize(count);
  for (std::vector<int>* v : {&g.m, &g.n, &g.k, &g.lda, &g.ldb, &g.ldc}) v->resize(count);
  g.size.assign(count, 1);  // one problem per group: m differs between them
  std::vector<const void*> pointers(3 * count);
  for (size_t i = 0; i < count; ++i) {
    const P& p = problems[i];
    g.ta[i] = p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    g.tb[i] = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    g.m[i] = to_int(p.n, "N");
    g.n[i] = to_int(p.m, "M");
    g.k[i] = to_int(p.k, "K");
    g.lda[i] = to_int(p.ldb, "ldb");
    g.ldb[i] = to_int(p.lda, "lda");
    g.ldc[i] = to_int(p.ldc, "ldc");
    pointers[i] = p.b;
    pointers[count + i] = p.a;
    pointers[2 * count + i] = p.c;
  }
  // Pageable source: the copy is staged before cudaMemcpyAsync returns, so `pointers` may go.
  FM_CUDA_CHECK(cudaMemcpyAsync(workspace, pointers.data(), gemm_grouped_workspace_bytes(count),
                                cudaMemcpyHostToDevice, stream));
  return g;
}

template <class P>
void check_grouped_problems(const std::vector<P>& problems) {
  for (size_t i = 0; i < problems.size(); ++i)
    FM_CHECK(problems[i].k >= 1 && problems[i].m >= 1 && problems[i].n >= 1,
             "CUDA backend: grouped GEMM: problem {} is empty ({} x {} x {})", i, problems[i].m,
             problems[i].n, problems[i].k);
}

// One bf16 problem in cuBLAS's column-major terms (operands swapped, m and n swapped).
cublasStatus_t gemm_bf16_call(cublasHandle_t handle, const TypedGemm& p, const float* alpha,
                              const float* beta) {
  FM_CHECK(p.ab_type == CUDA_R_16BF, "CUDA backend: bf16 GEMM given inputs of type {}",
           static_cast<int>(p.ab_type));
  return cublasGemmEx(handle, p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                      p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, to_int(p.n, "N"), to_int(p.m, "M"),
                      to_int(p.k, "K"), alpha, p.b, CUDA_R_16BF, to_int(p.ldb, "ldb"), p.a,
                      CUDA_R_16BF, to_int(p.lda, "lda"), beta, p.c, p.c_type, to_int(p.ldc, "ldc"),
                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

}  // namespace

template <class T>
void gemm_grouped_row_major(cublasHandle_t handle, cudaStream_t stream,
                            const std::vector<GemmProblem<T>>& problems, double alpha, double beta,
                            void* workspace, size_t workspace_bytes) {
  const size_t count = problems.size();
  if (count == 0) return;
  check_grouped_problems(problems);
  const GroupedArrays g = grouped_arrays(stream, problems, workspace, workspace_bytes);
  const std::vector<T> alphas(count, static_cast<T>(alpha)), betas(count, static_cast<T>(beta));
  const auto* dev = static_cast<void* const*>(workspace);
  FM_CUBLAS_CHECK(grouped_call(handle, g.ta.data(), g.tb.data(), g.m.data(), g.n.data(), g.k.data(),
                               alphas.data(), reinterpret_cast<const T* const*>(dev), g.lda.data(),
                               reinterpret_cast<const T* const*>(dev + count), g.ldb.data(),
                               betas.data(), reinterpret_cast<T* const*>(dev + 2 * count),
                               g.ldc.data(), static_cast<int>(count), g.size.data()));
}

template void gemm_grouped_row_major<float>(cublasHandle_t, cudaStream_t,
                                            const std::vector<GemmProblem<float>>&, double, double,
                                            void*, size_t);
template void gemm_grouped_row_major<double>(cublasHandle_t, cudaStream_t,
                                             const std::vector<GemmProblem<double>>&, double,
                                             double, void*, size_t);

template <class T>
void gemm_row_major(cublasHandle_t handle, cudaStream_t stream, T* c, int64_t ldc, const T* a,
                    int64_t lda, bool trans_a, const T* b, int64_t ldb, bool trans_b, int64_t m,
                    int64_t n, int64_t k, double alpha, double beta) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // op(a) op(b) is the zero matrix: c = beta * c (beta == 0 must not read c)
    FM_CHECK(ldc == n, "CUDA backend: matmul with K = 0 needs a contiguous c");
    if (beta == 0.0)
      launch_fill<T>(c, m * n, T(0), stream);
    else if (beta != 1.0)
      launch_scale<T>(c, static_cast<T>(beta), m * n, stream);
    return;
  }
  const T alpha_t = static_cast<T>(alpha);
  const T beta_t = static_cast<T>(beta);
  FM_CUBLAS_CHECK(gemm_call(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                            trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, to_int(n, "N"), to_int(m, "M"),
                            to_int(k, "K"), &alpha_t, b, to_int(ldb, "ldb"), a, to_int(lda, "lda"),
                            &beta_t, c, to_int(ldc, "ldc")));
}

void gemm_bf16_row_major(cublasHandle_t handle, cudaStream_t stream, const TypedGemm& p,
                         double alpha, double beta) {
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) {  // c = beta * c, as gemm_row_major
    FM_CHECK(p.ldc == p.n, "CUDA backend: matmul with K = 0 needs a contiguous c");
    const int64_t count = p.m * p.n;
    if (p.c_type == CUDA_R_32F) {
      if (beta == 0.0)
        launch_fill<float>(static_cast<float*>(p.c), count, 0.0f, stream);
      else if (beta != 1.0)
        launch_scale<float>(static_cast<float*>(p.c), static_cast<float>(beta), count, stream);
    } else {
      if (beta == 0.0)
        launch_fill<uint16_t>(static_cast<uint16_t*>(p.c), count, uint16_t{0}, stream);
      else if (beta != 1.0)
        launch_scale<bf16>(static_cast<bf16*>(p.c), static_cast<float>(beta), count, stream);
    }
    return;
  }
  const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
  FM_CUBLAS_CHECK(gemm_bf16_call(handle, p, &alpha_f, &beta_f));
}

void gemm_bf16_grouped_row_major(cublasHandle_t handle, cudaStream_t stream,
                                 const std::vector<TypedGemm>& problems, double alpha, double beta,
                                 void* workspace, size_t workspace_bytes) {
  const size_t count = problems.size();
  if (count == 0) return;
  check_grouped_problems(problems);
  const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
  bool c_f32 = false;
  for (const TypedGemm& p : problems) {
    FM_CHECK(p.ab_type == CUDA_R_16BF, "CUDA backend: bf16 grouped GEMM given inputs of type {}",
             static_cast<int>(p.ab_type));
    c_f32 = c_f32 || p.c_type == CUDA_R_32F;
  }
  if (c_f32) {  // bf16 in, f32 out: not a grouped-call type combination; one call each
    for (const TypedGemm& p : problems)
      FM_CUBLAS_CHECK(gemm_bf16_call(handle, p, &alpha_f, &beta_f));
    return;
  }
  const GroupedArrays g = grouped_arrays(stream, problems, workspace, workspace_bytes);
  const std::vector<float> alphas(count, alpha_f), betas(count, beta_f);
  const auto* dev = static_cast<void* const*>(workspace);
  FM_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
      handle, g.ta.data(), g.tb.data(), g.m.data(), g.n.data(), g.k.data(), alphas.data(),
      reinterpret_cast<const void* const*>(dev), CUDA_R_16BF, g.lda.data(),
      reinterpret_cast<const void* const*>(dev + count), CUDA_R_16BF, g.ldb.data(), betas.data(),
      dev + 2 * count, CUDA_R_16BF, g.ldc.data(), static_cast<int>(count), g.size.data(),
      CUBLAS_COMPUTE_32F));
}

template void gemm_row_major<float>(cublasHandle_t, cudaStream_t, float*, int64_t, const float*,
                                    int64_t, bool, const float*, int64_t, bool, int64_t, int64_t,
                                    int64_t, double, double);
template void gemm_row_major<double>(cublasHandle_t, cudaStream_t, double*, int64_t, const double*,
                                     int64_t, bool, const double*, int64_t, bool, int64_t, int64_t,
                                     int64_t, double, double);

}  // namespace fm::cuda
