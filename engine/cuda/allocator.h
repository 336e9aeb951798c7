// The CUDA device allocator behind Tensor::empty(..., Device::cuda(i)): a
// CachingAllocator (engine/caching_allocator.h) over cudaMalloc / cudaFree,
// one pool per stream. The pool is the calling thread's current stream, set by
// CudaBackend::activate() (every op and Backend::empty call it); a thread that
// has not activated a backend allocates from its current device's null-stream
// pool.
#pragma once

#include <cuda_runtime.h>

#include "engine/caching_allocator.h"
#include "engine/tensor.h"

namespace fm::cuda {

// The process-wide instance; the CUDA backend registers it for DeviceKind::cuda.
Allocator* cuda_allocator();
// Returns every cached block to the device (cudaFree).
void release_cuda_cache();

// The calling thread's current stream (CudaBackend::activate).
void set_current_stream(cudaStream_t s);

}  // namespace fm::cuda
