// LM-head loss pieces over logits [N, V] (V up to ~152k): per row the log-sum-exp, the
// target log-probability and the entropy; backward writes dlogits [N, V].
// Precision: f32 and f64, in the tensor's precision; also bf16 logits (and dlogits) with f32
// per-row values, computed in f32 exactly as the f32 kernels do on the widened logits (each
// dlogit rounded once). The forward is one online pass: each
// thread keeps (m, s, t) over its columns, m the running max, s = sum exp(x - m) and
// t = sum exp(x - m) (x - m); states merge in a fixed tree order. Then
//   lse = m + log s,   entropy = log s - t / s
// (both terms >= 0, so no cancellation even for large logits). The backward recomputes
// the entropy as the CPU does, sum exp(x - lse) (lse - x), only when dentropy is nonzero.
// Results differ from the CPU's serial vocab-order sums by rounding only, and repeat
// bit for bit (fixed reduction order, no atomics on values).
// Speed: memory bound; one block per row reads the row once (forward) or once, plus once
// more when dentropy is nonzero, and writes it once (backward). No copy of the logits.
#include "engine/cuda/common.cuh"
#include "engine/cuda/routing_kernels.h"

namespace fm::cuda {

namespace {

constexpr int kLogprobThreads = 256;
constexpr int kLogprobWarps = kLogprobThreads / 32;

__device__ __forceinline__ float fm_log(float x) {
  return logf(x);
}
__device__ __forceinline__ double fm_log(double x) {
  return log(x);
}

__device__ __forceinline__ void report_bad(int64_t* first_bad, int64_t row) {
  atomicMin(reinterpret_cast<unsigned long long*>(first_bad), static_cast<unsigned long long>(row));
}

// Online log-sum-exp state over some columns: m = max, s = sum exp(x - m),
// t = sum exp(x - m) (x - m). s == 0 marks the empty state.
template <class T>
struct LseState {
  T m, s, t;
};

template <class T>
__device__ __forceinline__ LseState<T> lse_empty() {
  return {-INFINITY, T(0), T(0)};
}

// Adds one column x. A -inf column adds nothing (its p log p is 0 in the limit; the CPU's
// serial formula gives NaN entropy there, the log-sum-exp agrees).
template <class T>
__device__ __forceinline__ void lse_add(LseState<T>& a, T x) {
  if (x > a.m) {
    if (a.s > T(0)) {  // rescale to the new max: exp(x_i - x) = exp(x_i - m) exp(m - x)
      const T d = a.m - x;
      const T r = fm_exp(d);
      a.t = r * (a.t + d * a.s);
      a.s = a.s * r + T(1);
    } else {
      a.s = T(1);
      a.t = T(0);
    }
    a.m = x;
  } else if (x != -INFINITY) {  // x <= m, or x is NaN (which then propagates through s)
    const T d = x - a.m;
    const T e = fm_exp(d);
    a.s += e;
    a.t += e * d;
  }
}

// Merges two states (empty ones drop out).
template <class T>
__device__ __forceinline__ LseState<T> lse_merge(const LseState<T>& a, const LseState<T>& b) {
  if (a.s == T(0)) return b;  // a NaN s is not empty: it propagates
  if (b.s == T(0)) return a;
  const T m = fm_max(a.m, b.m);
  const T da = a.m - m, db = b.m - m;
  const T ra = fm_exp(da), rb = fm_exp(db);
  return {m, a.s * ra + b.s * rb, ra * (a.t + da * a.s) + rb * (b.t + db * b.s)};
}

template <class T>
__device__ __forceinline__ LseState<T> lse_warp_merge(LseState<T> v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const LseState<T> o{__shfl_xor_sync(0xffffffffu, v.m, offset),
                        __shfl_xor_sync(0xffffffffu, v.s, offset),
                        __shfl_xor_sync(0xffffffffu, v.t, offset)};
    v = lse_merge(v, o);
  }
  return v;
}

// One block per row (grid-stride over rows). Thread 0 writes the row's outputs.
// T: the per-row values and the arithmetic; TL: the logits' storage (T, or bf16 with f32).
template <class T, class TL>
__global__ void __launch_bounds__(kLogprobThreads)
    logprob_forward_kernel(T* logp, T* entropy, T* lse, int64_t* first_bad, const TL* logits,
                           const int32_t* targets, int64_t rows, int64_t vocab) {
  __shared__ LseState<T> partial[kLogprobWarps];
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const TL* x = logits + r * vocab;
    LseState<T> st = lse_empty<T>();
    for (int64_t v = threadIdx.x; v < vocab; v += kLogprobThreads) lse_add(st, widen(x[v]));
    st = lse_warp_merge(st);
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = lane < kLogprobWarps ? partial[lane] : lse_empty<T>();
      st = lse_warp_merge(st);
      if (lane == 0) {
        const T log_s = fm_log(st.s);
        const T l = st.m + log_s;
        lse[r] = l;
        entropy[r] = log_s - st.t / st.s;
        const int32_t t = targets[r];
        if (t >= vocab) report_bad(first_bad, r);
        logp[r] = t >= 0 && t < vocab ? widen(x[t]) - l : T(0);
      }
    }
    __syncthreads();  // partial is rewritten by the next row
  }
}

