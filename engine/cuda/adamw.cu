// AdamW with decoupled weight decay, in place on f32 param / m / v of equal
// shape (flat n):
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= lr * (m / bc1 / (sqrt(v / bc2) + eps) + wd * p),  bc_i = 1 - b_i^step
// Precision: f32 state and arithmetic; the gradient f32 or bf16 (widened on load, exact);
// the bias corrections are computed in f64 on the host and passed in.
// Speed: memory bound (4 reads + 3 writes per element); one fused pass.
#include "engine/cuda/common.cuh"
#include "engine/cuda/kernels.h"

namespace fm::cuda {

namespace {

template <class TG>
__global__ void adamw_kernel(float* param, const TG* grad, float* m, float* v, int64_t n,
                             AdamWParams p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = widen(grad[i]);
    const float mi = p.beta1 * m[i] + (1.f - p.beta1) * g;
    const float vi = p.beta2 * v[i] + (1.f - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const float m_hat = mi / p.bias_correction1;
    const float v_hat = vi / p.bias_correction2;
    const float w = param[i];
    param[i] = w - p.lr * (m_hat / (sqrtf(v_hat) + p.eps) + p.weight_decay * w);
  }
}

}  // namespace

template <class TG>
void launch_adamw_step(float* param, const TG* grad, float* m, float* v, int64_t n,
                       const AdamWParams& p, cudaStream_t s) {
  if (n == 0) return;
  adamw_kernel<TG><<<blocks_for(n), kThreads, 0, s>>>(param, grad, m, v, n, p);
  FM_CUDA_LAUNCH_CHECK();
}

template void launch_adamw_step<float>(float*, const float*, float*, float*, int64_t,
                                       const AdamWParams&, cudaStream_t);
template void launch_adamw_step<bf16>(float*, const bf16*, float*, float*, int64_t,
                                      const AdamWParams&, cudaStream_t);

}  // namespace fm::cuda
