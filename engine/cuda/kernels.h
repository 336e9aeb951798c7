// Launchers for the CUDA backend's kernels: raw device pointers, sizes and
// the stream. Shape and dtype checks happen in the caller (cuda_backend.cpp);
// these only launch and check the launch. Each template is instantiated for
// float and double in the .cu file of its op family (adamw: float only); the
// memory-bound kernels also for bf16 storage (__nv_bfloat16), which computes in f32
// exactly as the float kernel does and rounds each stored output once to nearest
// even (engine/mixed_precision.h).
//
// Like check.h this header is shared by nvcc (C++17) and the host compiler,
// so it includes no engine header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fm::cuda {

using bf16 = __nv_bfloat16;

// The arithmetic type of a storage type: bf16 computes in f32, f32 and f64 in themselves.
template <class T>
struct ComputeType {
  using type = T;
};
template <>
struct ComputeType<bf16> {
  using type = float;
};
template <class T>
using compute_t = typename ComputeType<T>::type;

// --- convert.cu ---------------------------------------------------------------
// dst[i] = src[i] converted (f32, f64, bf16 in any pair): f32 -> bf16 rounds to nearest
// even, f64 -> bf16 rounds through f32 (as the host's Backend::convert does).
template <class To, class From>
void launch_convert(To* dst, const From* src, int64_t n, cudaStream_t s);

// --- elementwise.cu -----------------------------------------------------------
template <class T>  // fill: also int32_t, and uint16_t for bf16 bit patterns
void launch_fill(T* x, int64_t n, T value, cudaStream_t s);
template <class T>  // y += alpha x (also bf16)
void launch_axpy(T* y, compute_t<T> alpha, const T* x, int64_t n, cudaStream_t s);
template <class T>  // x *= alpha (also bf16)
void launch_scale(T* x, compute_t<T> alpha, int64_t n, cudaStream_t s);
template <class T>  // x [N, C] += alpha * v [C]
void launch_add_row_vector(T* x, const T* v, T alpha, int64_t rows, int64_t cols, cudaStream_t s);

// --- swiglu.cu (also bf16) ----------------------------------------------------
template <class T>
void launch_swiglu_forward(T* h, const T* gate, const T* up, int64_t n, cudaStream_t s);
template <class T>
void launch_swiglu_backward(T* dgate, T* dup, const T* dh, const T* gate, const T* up, int64_t n,
                            cudaStream_t s);

// --- reduce.cu ----------------------------------------------------------------
// Fixed grid for sum_squares: partials needs kSumSquaresBlocks doubles.
inline constexpr int kSumSquaresBlocks = 256;
// Writes sum(x^2) to *result (device). Deterministic: the grid does not depend
// on the device, each block reduces in a fixed tree order and one block adds
// the partials in block order.
template <class T>
void launch_sum_squares(double* result, double* partials, const T* x, int64_t n, cudaStream_t s);
// out[n] = sum_c a[n, c] b[n, c]; TO: T, or bf16 / f32 when T is bf16 (summed in f32).
template <class T, class TO = T>
void launch_rowwise_dot(TO* out, const T* a, const T* b, int64_t rows, int64_t cols,
                        cudaStream_t s);
template <class T>  // out[c] = sum_n x[n, c]
void launch_column_sum(T* out, const T* x, int64_t rows, int64_t cols, cudaStream_t s);

// --- softmax.cu ---------------------------------------------------------------
template <class T>  // probs [N, E] = softmax over each row of logits [N, E]
void launch_softmax_forward(T* probs, const T* logits, int64_t rows, int64_t cols, cudaStream_t s);
template <class T>  // dlogits = p * (dp - sum_j dp_j p_j)
void launch_softmax_backward(T* dlogits, const T* dprobs, const T* probs, int64_t rows,
                             int64_t cols, cudaStream_t s);

// --- rmsnorm.cu ---------------------------------------------------------------
// T: the storage of x, y, w, dy, dx (f32, f64, bf16); rstd is compute_t<T> (f32 for bf16).
template <class T>
void launch_rmsnorm_forward(T* y, compute_t<T>* rstd, const T* x, const T* w, compute_t<T> eps,
                            int64_t rows, int64_t cols, cudaStream_t s);
// dx written, dw accumulated (deterministic column reduction); dw is TW (T, or f32 when T is
// bf16), accumulated in compute_t<T> and rounded once.
template <class T, class TW = T>
void launch_rmsnorm_backward(T* dx, TW* dw, const T* dy, const T* x, const T* w,
                             const compute_t<T>* rstd, int64_t rows, int64_t cols, cudaStream_t s);

// --- adamw.cu -----------------------------------------------------------------
struct AdamWParams {
  float lr, beta1, beta2, eps, weight_decay;
  float bias_correction1;  // 1 - beta1^step, computed in double on the host
  float bias_correction2;  // 1 - beta2^step
};
// grad: float, or bf16 (widened on load) with the f32 param / m / v.
template <class TG>
void launch_adamw_step(float* param, const TG* grad, float* m, float* v, int64_t n,
                       const AdamWParams& p, cudaStream_t s);

// --- comm_reduce.cu: the in-process communicator's reductions (engine/src/comm_device.h) ---
inline constexpr int kReduceMaxInputs = 32;  // inputs per launch; more are chained
// out[i] = in[0][i] op in[1][i] op ... op in[n - 1][i] in input order (op: max when `max`,
// else sum; integer sums wrap). `inputs` is a host array of n <= kReduceMaxInputs device
// pointers; out may alias inputs[0]. T: float, double, int32_t, int64_t.
template <class T>
void launch_reduce_inputs(T* out, const T* const* inputs, int n, int64_t count, bool max,
                          cudaStream_t s);

}  // namespace fm::cuda
