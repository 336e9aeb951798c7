// Float dtype conversion (Backend::convert on the device): dst[i] = src[i] for f32, f64 and
// bf16 in any pair, flat n elements. Widening is exact; f32 -> bf16 and f64 -> f32 round to
// nearest even; f64 -> bf16 goes through f32 (as the host's Backend::convert does: exact for
// every f32-representable value). NaN stays NaN (__float2bfloat16_rn keeps it quiet).
// Speed: memory bound (one read, one write per element); grid-stride scalar accesses.
#include "engine/cuda/common.cuh"
#include "engine/cuda/kernels.h"

namespace fm::cuda {

namespace {

// One element, From -> To, by way of f32 whenever bf16 is either side.
template <class To, class From>
__device__ __forceinline__ To convert_one(From v) {
  return static_cast<To>(v);
}
template <>
__device__ __forceinline__ bf16 convert_one<bf16, float>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ bf16 convert_one<bf16, double>(double v) {
  return __float2bfloat16_rn(static_cast<float>(v));
}
template <>
__device__ __forceinline__ float convert_one<float, bf16>(bf16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ double convert_one<double, bf16>(bf16 v) {
  return static_cast<double>(__bfloat162float(v));
}

template <class To, class From>
__global__ void convert_kernel(To* dst, const From* src, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = convert_one<To, From>(src[i]);
}

}  // namespace

template <class To, class From>
void launch_convert(To* dst, const From* src, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  convert_kernel<To, From><<<blocks_for(n), kThreads, 0, s>>>(dst, src, n);
  FM_CUDA_LAUNCH_CHECK();
}

#define FM_CONVERT_INSTANTIATE(To, From) \
  template void launch_convert<To, From>(To*, const From*, int64_t, cudaStream_t);
FM_CONVERT_INSTANTIATE(float, double)
FM_CONVERT_INSTANTIATE(float, bf16)
FM_CONVERT_INSTANTIATE(double, float)
FM_CONVERT_INSTANTIATE(double, bf16)
FM_CONVERT_INSTANTIATE(bf16, float)
FM_CONVERT_INSTANTIATE(bf16, double)
#undef FM_CONVERT_INSTANTIATE

}  // namespace fm::cuda
