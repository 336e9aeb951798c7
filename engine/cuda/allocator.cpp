#include "engine/cuda/allocator.h"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <cstdio>

#include "engine/error.h"

namespace fm::cuda {

namespace {

// Device memory straight from cudaMalloc / cudaFree: the caching allocator's
// source. Allocation happens on the calling thread's current device, which
// CudaBackend::activate sets; cudaFree waits for the device to go idle, so
// releasing a cached block that queued kernels still use is safe.
class CudaAllocator final : public Allocator {
 public:
  void* allocate(size_t bytes) override {
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // an allocation failure is not sticky; clear it
      size_t free_bytes = 0, total_bytes = 0;
      if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) (void)cudaGetLastError();
      throw Error(fmt::format("cudaMalloc of {} bytes failed: {} ({}); {} of {} bytes free", bytes,
                              cudaGetErrorName(err), cudaGetErrorString(err), free_bytes,
                              total_bytes));
    }
    return p;
  }
  // Called from tensor destructors, so it must not throw: a failure is reported
  // on stderr instead (except at process exit, when the runtime is already gone).
  void deallocate(void* p) override {
    if (p == nullptr) return;
    const cudaError_t err = cudaFree(p);
    if (err != cudaSuccess && err != cudaErrorCudartUnloading)
      std::fprintf(stderr, "foremoe: cudaFree(%p) failed: %s (%s)\n", p, cudaGetErrorName(err),
                   cudaGetErrorString(err));
  }
};

thread_local cudaStream_t t_stream = nullptr;

// A stream's address names its pool; the null stream's pool is per device (keys 1, 2, ...,
// which no stream object can have as its address).
CachingAllocator::PoolKey pool_of_caller() {
  if (t_stream != nullptr) return reinterpret_cast<CachingAllocator::PoolKey>(t_stream);
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) (void)cudaGetLastError();
  return static_cast<CachingAllocator::PoolKey>(device) + 1;
}

// Never destroyed: tensors may outlive every backend, even static ones.
CachingAllocator& caching() {
  static CachingAllocator* a = new CachingAllocator(*new CudaAllocator, pool_of_caller);
  return *a;
}

}  // namespace

Allocator* cuda_allocator() {
  return &caching();
}
void release_cuda_cache() {
  caching().release_cached();
}
void set_current_stream(cudaStream_t s) {
  t_stream = s;
}

}  // namespace fm::cuda

namespace fm {

CacheStats cuda_memory_stats() {
  return cuda::caching().stats();
}
void reset_cuda_memory_peak() {
  cuda::caching().reset_peak();
}

}  // namespace fm
