#include "engine/cuda/allocator.h"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <cstdio>

#include "engine/error.h"

namespace fm::cuda {

namespace {

// Device memory straight from cudaMalloc / cudaFree. A caching allocator (no
// device-wide synchronisation on free, stream-aware reuse) replaces this
// later. Allocation happens on the calling thread's current device, which the
// backend's constructor sets; cudaFree waits for the device to go idle, so
// freeing a tensor that queued kernels still use is safe (and slow).
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

}  // namespace

// Never destroyed: tensors may outlive every backend, even static ones.
Allocator* cuda_allocator() {
  static Allocator* a = new CudaAllocator;
  return a;
}

}  // namespace fm::cuda
