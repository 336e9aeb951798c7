// RoPE and causal grouped-query attention over packed variable-length sequences
// (the CUDA side of engine/cpu/rope.h and engine/cpu/attention.h).
//
// RoPE: x [N, H, D] in place, one thread per (token, pair i) looping over heads.
// Angles pos * theta^(-2i/D) and their cos/sin in f64 as on the CPU, then rounded
// to T; the rotation is computed without FMA contraction, as the CPU does.
// Speed: memory bound.
//
// Attention: q [N, Hq, D], k/v [N, Hkv, D], out [N, Hq, D], lse [N, Hq].
// One warp per (query token, query head) row; the row's keys are processed in
// chunks of 32 (lane l scores key c + l with a sequential dot over D, like the
// CPU's), with an online softmax: chunk max, rescale, and o += p_j v_j over the
// chunk's keys in order (lanes own D/32 columns of o). The cached variant calls
// the same (non-inlined) row function, so its rows are bit-identical to the
// packed forward's for the same keys. Each warp finds its token's sequence by
// binary search in seq_off.
// Backward (recomputing P from lse as the CPU does): delta = rowwise dout . out
// (reduce.cu), then two kernels that each own their outputs -- dq one warp per
// query row over its keys, dk/dv one warp per key row over the group's query
// heads and the later queries of its sequence -- sums in a fixed order, no
// atomics: bit-identical run to run.
// Precision: f32 and f64, computed in the tensor's precision; also bf16 storage (q, k, v,
// out, the gradients and the KV cache) with f32 lse / delta, computed in f32 exactly as the
// f32 kernels do (values widened on load, rows staged in shared memory as f32, same order of
// operations) and each stored output rounded once to nearest even, so a bf16 call gives the
// bits of the f32 kernel on the widened tensors rounded once; a bf16 KV cache is read in
// place, never widened. RoPE on bf16 is rotated in f32 the same way.
// Speed: math/latency bound; K and V rows are re-read from L1/L2 by every query
// row (no smem tiling across rows yet -- a cuDNN fused path is planned).
#include "engine/cuda/attention_kernels.h"
#include "engine/cuda/common.cuh"

