// Elementwise ops: fill, axpy (y += a x), scale (x *= a), add_row_vector
// (x [N, C] += a v [C]).
// Shapes: flat n elements (add_row_vector: [N, C] with v [C]).
// Precision: f32 and f64, computed in the tensor's precision; fill also i32 and bf16 bit
// patterns (uint16_t); axpy and scale also bf16 storage, computed in f32 exactly as the f32
// kernel does (so bit-identical to the widened f32 op) and rounded once to nearest even.
// Speed: memory bound (one read and/or one write per element); grid-stride
// loops over scalar accesses for now, 16-byte vector accesses come with the
// tuned kernels.
#include "engine/cuda/common.cuh"
#include "engine/cuda/kernels.h"

namespace fm::cuda {

namespace {

template <class T>
__global__ void fill_kernel(T* x, int64_t n, T value) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = value;
}

template <class T>
__global__ void axpy_kernel(T* y, compute_t<T> alpha, const T* x, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    compute_t<T> v = widen(y[i]);
    v += alpha * widen(x[i]);
    y[i] = narrow<T>(v);
  }
}

template <class T>
__global__ void scale_kernel(T* x, compute_t<T> alpha, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    compute_t<T> v = widen(x[i]);
    v *= alpha;
    x[i] = narrow<T>(v);
  }
}

template <class T>
__global__ void add_row_vector_kernel(T* x, const T* v, T alpha, int64_t n, int64_t cols) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] += alpha * v[i % cols];
}

}  // namespace

template <class T>
void launch_fill(T* x, int64_t n, T value, cudaStream_t s) {
  if (n == 0) return;
  fill_kernel<T><<<blocks_for(n), kThreads, 0, s>>>(x, n, value);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_axpy(T* y, compute_t<T> alpha, const T* x, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  axpy_kernel<T><<<blocks_for(n), kThreads, 0, s>>>(y, alpha, x, n);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_scale(T* x, compute_t<T> alpha, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  scale_kernel<T><<<blocks_for(n), kThreads, 0, s>>>(x, alpha, n);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_add_row_vector(T* x, const T* v, T alpha, int64_t rows, int64_t cols, cudaStream_t s) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  add_row_vector_kernel<T><<<blocks_for(n), kThreads, 0, s>>>(x, v, alpha, n, cols);
  FM_CUDA_LAUNCH_CHECK();
}

template void launch_fill<float>(float*, int64_t, float, cudaStream_t);
template void launch_fill<double>(double*, int64_t, double, cudaStream_t);
template void launch_fill<int32_t>(int32_t*, int64_t, int32_t, cudaStream_t);
template void launch_fill<uint16_t>(uint16_t*, int64_t, uint16_t, cudaStream_t);
template void launch_axpy<float>(float*, float, const float*, int64_t, cudaStream_t);
template void launch_axpy<double>(double*, double, const double*, int64_t, cudaStream_t);
template void launch_axpy<bf16>(bf16*, float, const bf16*, int64_t, cudaStream_t);
template void launch_scale<float>(float*, float, int64_t, cudaStream_t);
template void launch_scale<double>(double*, double, int64_t, cudaStream_t);
template void launch_scale<bf16>(bf16*, float, int64_t, cudaStream_t);
template void launch_add_row_vector<float>(float*, const float*, float, int64_t, int64_t,
                                           cudaStream_t);
template void launch_add_row_vector<double>(double*, const double*, double, int64_t, int64_t,
                                            cudaStream_t);

}  // namespace fm::cuda
