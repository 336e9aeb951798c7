// Row-major GEMM on cuBLAS (private to the CUDA backend).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace fm::cuda {

// c = alpha * op(a) @ op(b) + beta * c on row-major matrices:
// op(a) [m, k], op(b) [k, n], c [m, n] with row strides lda, ldb, ldc (a is
// stored [m, lda] untransposed or [k, lda] transposed; likewise b). T is
// float (cublasSgemm) or double (cublasDgemm). beta == 0 never reads c.
template <class T>
void gemm_row_major(cublasHandle_t handle, cudaStream_t stream, T* c, int64_t ldc, const T* a,
                    int64_t lda, bool trans_a, const T* b, int64_t ldb, bool trans_b, int64_t m,
                    int64_t n, int64_t k, double alpha, double beta);

// One problem of a grouped GEMM, in gemm_row_major's terms (k >= 1).
template <class T>
struct GemmProblem {
  T* c;
  int64_t ldc;
  const T* a;
  int64_t lda;
  bool trans_a;
  const T* b;
  int64_t ldb;
  bool trans_b;
  int64_t m, n, k;
};

// Device bytes gemm_grouped_row_major needs for `problems` problems (its pointer arrays).
size_t gemm_grouped_workspace_bytes(size_t problems);
// Every problem, c = alpha * op(a) @ op(b) + beta * c, in one cuBLAS grouped-batched call
// (cublas{S,D}gemmGroupedBatched, one group per problem since m differs): one launch for all
// experts instead of one per expert. `workspace` (device, gemm_grouped_workspace_bytes) takes
// the A/B/C pointer arrays, copied from the host on `stream`.
template <class T>
void gemm_grouped_row_major(cublasHandle_t handle, cudaStream_t stream,
                            const std::vector<GemmProblem<T>>& problems, double alpha, double beta,
                            void* workspace, size_t workspace_bytes);

}  // namespace fm::cuda
