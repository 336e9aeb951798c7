// The in-process communicator's reduction over ranks on the device: all_reduce and
// reduce_scatter of virtual ranks sharing a GPU (engine/src/comm_device.h).
// Shapes: n flat inputs of `count` elements -> one output.
// Precision: each element is reduced in the inputs' type, in input (rank) order, exactly as
// the host path does (a + b, or b > a ? b : a), so device and host results are
// bit-identical; integer sums wrap through the unsigned type instead of overflowing.
// Speed: memory bound, (n + 1) * count elements moved; grid-stride over the elements, the
// n input pointers passed by value in the kernel's parameters.
#include <type_traits>

#include "engine/cuda/common.cuh"
#include "engine/cuda/kernels.h"

namespace fm::cuda {

namespace {

template <class T>
struct ReduceInputs {
  const T* in[kReduceMaxInputs];
};

template <class T>
__device__ __forceinline__ T reduce_add(T a, T b) {
  if constexpr (std::is_integral_v<T>) {
    using U = std::make_unsigned_t<T>;
    return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
  } else {
    return a + b;
  }
}

template <class T>
__global__ void reduce_inputs_kernel(T* out, ReduceInputs<T> inputs, int n, int64_t count,
                                     bool max) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T acc = inputs.in[0][i];
    for (int p = 1; p < n; ++p) {
      const T v = inputs.in[p][i];
      acc = max ? (v > acc ? v : acc) : reduce_add(acc, v);
    }
    out[i] = acc;
  }
}

}  // namespace

template <class T>
void launch_reduce_inputs(T* out, const T* const* inputs, int n, int64_t count, bool max,
                          cudaStream_t s) {
  if (count <= 0 || n <= 0) return;
  ReduceInputs<T> args{};
  for (int p = 0; p < n && p < kReduceMaxInputs; ++p) args.in[p] = inputs[p];
  reduce_inputs_kernel<T><<<blocks_for(count), kThreads, 0, s>>>(
      out, args, n < kReduceMaxInputs ? n : kReduceMaxInputs, count, max);
  FM_CUDA_LAUNCH_CHECK();
}

template void launch_reduce_inputs<float>(float*, const float* const*, int, int64_t, bool,
                                          cudaStream_t);
template void launch_reduce_inputs<double>(double*, const double* const*, int, int64_t, bool,
                                           cudaStream_t);
template void launch_reduce_inputs<int32_t>(int32_t*, const int32_t* const*, int, int64_t, bool,
                                            cudaStream_t);
template void launch_reduce_inputs<int64_t>(int64_t*, const int64_t* const*, int, int64_t, bool,
                                            cudaStream_t);

}  // namespace fm::cuda
