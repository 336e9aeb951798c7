// Launchers of grouped_gemm.cu: the grouped GEMM whose group offsets live on the device
// (Backend::grouped_matmul_device), so a decode step's expert GEMMs launch without the host
// knowing how many rows each expert received.
//   y[i, :] = x[i, :] @ op(w[g]) for the rows i in [off[g], off[g + 1]),
//   x [rows, k], y [rows, n], w [G, n, k] (trans_w: op = transpose) or [G, k, n],
//   off i32 [G + 1] on the device, a partition of [0, rows) (trusted: sort_assignments
//   makes it).
// And the grouped weight gradient in one launch (Backend::grouped_weight_grad on the
// CudaGroupedWgrad::kernel path; the host uploads its offsets):
//   dw[g] += dy_g^T @ x_g, rows [off[g], off[g + 1]) of dy [rows, R] and x [rows, S],
//   dw [G, R, S].
// Like kernels.h this header is shared by nvcc and the host compiler.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fm::cuda {

// bf16 x and w, f32 accumulation on tensor cores, Out = bf16 or float. Any shape; the wide
// (16-byte) loads are used when k and n are multiples of 8 and x and w are 16-byte aligned.
template <class Out>
void launch_grouped_gemm_device_bf16(Out* y, const __nv_bfloat16* x, const __nv_bfloat16* w,
                                     const int32_t* off, int64_t groups, int64_t rows, int64_t n,
                                     int64_t k, bool trans_w, cudaStream_t s);
// bf16 dy and x, f32 accumulation on tensor cores, Out = float or bf16 (rounded once from
// the f32 sum dw + dy_g^T x_g). An empty group leaves dw[g] untouched (not rewritten). Any
// shape; 16-byte loads when R and S are multiples of 8 and dy and x are 16-byte aligned.
// Deterministic: one writer per element of dw, no atomics. The caller checks groups <= 65535,
// ceil(R / 64) <= 65535 and rows < 2^31.
template <class Out>
void launch_grouped_weight_grad_bf16(Out* dw, const __nv_bfloat16* dy, const __nv_bfloat16* x,
                                     const int32_t* off, int64_t groups, int64_t rows, int64_t r,
                                     int64_t s, cudaStream_t stream);
// T = float or double throughout: one thread per output element, summed in order of k.
template <class T>
void launch_grouped_gemm_device(T* y, const T* x, const T* w, const int32_t* off, int64_t groups,
                                int64_t rows, int64_t n, int64_t k, bool trans_w, cudaStream_t s);

}  // namespace fm::cuda