namespace fm::cuda {

namespace {

constexpr int kAttnWarps = 4;  // warps (rows) per block
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float fm_log(float x) {
  return logf(x);
}
__device__ __forceinline__ double fm_log(double x) {
  return log(x);
}
// Round-to-nearest products and sums that the compiler may not fuse into an FMA.
__device__ __forceinline__ float mul_rn(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ double mul_rn(double a, double b) {
  return __dmul_rn(a, b);
}
__device__ __forceinline__ float add_rn(float a, float b) {
  return __fadd_rn(a, b);
}
__device__ __forceinline__ double add_rn(double a, double b) {
  return __dadd_rn(a, b);
}
__device__ __forceinline__ float sub_rn(float a, float b) {
  return __fsub_rn(a, b);
}
__device__ __forceinline__ double sub_rn(double a, double b) {
  return __dsub_rn(a, b);
}

// --- RoPE ----------------------------------------------------------------------

template <class T>
__global__ void rope_kernel(T* x, const int32_t* pos, int64_t n, int64_t heads, int64_t dim,
                            double theta, double sign) {
  const int64_t half = dim / 2, total = n * half;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / half, i = e - t * half;
    const double inv_freq = pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
    const double angle = sign * static_cast<double>(pos[t]) * inv_freq;
    using C = compute_t<T>;  // bf16 storage rotates in f32, rounded once per element
    const C c = static_cast<C>(cos(angle)), s = static_cast<C>(sin(angle));
    for (int64_t h = 0; h < heads; ++h) {
      T* row = x + (t * heads + h) * dim;
      const C x1 = widen(row[i]), x2 = widen(row[i + half]);
      row[i] = narrow<T>(sub_rn(mul_rn(x1, c), mul_rn(x2, s)));
      row[i + half] = narrow<T>(add_rn(mul_rn(x2, c), mul_rn(x1, s)));
    }
  }
}

// --- attention helpers ----------------------------------------------------------

// Token i's sequence [*begin, *end): the last s with seq_off[s] <= i.
__device__ __forceinline__ void sequence_of(const int32_t* seq_off, int64_t num_seqs, int64_t i,
                                            int64_t* begin, int64_t* end) {
  int64_t lo = 1, hi = num_seqs;  // the first s in [1, S] with seq_off[s] > i (seq_off[S] = N > i)
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (seq_off[mid] > i)
      hi = mid;
    else
      lo = mid + 1;
  }
  *begin = seq_off[lo - 1];
  *end = seq_off[lo];
}

// sum_d a[d] * b[d] in order d = 0 .. dim-1 (one lane), each operand widened on load and
// the sum kept in the compute type (a and b: storage in global memory or the compute type in
// shared memory).
template <class A, class B>
__device__ __forceinline__ auto dot_serial(const A* a, const B* b, int64_t dim) {
  using C = decltype(widen(a[0]));
  C s = C(0);
  for (int64_t d = 0; d < dim; ++d) s += widen(a[d]) * widen(b[d]);
  return s;
}

// The warp's slice of dynamic shared memory: `per_warp` values of C (the compute type).
template <class C>
__device__ __forceinline__ C* warp_smem(int64_t per_warp) {
  extern __shared__ __align__(16) unsigned char attn_smem[];
  return reinterpret_cast<C*>(attn_smem) + (threadIdx.x >> 5) * per_warp;
}

// Copies a row of dim stored values into the warp's shared memory, widened (exact).
template <class T>
__device__ __forceinline__ void stage_row(compute_t<T>* dst, const T* src, int64_t dim) {
  for (int64_t d = threadIdx.x & 31; d < dim; d += 32) dst[d] = widen(src[d]);
  __syncwarp();
}

// One query row (q_s in the warp's shared memory) against n keys/values at k0 + j * stride,
// v0 + j * stride: writes o = softmax_j(scale q . k_j) v and returns the log-sum-exp of the
// scaled scores. Called by the whole warp; kept out of line so the packed and the cached
// kernel run the very same instructions (bit-identical rows).
template <class T, int kPerLane>
__device__ __noinline__ compute_t<T> attend_row(T* o_out, const compute_t<T>* q_s, const T* k0,
                                                const T* v0, int64_t n, int64_t stride, int64_t dim,
                                                compute_t<T> scale) {
  using C = compute_t<T>;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  C m = -INFINITY, l = C(0);
  C o[kPerLane];
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) o[t] = C(0);
  for (int64_t c = 0; c < n; c += 32) {
    const int64_t j = c + lane;
    const bool valid = j < n;
    C score = -INFINITY;
    if (valid) score = scale * dot_serial(q_s, k0 + j * stride, dim);
    const C m_new = fm_max(m, warp_max(score));
    const C alpha = fm_exp(m - m_new);  // 0 on the first chunk (m = -inf)
    const C p = valid ? fm_exp(score - m_new) : C(0);
    l = l * alpha + warp_sum(p);
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) o[t] *= alpha;
    const int count = n - c < 32 ? static_cast<int>(n - c) : 32;
    for (int jj = 0; jj < count; ++jj) {
      const C pj = __shfl_sync(kFullMask, p, jj);
      const T* vr = v0 + (c + jj) * stride;
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t d = lane + 32 * t;
        if (d < dim) o[t] += pj * widen(vr[d]);
      }
    }
    m = m_new;
  }
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < dim) o_out[d] = narrow<T>(o[t] / l);
  }
  return m + fm_log(l);
}

// --- attention kernels ----------------------------------------------------------

