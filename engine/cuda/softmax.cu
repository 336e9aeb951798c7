// Row softmax for the router: probs [N, E] = softmax(logits [N, E]) over E;
// backward writes dlogits = p * (dp - sum_j dp_j p_j).
// Precision: f32 and f64, computed in the tensor's precision; the row max is
// subtracted before exp; sums in a fixed warp-butterfly order.
// Speed: memory bound; one warp per row (E is the expert count, tens to a
// few hundred), the row re-read from L1/L2 for the normalising pass.
#include "engine/cuda/common.cuh"
#include "engine/cuda/kernels.h"

namespace fm::cuda {

namespace {

template <class T>
__global__ void softmax_forward_kernel(T* probs, const T* logits, int64_t rows, int64_t cols) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* x = logits + r * cols;
    T* p = probs + r * cols;
    T mx = -INFINITY;
    for (int64_t c = lane; c < cols; c += 32) mx = fm_max(mx, x[c]);
    mx = warp_max(mx);
    T sum = T(0);
    for (int64_t c = lane; c < cols; c += 32) sum += fm_exp(x[c] - mx);
    sum = warp_sum(sum);
    const T inv = T(1) / sum;
    for (int64_t c = lane; c < cols; c += 32) p[c] = fm_exp(x[c] - mx) * inv;
  }
}

template <class T>
__global__ void softmax_backward_kernel(T* dlogits, const T* dprobs, const T* probs, int64_t rows,
                                        int64_t cols) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* dp = dprobs + r * cols;
    const T* p = probs + r * cols;
    T* dl = dlogits + r * cols;
    T dot = T(0);
    for (int64_t c = lane; c < cols; c += 32) dot += dp[c] * p[c];
    dot = warp_sum(dot);
    for (int64_t c = lane; c < cols; c += 32) dl[c] = p[c] * (dp[c] - dot);
  }
}

}  // namespace

template <class T>
void launch_softmax_forward(T* probs, const T* logits, int64_t rows, int64_t cols, cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  softmax_forward_kernel<T>
      <<<blocks_for(rows, kRowsPerBlock), 32 * kRowsPerBlock, 0, s>>>(probs, logits, rows, cols);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_softmax_backward(T* dlogits, const T* dprobs, const T* probs, int64_t rows,
                             int64_t cols, cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  softmax_backward_kernel<T><<<blocks_for(rows, kRowsPerBlock), 32 * kRowsPerBlock, 0, s>>>(
      dlogits, dprobs, probs, rows, cols);
  FM_CUDA_LAUNCH_CHECK();
}

template void launch_softmax_forward<float>(float*, const float*, int64_t, int64_t, cudaStream_t);
template void launch_softmax_forward<double>(double*, const double*, int64_t, int64_t,
                                             cudaStream_t);
template void launch_softmax_backward<float>(float*, const float*, const float*, int64_t, int64_t,
                                             cudaStream_t);
template void launch_softmax_backward<double>(double*, const double*, const double*, int64_t,
                                              int64_t, cudaStream_t);

}  // namespace fm::cuda
