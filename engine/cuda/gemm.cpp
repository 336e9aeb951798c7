// GEMM family on cuBLAS: matmul, and the per-group loops of grouped_matmul and
// grouped_weight_grad. Shapes: op(a) [M, K] @ op(b) [K, N] -> c [M, N],
// row-major. Precision: f32 (sgemm, full fp32: the default math mode, no
// TF32) and f64 (dgemm). Speed: math bound for large M, N, K (fp32 SIMT,
// ~60 TFLOP/s on H100; bf16 tensor-core paths come later). The grouped ops issue all
// their groups in one cuBLAS grouped-batched call (gemm_grouped_row_major), so many small
// experts cost one launch, not one each.
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

template <class T>
void gemm_grouped_row_major(cublasHandle_t handle, cudaStream_t stream,
                            const std::vector<GemmProblem<T>>& problems, double alpha, double beta,
                            void* workspace, size_t workspace_bytes) {
  const size_t count = problems.size();
  if (count == 0) return;
  FM_CHECK(workspace_bytes >= gemm_grouped_workspace_bytes(count),
           "CUDA backend: grouped GEMM: workspace of {} bytes is too small for {} problems",
           workspace_bytes, count);
  FM_CHECK(count <= INT_MAX, "CUDA backend: grouped GEMM: {} problems", count);
  // The column-major call of each row-major problem, as in gemm_row_major: operands
  // swapped, m and n swapped.
  std::vector<cublasOperation_t> ta(count), tb(count);
  std::vector<int> m(count), n(count), k(count), lda(count), ldb(count), ldc(count), size(count, 1);
  std::vector<T> alphas(count, static_cast<T>(alpha)), betas(count, static_cast<T>(beta));
  std::vector<const void*> pointers(3 * count);
  for (size_t i = 0; i < count; ++i) {
    const GemmProblem<T>& p = problems[i];
    FM_CHECK(p.k >= 1 && p.m >= 1 && p.n >= 1,
             "CUDA backend: grouped GEMM: problem {} is empty ({} x {} x {})", i, p.m, p.n, p.k);
    ta[i] = p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    tb[i] = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    m[i] = to_int(p.n, "N");
    n[i] = to_int(p.m, "M");
    k[i] = to_int(p.k, "K");
    lda[i] = to_int(p.ldb, "ldb");
    ldb[i] = to_int(p.lda, "lda");
    ldc[i] = to_int(p.ldc, "ldc");
    pointers[i] = p.b;
    pointers[count + i] = p.a;
    pointers[2 * count + i] = p.c;
  }
  // Pageable source: the copy is staged before cudaMemcpyAsync returns, so `pointers` may go.
  FM_CUDA_CHECK(cudaMemcpyAsync(workspace, pointers.data(), gemm_grouped_workspace_bytes(count),
                                cudaMemcpyHostToDevice, stream));
  const auto* dev = static_cast<void* const*>(workspace);
  FM_CUBLAS_CHECK(grouped_call(handle, ta.data(), tb.data(), m.data(), n.data(), k.data(),
                               alphas.data(), reinterpret_cast<const T* const*>(dev), lda.data(),
                               reinterpret_cast<const T* const*>(dev + count), ldb.data(),
                               betas.data(), reinterpret_cast<T* const*>(dev + 2 * count),
                               ldc.data(), static_cast<int>(count), size.data()));
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

template void gemm_row_major<float>(cublasHandle_t, cudaStream_t, float*, int64_t, const float*,
                                    int64_t, bool, const float*, int64_t, bool, int64_t, int64_t,
                                    int64_t, double, double);
template void gemm_row_major<double>(cublasHandle_t, cudaStream_t, double*, int64_t, const double*,
                                     int64_t, bool, const double*, int64_t, bool, int64_t, int64_t,
                                     int64_t, double, double);

}  // namespace fm::cuda