template <class T, int kPerLane>
__global__ void attention_forward_kernel(T* out, compute_t<T>* lse, const T* q, const T* k,
                                         const T* v, const int32_t* seq_off, int64_t num_seqs,
                                         AttentionShape d, compute_t<T> scale) {
  using C = compute_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kAttnWarps + (threadIdx.x >> 5);
  if (row >= d.n * d.hq) return;  // warp-uniform
  const int64_t i = row / d.hq, h = row - i * d.hq, kvh = h / (d.hq / d.hkv);
  int64_t begin = 0, end = 0;
  sequence_of(seq_off, num_seqs, i, &begin, &end);
  C* q_s = warp_smem<C>(d.dim);
  stage_row(q_s, q + row * d.dim, d.dim);
  const C r = attend_row<T, kPerLane>(out + row * d.dim, q_s, k + (begin * d.hkv + kvh) * d.dim,
                                      v + (begin * d.hkv + kvh) * d.dim, i - begin + 1,
                                      d.hkv * d.dim, d.dim, scale);
  if ((threadIdx.x & 31) == 0) lse[row] = r;
}

template <class T, int kPerLane>
__global__ void attention_cached_kernel(T* out, const T* q, const T* k_cache, const T* v_cache,
                                        const int32_t* slot, const int32_t* pos, AttentionShape d,
                                        int64_t max_len, compute_t<T> scale) {
  using C = compute_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kAttnWarps + (threadIdx.x >> 5);
  if (row >= d.n * d.hq) return;  // warp-uniform
  const int64_t i = row / d.hq, h = row - i * d.hq, kvh = h / (d.hq / d.hkv);
  const int64_t row0 = static_cast<int64_t>(slot[i]) * max_len;  // position 0 of the slot
  C* q_s = warp_smem<C>(d.dim);
  stage_row(q_s, q + row * d.dim, d.dim);
  attend_row<T, kPerLane>(out + row * d.dim, q_s, k_cache + (row0 * d.hkv + kvh) * d.dim,
                          v_cache + (row0 * d.hkv + kvh) * d.dim, static_cast<int64_t>(pos[i]) + 1,
                          d.hkv * d.dim, d.dim, scale);
}

