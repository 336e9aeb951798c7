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

// --- bf16: a and b bf16 (CUDA_R_16BF), f32 accumulation (CUBLAS_COMPUTE_32F, tensor
// cores), c bf16 or f32 (c_type), alpha and beta f32. A bf16 c is read, accumulated and
// rounded once, to nearest even. Not bit-identical to the f32 path on widened values (the
// K sum is blocked differently): parity is judged with a tolerance.
// A problem whose element types are data, in gemm_row_major's terms: a and b of ab_type, c
// of c_type (cuBLAS's cudaDataType_t). The bf16 calls here take ab_type CUDA_R_16BF; the
// cuBLASLt path (gemm_lt.h) also takes f32 throughout.
struct TypedGemm {
  void* c;
  cudaDataType_t c_type;
  int64_t ldc;
  const void* a;
  int64_t lda;
  bool trans_a;
  const void* b;
  int64_t ldb;
  bool trans_b;
  cudaDataType_t ab_type;
  int64_t m, n, k;
};

// One problem (cublasGemmEx); k == 0 gives c = beta * c (beta == 0 never reads c).
void gemm_bf16_row_major(cublasHandle_t handle, cudaStream_t stream, const TypedGemm& p,
                         double alpha, double beta);
// Every problem (k >= 1), as gemm_grouped_row_major: one cublasGemmGroupedBatchedEx call when
// every c is bf16 (a type combination it supports: 16BF in and out, COMPUTE_32F); a loop of
// cublasGemmEx when c is f32 (bf16 inputs with an f32 c are not among the grouped call's
// supported types). `workspace` as for gemm_grouped_row_major.
void gemm_bf16_grouped_row_major(cublasHandle_t handle, cudaStream_t stream,
                                 const std::vector<TypedGemm>& problems, double alpha, double beta,
                                 void* workspace, size_t workspace_bytes);

}  // namespace fm::cuda
