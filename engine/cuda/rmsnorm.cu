// RMSNorm over the last dim: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps);
// x, y [N, C], w [C], rstd [N] (saved for backward).
// Backward, with xhat = x * rstd and g = w * dy:
//   dx = rstd * (g - xhat * mean_c(g * xhat))        (written)
//   dw[c] += sum_n dy[n, c] * xhat[n, c]             (accumulated)
// Precision: f32 and f64, computed in the tensor's precision. dw is a
// deterministic column reduction (fixed row lanes, lanes added in order),
// never atomics.
// Speed: memory bound. Forward: one warp per row (C is the model width, a few
// thousand), the row re-read from L1/L2 for the scaling pass. Backward: a row
// pass for dx plus a column pass for dw, which re-reads dy and x.
#include "engine/cuda/common.cuh"
#include "engine/cuda/kernels.h"

namespace fm::cuda {

namespace {

template <class T>
__global__ void rmsnorm_forward_kernel(T* y, T* rstd, const T* x, const T* w, T eps, int64_t rows,
                                       int64_t cols) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    T ss = T(0);
    for (int64_t c = lane; c < cols; c += 32) ss += xr[c] * xr[c];
    ss = warp_sum(ss);
    const T rs = T(1) / fm_sqrt(ss / static_cast<T>(cols) + eps);
    if (lane == 0) rstd[r] = rs;
    for (int64_t c = lane; c < cols; c += 32) yr[c] = xr[c] * rs * w[c];
  }
}

template <class T>
__global__ void rmsnorm_backward_dx_kernel(T* dx, const T* dy, const T* x, const T* w,
                                           const T* rstd, int64_t rows, int64_t cols) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* xr = x + r * cols;
    const T* dyr = dy + r * cols;
    T* dxr = dx + r * cols;
    const T rs = rstd[r];
    T dot = T(0);  // sum_c g * xhat
    for (int64_t c = lane; c < cols; c += 32) dot += w[c] * dyr[c] * (xr[c] * rs);
    dot = warp_sum(dot);
    const T mean = dot / static_cast<T>(cols);
    for (int64_t c = lane; c < cols; c += 32) dxr[c] = rs * (w[c] * dyr[c] - xr[c] * rs * mean);
  }
}

template <class T>
struct RmsnormDwLoad {
  const T* dy;
  const T* x;
  const T* rstd;
  int64_t cols;
  __device__ T operator()(int64_t n, int64_t c) const {
    const int64_t i = n * cols + c;
    return dy[i] * (x[i] * rstd[n]);
  }
};

}  // namespace

template <class T>
void launch_rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, T eps, int64_t rows,
                            int64_t cols, cudaStream_t s) {
  if (rows == 0) return;
  rmsnorm_forward_kernel<T><<<blocks_for(rows, kRowsPerBlock), 32 * kRowsPerBlock, 0, s>>>(
      y, rstd, x, w, eps, rows, cols);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_rmsnorm_backward(T* dx, T* dw, const T* dy, const T* x, const T* w, const T* rstd,
                             int64_t rows, int64_t cols, cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  rmsnorm_backward_dx_kernel<T><<<blocks_for(rows, kRowsPerBlock), 32 * kRowsPerBlock, 0, s>>>(
      dx, dy, x, w, rstd, rows, cols);
  FM_CUDA_LAUNCH_CHECK();
  launch_column_reduce(dw, rows, cols, /*accumulate=*/true, RmsnormDwLoad<T>{dy, x, rstd, cols}, s);
}

template void launch_rmsnorm_forward<float>(float*, float*, const float*, const float*, float,
                                            int64_t, int64_t, cudaStream_t);
template void launch_rmsnorm_forward<double>(double*, double*, const double*, const double*, double,
                                             int64_t, int64_t, cudaStream_t);
template void launch_rmsnorm_backward<float>(float*, float*, const float*, const float*,
                                             const float*, const float*, int64_t, int64_t,
                                             cudaStream_t);
template void launch_rmsnorm_backward<double>(double*, double*, const double*, const double*,
                                              const double*, const double*, int64_t, int64_t,
                                              cudaStream_t);

}  // namespace fm::cuda