// dq_i = scale sum_j dS_ij k_j over the row's keys in order, with
// P_ij = exp(scale q_i . k_j - lse_i) and dS_ij = P_ij (dO_i . v_j - delta_i).
template <class T, int kPerLane>
__global__ void attention_dq_kernel(T* dq, const T* dout, const T* q, const T* k, const T* v,
                                    const compute_t<T>* lse, const compute_t<T>* delta,
                                    const int32_t* seq_off, int64_t num_seqs, AttentionShape d,
                                    compute_t<T> scale) {
  using C = compute_t<T>;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kAttnWarps + (threadIdx.x >> 5);
  if (row >= d.n * d.hq) return;  // warp-uniform
  const int64_t i = row / d.hq, h = row - i * d.hq, kvh = h / (d.hq / d.hkv);
  int64_t begin = 0, end = 0;
  sequence_of(seq_off, num_seqs, i, &begin, &end);
  C* q_s = warp_smem<C>(2 * d.dim);
  C* do_s = q_s + d.dim;
  stage_row(q_s, q + row * d.dim, d.dim);
  stage_row(do_s, dout + row * d.dim, d.dim);
  const C lse_r = lse[row], delta_r = delta[row];
  const int64_t stride = d.hkv * d.dim, n = i - begin + 1;
  const T* k0 = k + (begin * d.hkv + kvh) * d.dim;
  const T* v0 = v + (begin * d.hkv + kvh) * d.dim;
  C acc[kPerLane];
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) acc[t] = C(0);
  for (int64_t c = 0; c < n; c += 32) {
    const int64_t j = c + lane;
    C g = C(0);  // scale * dS_ij for key j of this lane
    if (j < n) {
      const C p = fm_exp(scale * dot_serial(q_s, k0 + j * stride, d.dim) - lse_r);
      g = scale * (p * (dot_serial(do_s, v0 + j * stride, d.dim) - delta_r));
    }
    const int count = n - c < 32 ? static_cast<int>(n - c) : 32;
    for (int jj = 0; jj < count; ++jj) {
      const C gj = __shfl_sync(kFullMask, g, jj);
      const T* kr = k0 + (c + jj) * stride;
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t dd = lane + 32 * t;
        if (dd < d.dim) acc[t] += gj * widen(kr[dd]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t dd = lane + 32 * t;
    if (dd < d.dim) dq[row * d.dim + dd] = narrow<T>(acc[t]);
  }
}

// dv_j = sum_{h in group, i >= j} P_ij dO_i;  dk_j = scale sum_{h, i} dS_ij q_i, heads of the
// group in order, then queries of the sequence in order (the CPU's order).
template <class T, int kPerLane>
__global__ void attention_dkdv_kernel(T* dk, T* dv, const T* dout, const T* q, const T* k,
                                      const T* v, const compute_t<T>* lse,
                                      const compute_t<T>* delta, const int32_t* seq_off,
                                      int64_t num_seqs, AttentionShape d, compute_t<T> scale) {
  using C = compute_t<T>;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kAttnWarps + (threadIdx.x >> 5);
  if (row >= d.n * d.hkv) return;  // warp-uniform
  const int64_t j = row / d.hkv, kvh = row - j * d.hkv, group = d.hq / d.hkv;
  int64_t begin = 0, end = 0;
  sequence_of(seq_off, num_seqs, j, &begin, &end);
  C* k_s = warp_smem<C>(2 * d.dim);
  C* v_s = k_s + d.dim;
  stage_row(k_s, k + row * d.dim, d.dim);
  stage_row(v_s, v + row * d.dim, d.dim);
  C dk_acc[kPerLane], dv_acc[kPerLane];
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) dk_acc[t] = dv_acc[t] = C(0);
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int64_t c = j; c < end; c += 32) {
      const int64_t i = c + lane;
      C p = C(0), g = C(0);  // P_ij and scale * dS_ij for query i of this lane
      if (i < end) {
        const int64_t qrow = i * d.hq + h;
        p = fm_exp(scale * dot_serial(q + qrow * d.dim, k_s, d.dim) - lse[qrow]);
        g = scale * (p * (dot_serial(dout + qrow * d.dim, v_s, d.dim) - delta[qrow]));
      }
      const int count = end - c < 32 ? static_cast<int>(end - c) : 32;
      for (int ii = 0; ii < count; ++ii) {
        const C pi = __shfl_sync(kFullMask, p, ii), gi = __shfl_sync(kFullMask, g, ii);
        const int64_t base = ((c + ii) * d.hq + h) * d.dim;
#pragma unroll
        for (int t = 0; t < kPerLane; ++t) {
          const int64_t dd = lane + 32 * t;
          if (dd < d.dim) {
            dv_acc[t] += pi * widen(dout[base + dd]);
            dk_acc[t] += gi * widen(q[base + dd]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t dd = lane + 32 * t;
    if (dd < d.dim) {
      dk[row * d.dim + dd] = narrow<T>(dk_acc[t]);
      dv[row * d.dim + dd] = narrow<T>(dv_acc[t]);
    }
  }
}

template <int kValue>
struct PerLane {
  static constexpr int value = kValue;
};

// Calls f(PerLane<P>{}) with P = ceil(dim / 32) rounded up to a power of two (<= 16).
template <class F>
void with_per_lane(int64_t dim, F&& f) {
  if (dim <= 32)
    f(PerLane<1>{});
  else if (dim <= 64)
    f(PerLane<2>{});
  else if (dim <= 128)
    f(PerLane<4>{});
  else if (dim <= 256)
    f(PerLane<8>{});
  else
    f(PerLane<16>{});
}

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kAttnWarps - 1) / kAttnWarps);
}

}  // namespace