// Sum over the block, returned to every thread. `scratch` holds kLogprobWarps + 1 values;
// the caller syncs before scratch is written again.
template <class T>
__device__ __forceinline__ T block_sum_all(T v, T* scratch) {
  v = block_sum<kLogprobThreads>(v, scratch);
  if (threadIdx.x == 0) scratch[kLogprobWarps] = v;
  __syncthreads();
  return scratch[kLogprobWarps];
}

// dlogits[n, v] = -dlp p_v - dh p_v (log p_v + H) (+ dlp at v = target), p_v = exp(x_v - lse):
// the CPU's expression, term for term.
template <class T, class TL>
__global__ void __launch_bounds__(kLogprobThreads)
    logprob_backward_kernel(TL* dlogits, int64_t* first_bad, const T* dlogp, const T* dentropy,
                            const TL* logits, const T* lse, const int32_t* targets, int64_t rows,
                            int64_t vocab) {
  __shared__ T scratch[kLogprobWarps + 1];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const TL* x = logits + r * vocab;
    TL* dx = dlogits + r * vocab;
    const T l = lse[r];
    const int32_t t = targets[r];
    if (t >= vocab && threadIdx.x == 0) report_bad(first_bad, r);
    const T dlp = t >= 0 ? dlogp[r] : T(0);
    const T dh = dentropy ? dentropy[r] : T(0);
    T h = T(0);
    if (dh != T(0)) {  // uniform over the block: every thread read the same dentropy[r]
      T part = T(0);
      for (int64_t v = threadIdx.x; v < vocab; v += kLogprobThreads)
        part += fm_exp(widen(x[v]) - l) * (l - widen(x[v]));
      h = block_sum_all(part, scratch);
    }
    for (int64_t v = threadIdx.x; v < vocab; v += kLogprobThreads) {
      const T log_p = widen(x[v]) - l;
      const T p = fm_exp(log_p);
      T g = -dlp * p - dh * p * (log_p + h);
      if (v == t) g += dlp;
      dx[v] = narrow<TL>(g);
    }
    __syncthreads();  // scratch is rewritten by the next row
  }
}

int row_blocks(int64_t rows) {
  return blocks_for(rows, 1);
}

}  // namespace

template <class T, class TL>
void launch_logprob_forward(T* logp, T* entropy, T* lse, int64_t* first_bad, const TL* logits,
                            const int32_t* targets, int64_t rows, int64_t vocab, cudaStream_t s) {
  FM_CUDA_CHECK(cudaMemsetAsync(first_bad, 0xff, sizeof(int64_t), s));  // -1: none
  if (rows == 0 || vocab == 0) return;
  logprob_forward_kernel<T, TL><<<row_blocks(rows), kLogprobThreads, 0, s>>>(
      logp, entropy, lse, first_bad, logits, targets, rows, vocab);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T, class TL>
void launch_logprob_backward(TL* dlogits, int64_t* first_bad, const T* dlogp, const T* dentropy,
                             const TL* logits, const T* lse, const int32_t* targets, int64_t rows,
                             int64_t vocab, cudaStream_t s) {
  FM_CUDA_CHECK(cudaMemsetAsync(first_bad, 0xff, sizeof(int64_t), s));  // -1: none
  if (rows == 0) return;
  logprob_backward_kernel<T, TL><<<row_blocks(rows), kLogprobThreads, 0, s>>>(
      dlogits, first_bad, dlogp, dentropy, logits, lse, targets, rows, vocab);
  FM_CUDA_LAUNCH_CHECK();
}

template void launch_logprob_forward<float>(float*, float*, float*, int64_t*, const float*,
                                            const int32_t*, int64_t, int64_t, cudaStream_t);
template void launch_logprob_forward<double>(double*, double*, double*, int64_t*, const double*,
                                             const int32_t*, int64_t, int64_t, cudaStream_t);
template void launch_logprob_backward<float>(float*, int64_t*, const float*, const float*,
                                             const float*, const float*, const int32_t*, int64_t,
                                             int64_t, cudaStream_t);
template void launch_logprob_backward<double>(double*, int64_t*, const double*, const double*,
                                              const double*, const double*, const int32_t*, int64_t,
                                              int64_t, cudaStream_t);
template void launch_logprob_forward<float, bf16>(float*, float*, float*, int64_t*, const bf16*,
                                                  const int32_t*, int64_t, int64_t, cudaStream_t);
template void launch_logprob_backward<float, bf16>(bf16*, int64_t*, const float*, const float*,
                                                   const bf16*, const float*, const int32_t*,
                                                   int64_t, int64_t, cudaStream_t);

}  // namespace fm::cuda
