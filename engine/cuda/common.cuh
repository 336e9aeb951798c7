// Device helpers shared by the CUDA backend's kernel files: launch sizing,
// precision-overloaded math, and fixed-order (deterministic) reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "engine/cuda/check.h"
#include "engine/cuda/kernels.h"

namespace fm::cuda {

inline constexpr int kThreads = 256;     // threads per block for flat elementwise kernels
inline constexpr int kMaxBlocks = 8192;  // grid cap; kernels loop grid-stride past it
inline constexpr int kRowsPerBlock = 4;  // row kernels: one warp per row, 4 warps per block

// Blocks for a grid-stride loop over n items, `per_block` items per block per pass.
inline int blocks_for(int64_t n, int64_t per_block = kThreads) {
  const int64_t b = (n + per_block - 1) / per_block;
  return static_cast<int>(b < kMaxBlocks ? (b < 1 ? 1 : b) : kMaxBlocks);
}

// Precision overloads, so one template body serves f32 and f64. The f32 forms are the
// accurate library functions (no fast-math intrinsics): parity with the CPU matters more
// than the last few percent of a memory-bound kernel.
__device__ __forceinline__ float fm_exp(float x) {
  return expf(x);
}
__device__ __forceinline__ double fm_exp(double x) {
  return exp(x);
}
__device__ __forceinline__ float fm_sqrt(float x) {
  return sqrtf(x);
}
__device__ __forceinline__ double fm_sqrt(double x) {
  return sqrt(x);
}
__device__ __forceinline__ float fm_max(float a, float b) {
  return fmaxf(a, b);
}
__device__ __forceinline__ double fm_max(double a, double b) {
  return fmax(a, b);
}

// Storage <-> arithmetic: a kernel templated on its storage type T loads with widen()
// (bf16 -> f32 is exact), computes in compute_t<T> and stores with narrow<T>() (f32 -> bf16
// rounds to nearest even; identity for f32 and f64). So a bf16 instantiation computes
// exactly what the f32 one does on the widened values and rounds each output once.
__device__ __forceinline__ float widen(float v) {
  return v;
}
__device__ __forceinline__ double widen(double v) {
  return v;
}
__device__ __forceinline__ float widen(bf16 v) {
  return __bfloat162float(v);
}
template <class T>
__device__ __forceinline__ T narrow(compute_t<T> v) {
  return v;
}
template <>
__device__ __forceinline__ bf16 narrow<bf16>(float v) {
  return __float2bfloat16_rn(v);
}

// Butterfly sum over a full warp: every lane ends with the same value, and the
// order of additions is fixed, so the result is deterministic.
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
template <class T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fm_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over a block of kBlock threads (a multiple of 32, at most 1024) in a fixed
// order: warp butterflies, then warp 0 sums the per-warp values. The result is
// valid in thread 0. `scratch` holds kBlock / 32 values.
template <int kBlock, class T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  static_assert(kBlock % 32 == 0 && kBlock <= 1024, "block size");
  constexpr int kWarps = kBlock / 32;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : T(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

// Column reduction over a row-major [rows, cols] matrix, summed in T = compute_t<Out> and
// stored as Out (a bf16 out is widened, accumulated in f32 and rounded once):
//   out[c] = sum_n load(n, c)         (accumulate = false)
//   out[c] += sum_n load(n, c)        (accumulate = true)
// Block (32, 8): threadIdx.x picks the column (coalesced across the warp),
// threadIdx.y one of 8 row lanes that each sum rows y, y + 8, ... in order; the
// 8 lane sums are then added in lane order. Deterministic for a given shape.
// Speed: memory bound; parallelism is cols / 32 blocks, low for narrow
// matrices (a split-rows pass comes with the tuned kernels).
inline constexpr int kColLanes = 8;
template <class Out, class Load>
__global__ void column_reduce_kernel(Out* out, int64_t rows, int64_t cols, bool accumulate,
                                     Load load) {
  using T = compute_t<Out>;
  __shared__ T partial[kColLanes][32];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  T acc = T(0);
  if (c < cols)
    for (int64_t n = threadIdx.y; n < rows; n += kColLanes) acc += load(n, c);
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    T s = partial[0][threadIdx.x];
    for (int l = 1; l < kColLanes; ++l) s += partial[l][threadIdx.x];
    out[c] = narrow<Out>(accumulate ? widen(out[c]) + s : s);
  }
}

template <class Out, class Load>
void launch_column_reduce(Out* out, int64_t rows, int64_t cols, bool accumulate, Load load,
                          cudaStream_t s) {
  if (cols == 0) return;
  const int64_t blocks = (cols + 31) / 32;
  column_reduce_kernel<Out, Load><<<static_cast<unsigned>(blocks), dim3(32, kColLanes), 0, s>>>(
      out, rows, cols, accumulate, load);
  FM_CUDA_LAUNCH_CHECK();
}

}  // namespace fm::cuda