template <class T>
void launch_rope(T* x, const int32_t* pos, int64_t n, int64_t heads, int64_t dim, double theta,
                 bool inverse, cudaStream_t s) {
  if (n == 0 || heads == 0 || dim < 2) return;
  rope_kernel<T><<<blocks_for(n * (dim / 2)), kThreads, 0, s>>>(x, pos, n, heads, dim, theta,
                                                                inverse ? -1.0 : 1.0);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_attention_forward(T* out, compute_t<T>* lse, const T* q, const T* k, const T* v,
                              const int32_t* seq_off, int64_t num_seqs, const AttentionShape& d,
                              compute_t<T> scale, cudaStream_t s) {
  const int64_t rows = d.n * d.hq;
  if (rows == 0) return;
  const size_t smem = sizeof(compute_t<T>) * kAttnWarps * static_cast<size_t>(d.dim);
  with_per_lane(d.dim, [&](auto per_lane) {
    attention_forward_kernel<T, decltype(per_lane)::value>
        <<<row_blocks(rows), 32 * kAttnWarps, smem, s>>>(out, lse, q, k, v, seq_off, num_seqs, d,
                                                         scale);
    FM_CUDA_LAUNCH_CHECK();
  });
}

template <class T>
void launch_attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k,
                               const T* v, const compute_t<T>* lse, const compute_t<T>* delta,
                               const int32_t* seq_off, int64_t num_seqs, const AttentionShape& d,
                               compute_t<T> scale, cudaStream_t s) {
  if (d.n == 0 || d.hq == 0) return;
  const size_t smem = sizeof(compute_t<T>) * kAttnWarps * 2 * static_cast<size_t>(d.dim);
  with_per_lane(d.dim, [&](auto per_lane) {
    constexpr int kPerLane = decltype(per_lane)::value;
    attention_dq_kernel<T, kPerLane><<<row_blocks(d.n * d.hq), 32 * kAttnWarps, smem, s>>>(
        dq, dout, q, k, v, lse, delta, seq_off, num_seqs, d, scale);
    FM_CUDA_LAUNCH_CHECK();
    attention_dkdv_kernel<T, kPerLane><<<row_blocks(d.n * d.hkv), 32 * kAttnWarps, smem, s>>>(
        dk, dv, dout, q, k, v, lse, delta, seq_off, num_seqs, d, scale);
    FM_CUDA_LAUNCH_CHECK();
  });
}

template <class T>
void launch_attention_cached(T* out, const T* q, const T* k_cache, const T* v_cache,
                             const int32_t* slot, const int32_t* pos, const AttentionShape& d,
                             int64_t max_len, compute_t<T> scale, cudaStream_t s) {
  const int64_t rows = d.n * d.hq;
  if (rows == 0) return;
  const size_t smem = sizeof(compute_t<T>) * kAttnWarps * static_cast<size_t>(d.dim);
  with_per_lane(d.dim, [&](auto per_lane) {
    attention_cached_kernel<T, decltype(per_lane)::value>
        <<<row_blocks(rows), 32 * kAttnWarps, smem, s>>>(out, q, k_cache, v_cache, slot, pos, d,
                                                         max_len, scale);
    FM_CUDA_LAUNCH_CHECK();
  });
}

#define FM_INSTANTIATE_ATTENTION(T)                                                              \
  template void launch_rope<T>(T*, const int32_t*, int64_t, int64_t, int64_t, double, bool,      \
                               cudaStream_t);                                                    \
  template void launch_attention_forward<T>(T*, compute_t<T>*, const T*, const T*, const T*,     \
                                            const int32_t*, int64_t, const AttentionShape&,      \
                                            compute_t<T>, cudaStream_t);                         \
  template void launch_attention_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*, \
                                             const compute_t<T>*, const compute_t<T>*,           \
                                             const int32_t*, int64_t, const AttentionShape&,     \
                                             compute_t<T>, cudaStream_t);                        \
  template void launch_attention_cached<T>(T*, const T*, const T*, const T*, const int32_t*,     \
                                           const int32_t*, const AttentionShape&, int64_t,       \
                                           compute_t<T>, cudaStream_t);
FM_INSTANTIATE_ATTENTION(float)
FM_INSTANTIATE_ATTENTION(double)
FM_INSTANTIATE_ATTENTION(bf16)
#undef FM_INSTANTIATE_ATTENTION

}  // namespace fm::cuda
