// RMSNorm over the last dim: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps);
// x, y [N, C], w [C], rstd [N] (saved for backward).
// Backward, with xhat = x * rstd and g = w * dy:
//   dx = rstd * (g - xhat * mean_c(g * xhat))        (written)
//   dw[c] += sum_n dy[n, c] * xhat[n, c]             (accumulated)
// Precision: f32 and f64, computed in the tensor's precision; bf16 x, y, w, dy, dx with an
// f32 rstd and a bf16 or f32 dw compute in f32 exactly as the f32 kernels do and round each
// stored output once (bit-identical to the widened f32 op). dw is a deterministic column
// reduction (fixed row lanes, lanes added in order), never atomics.
// Speed: memory bound. Forward: one warp per row (C is the model width, a few
// thousand), the row re-read from L1/L2 for the scaling pass. Backward: a row
// pass for dx plus a column pass for dw, which re-reads dy and x.
#include "engine/cuda/common.cuh"
#include "engine/cuda/kernels.h"

namespace fm::cuda {

namespace {

template <class T>
__global__ void rmsnorm_forward_kernel(T* y, compute_t<T>* rstd, const T* x, const T* w,
                                       compute_t<T> eps, int64_t rows, int64_t cols) {
  using C = compute_t<T>;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    C ss = C(0);
    for (int64_t c = lane; c < cols; c += 32) {
      const C xc = widen(xr[c]);
      ss += xc * xc;
    }
    ss = warp_sum(ss);
    const C rs = C(1) / fm_sqrt(ss / static_cast<C>(cols) + eps);
    if (lane == 0) rstd[r] = rs;
    for (int64_t c = lane; c < cols; c += 32) yr[c] = narrow<T>(widen(xr[c]) * rs * widen(w[c]));
  }
}

template <class T>
__global__ void rmsnorm_backward_dx_kernel(T* dx, const T* dy, const T* x, const T* w,
                                           const compute_t<T>* rstd, int64_t rows, int64_t cols) {
  using C = compute_t<T>;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* xr = x + r * cols;
    const T* dyr = dy + r * cols;
    T* dxr = dx + r * cols;
    const C rs = rstd[r];
    C dot = C(0);  // sum_c g * xhat
    for (int64_t c = lane; c < cols; c += 32)
      dot += widen(w[c]) * widen(dyr[c]) * (widen(xr[c]) * rs);
    dot = warp_sum(dot);
    const C mean = dot / static_cast<C>(cols);
    for (int64_t c = lane; c < cols; c += 32)
      dxr[c] = narrow<T>(rs * (widen(w[c]) * widen(dyr[c]) - widen(xr[c]) * rs * mean));
  }
}

template <class T>
struct RmsnormDwLoad {
  const T* dy;
  const T* x;
  const compute_t<T>* rstd;
  int64_t cols;
  __device__ compute_t<T> operator()(int64_t n, int64_t c) const {
    const int64_t i = n * cols + c;
    return widen(dy[i]) * (widen(x[i]) * rstd[n]);
  }
};

}  // namespace

template <class T>
void launch_rmsnorm_forward(T* y, compute_t<T>* rstd, const T* x, const T* w, compute_t<T> eps,
                            int64_t rows, int64_t cols, cudaStream_t s) {
  if (rows == 0) return;
  rmsnorm_forward_kernel<T><<<blocks_for(rows, kRowsPerBlock), 32 * kRowsPerBlock, 0, s>>>(
      y, rstd, x, w, eps, rows, cols);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T, class TW>
void launch_rmsnorm_backward(T* dx, TW* dw, const T* dy, const T* x, const T* w,
                             const compute_t<T>* rstd, int64_t rows, int64_t cols, cudaStream_t s) {
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
template void launch_rmsnorm_forward<bf16>(bf16*, float*, const bf16*, const bf16*, float, int64_t,
                                           int64_t, cudaStream_t);
template void launch_rmsnorm_backward<bf16, bf16>(bf16*, bf16*, const bf16*, const bf16*,
                                                  const bf16*, const float*, int64_t, int64_t,
                                                  cudaStream_t);
template void launch_rmsnorm_backward<bf16, float>(bf16*, float*, const bf16*, const bf16*,
                                                   const bf16*, const float*, int64_t, int64_t,
                                                   cudaStream_t);

}  // namespace fm::cuda
