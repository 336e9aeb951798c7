// The CUDA device allocator behind Tensor::empty(..., Device::cuda(i)).
// Plain cudaMalloc / cudaFree for now; a caching allocator (no device-wide
// synchronisation on free, stream-aware reuse) replaces it later.
#pragma once

#include "engine/tensor.h"

namespace fm::cuda {

// The process-wide instance; the CUDA backend registers it for DeviceKind::cuda.
Allocator* cuda_allocator();

}  // namespace fm::cuda
