// CudaBackend (cuda_backend.h): the backend's lifetime, the factory, and the
// ops whose bodies live in the class. The CUDA backend runs the Backend op set on one
// device, one stream, one cuBLAS handle; the .cu files hold only kernels and
// need no engine header.
//
// All work is queued on the backend's stream in call order; only copies that
// touch host memory, sum_squares (which returns a host value) and
// synchronize() wait for it.
#include "engine/cuda/cuda_backend.h"

namespace fm {

using cuda::CudaBackend;

std::unique_ptr<Backend> make_cuda_backend(int device_index) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw Error(
        fmt::format("CUDA backend: no usable CUDA device: cudaGetDeviceCount failed: {} ({})",
                    cudaGetErrorName(err), cudaGetErrorString(err)));
  }
  FM_CHECK(device_index >= 0 && device_index < count,
           "CUDA backend: device index {} out of range: {} CUDA device(s) visible", device_index,
           count);
  return std::make_unique<CudaBackend>(device_index);
}

// Must not throw or abort: it is how tests and the CLI ask whether to use CUDA
// at all, also on machines with no driver.
bool cuda_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return count >= 1;
}

}  // namespace fm
