// CudaBackend ops: embedding, RoPE, attention.
// Placeholders until the kernels land: each throws an fm::Error naming the op.
#include "engine/cuda/cuda_backend.h"

namespace fm::cuda {

namespace {

[[noreturn]] void not_implemented(const char* op) {
  throw Error(
      fmt::format("CUDA backend: {} is not implemented yet (see the CUDA backend issue)", op));
}

}  // namespace

void CudaBackend::embedding_forward(Tensor&, const Tensor&, const Tensor&) {
  not_implemented("embedding_forward");
}
void CudaBackend::embedding_backward(Tensor&, const Tensor&, const Tensor&) {
  not_implemented("embedding_backward");
}
void CudaBackend::rope(Tensor&, const Tensor&, double, bool) {
  not_implemented("rope");
}
void CudaBackend::attention_forward(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    const Tensor&, double) {
  not_implemented("attention_forward");
}
void CudaBackend::attention_backward(Tensor&, Tensor&, Tensor&, const Tensor&, const Tensor&,
                                     const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const Tensor&, double) {
  not_implemented("attention_backward");
}
void CudaBackend::attention_cached(Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, const Tensor&, double) {
  not_implemented("attention_cached");
}

}  // namespace fm::cuda
