// CudaBackend ops: top-k and router column ops, token permutation, LM-head log-prob.
// Placeholders until the kernels land: each throws an fm::Error naming the op.
#include "engine/cuda/cuda_backend.h"

namespace fm::cuda {

namespace {

[[noreturn]] void not_implemented(const char* op) {
  throw Error(
      fmt::format("CUDA backend: {} is not implemented yet (see the CUDA backend issue)", op));
}

}  // namespace

void CudaBackend::topk(Tensor&, const Tensor&, const Tensor&) {
  not_implemented("topk");
}
void CudaBackend::gather_cols(Tensor&, const Tensor&, const Tensor&) {
  not_implemented("gather_cols");
}
void CudaBackend::scatter_add_cols(Tensor&, const Tensor&, const Tensor&) {
  not_implemented("scatter_add_cols");
}
void CudaBackend::normalize_rows_forward(Tensor&, const Tensor&) {
  not_implemented("normalize_rows_forward");
}
void CudaBackend::normalize_rows_backward(Tensor&, const Tensor&, const Tensor&) {
  not_implemented("normalize_rows_backward");
}
void CudaBackend::gather_rows(Tensor&, const Tensor&, const Tensor&) {
  not_implemented("gather_rows");
}
void CudaBackend::scatter_rows(Tensor&, const Tensor&, const Tensor&) {
  not_implemented("scatter_rows");
}
void CudaBackend::scatter_add_rows(Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  not_implemented("scatter_add_rows");
}
void CudaBackend::logprob_forward(Tensor&, Tensor&, Tensor&, const Tensor&, const Tensor&) {
  not_implemented("logprob_forward");
}
void CudaBackend::logprob_backward(Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, const Tensor&) {
  not_implemented("logprob_backward");
}

}  // namespace fm::cuda
