// CudaBackend (cuda_backend.h): the backend's lifetime, the factory, and the
// ops whose bodies live in the class. The CUDA backend runs the Backend op set on one
// device, one stream, one cuBLAS handle; the .cu files hold only kernels and
// need no engine header.
//
// All work is queued on the backend's stream in call order; only device-to-host copies (and
// host-to-device ones too large for the pinned staging ring, staging.h), sum_squares (which
// returns a host value), the index checks and synchronize() wait for it.
#include "engine/cuda/cuda_backend.h"

#include <type_traits>

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

namespace {
template <class B>
auto& as_cuda(B& backend, const char* what) {
  auto* cuda =
      dynamic_cast<std::conditional_t<std::is_const_v<B>, const CudaBackend, CudaBackend>*>(
          &backend);
  FM_CHECK(cuda != nullptr, "{}: the backend is {}, not a CUDA backend", what,
           device_name(backend.device()));
  return *cuda;
}
}  // namespace

void set_cuda_dense_gemm(Backend& cuda_backend, CudaDenseGemm api) {
  as_cuda(cuda_backend, "set_cuda_dense_gemm").set_dense_gemm(api);
}

void set_cuda_grouped_wgrad(Backend& cuda_backend, CudaGroupedWgrad path) {
  as_cuda(cuda_backend, "set_cuda_grouped_wgrad").set_grouped_wgrad(path);
}

void set_cuda_attention(Backend& cuda_backend, CudaAttention path) {
  FM_CHECK(path != CudaAttention::cudnn || cuda::CudnnSdpa::available(),
           "set_cuda_attention: this foremoe build has no cuDNN (configured without it), so "
           "attention runs on foremoe's kernels only");
  as_cuda(cuda_backend, "set_cuda_attention").set_attention(path);
}

bool cuda_has_cudnn() {
  return cuda::CudnnSdpa::available();
}

CudaAttentionStats cuda_attention_stats(const Backend& cuda_backend) {
  return as_cuda(cuda_backend, "cuda_attention_stats").attention_stats();
}

CudaGemmStats cuda_gemm_stats(const Backend& cuda_backend) {
  return as_cuda(cuda_backend, "cuda_gemm_stats").gemm_stats();
}

int64_t cuda_staged_uploads(const Backend& cuda_backend) {
  return as_cuda(cuda_backend, "cuda_staged_uploads").staged_uploads();
}

// Must not throw or abort: it is how tests and the CLI ask whether to use CUDA
// at all, also on machines with no driver (cuda_device_count too).
bool cuda_available() {
  return cuda_device_count() >= 1;
}

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace fm
