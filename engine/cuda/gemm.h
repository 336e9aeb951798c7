// Row-major GEMM on cuBLAS (private to the CUDA backend).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fm::cuda {

// c = alpha * op(a) @ op(b) + beta * c on row-major matrices:
// op(a) [m, k], op(b) [k, n], c [m, n] with row strides lda, ldb, ldc (a is
// stored [m, lda] untransposed or [k, lda] transposed; likewise b). T is
// float (cublasSgemm) or double (cublasDgemm). beta == 0 never reads c.
template <class T>
void gemm_row_major(cublasHandle_t handle, cudaStream_t stream, T* c, int64_t ldc, const T* a,
                    int64_t lda, bool trans_a, const T* b, int64_t ldb, bool trans_b, int64_t m,
                    int64_t n, int64_t k, double alpha, double beta);

}  // namespace fm::cuda
