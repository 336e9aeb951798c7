// Reductions: sum_squares (whole tensor -> one f64), rowwise_dot
// (out[n] = sum_c a[n, c] b[n, c]) and column_sum (out[c] = sum_n x[n, c]).
// Shapes: flat n; [N, C] -> [N]; [N, C] -> [C].
// Precision: sum_squares accumulates in f64 for any input; rowwise_dot and
// column_sum accumulate in the tensor's precision, in a fixed order (tree
// within warps, sequential across row lanes), so results are deterministic.
// rowwise_dot also takes bf16 a, b with a bf16 or f32 out: computed in f32 exactly as the
// f32 kernel does on the widened values, the result rounded once.
// Speed: memory bound (every element read once). sum_squares uses a fixed
// 256 x 256 grid so its summation order never depends on the device; that
// saturates an H100 for large tensors and is latency bound for small ones.
#include "engine/cuda/common.cuh"
#include "engine/cuda/kernels.h"

namespace fm::cuda {

namespace {

constexpr int kSumSquaresThreads = 256;

template <class T>
__global__ void sum_squares_partial_kernel(double* partials, const T* x, int64_t n) {
  __shared__ double scratch[kSumSquaresThreads / 32];
  double acc = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kSumSquaresThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(kSumSquaresBlocks) * kSumSquaresThreads) {
    const double v = static_cast<double>(x[i]);
    acc += v * v;
  }
  acc = block_sum<kSumSquaresThreads>(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// One block adds the kSumSquaresBlocks partials in a fixed order.
__global__ void sum_squares_final_kernel(double* result, const double* partials) {
  __shared__ double scratch[kSumSquaresBlocks / 32];
  double v = partials[threadIdx.x];
  v = block_sum<kSumSquaresBlocks>(v, scratch);
  if (threadIdx.x == 0) *result = v;
}

// One warp per row; lanes stride over the columns, then a warp butterfly. Inputs widened on
// load, summed in compute_t<T>, the result rounded once to TO.
template <class T, class TO>
__global__ void rowwise_dot_kernel(TO* out, const T* a, const T* b, int64_t rows, int64_t cols) {
  using C = compute_t<T>;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* ar = a + r * cols;
    const T* br = b + r * cols;
    C acc = C(0);
    for (int64_t c = lane; c < cols; c += 32) acc += widen(ar[c]) * widen(br[c]);
    acc = warp_sum(acc);
    if (lane == 0) out[r] = narrow<TO>(acc);
  }
}

template <class T>
struct ColumnSumLoad {
  const T* x;
  int64_t cols;
  __device__ T operator()(int64_t n, int64_t c) const { return x[n * cols + c]; }
};

}  // namespace

template <class T>
void launch_sum_squares(double* result, double* partials, const T* x, int64_t n, cudaStream_t s) {
  static_assert(kSumSquaresBlocks % 32 == 0 && kSumSquaresBlocks <= 1024, "final reduction");
  sum_squares_partial_kernel<T><<<kSumSquaresBlocks, kSumSquaresThreads, 0, s>>>(partials, x, n);
  FM_CUDA_LAUNCH_CHECK();
  sum_squares_final_kernel<<<1, kSumSquaresBlocks, 0, s>>>(result, partials);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T, class TO>
void launch_rowwise_dot(TO* out, const T* a, const T* b, int64_t rows, int64_t cols,
                        cudaStream_t s) {
  if (rows == 0) return;
  rowwise_dot_kernel<T, TO>
      <<<blocks_for(rows, kRowsPerBlock), 32 * kRowsPerBlock, 0, s>>>(out, a, b, rows, cols);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_column_sum(T* out, const T* x, int64_t rows, int64_t cols, cudaStream_t s) {
  launch_column_reduce(out, rows, cols, /*accumulate=*/false, ColumnSumLoad<T>{x, cols}, s);
}

template void launch_sum_squares<float>(double*, double*, const float*, int64_t, cudaStream_t);
template void launch_sum_squares<double>(double*, double*, const double*, int64_t, cudaStream_t);
template void launch_rowwise_dot<float>(float*, const float*, const float*, int64_t, int64_t,
                                        cudaStream_t);
template void launch_rowwise_dot<double>(double*, const double*, const double*, int64_t, int64_t,
                                         cudaStream_t);
template void launch_rowwise_dot<bf16, float>(float*, const bf16*, const bf16*, int64_t, int64_t,
                                              cudaStream_t);
template void launch_rowwise_dot<bf16, bf16>(bf16*, const bf16*, const bf16*, int64_t, int64_t,
                                             cudaStream_t);
template void launch_column_sum<float>(float*, const float*, int64_t, int64_t, cudaStream_t);
template void launch_column_sum<double>(double*, const double*, int64_t, int64_t, cudaStream_t);

}  // namespace fm::cuda
