// Next-token sampling on the device over logits [R, V]: per row the token that
// model/sampling.h's sample_token draws with the row's uniform u, without copying the
// logits to the host (a decode step then reads back R ids and 2R log-probs, not R x V).
//
// Per row (one block of kSampleThreads threads):
//   stats     lse1 = logsumexp over all V columns (model_logp), and for the sampling
//             columns v < vocab: a finiteness check, the argmax (greedy; ties to the lower
//             id) or lse_t = logsumexp(x / temperature).
//   no truncation (top_k 0 or >= vocab, top_p >= 1): inverse CDF in id order over
//             p_v = exp(x_v / T - lse_t), tile by tile: a block-wide inclusive scan plus the
//             running carry, the first v with carry + scan > u.
//   truncation: the sampling columns sorted by logit, descending, ties in ascending id (a
//             stable segmented radix sort of (logit, id); logit order is probability order
//             since T > 0); the first k = min(top_k, vocab) entries; the nucleus cut at the
//             first prefix whose mass reaches top_p x (their mass); renormalised; inverse
//             CDF over the kept prefix in that order.
// Precision: double throughout (f32 logits are widened), as the CPU. The CPU sums serially
// in one order, the device in a fixed tree order: sums agree to rounding, so a draw whose u
// lies within rounding of a CDF step can pick the neighbouring token (the parity test
// allows exactly that). Deterministic: fixed reduction order, no atomics on values.
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "engine/cuda/common.cuh"
#include "engine/cuda/routing_kernels.h"

namespace fm::cuda {

namespace {

constexpr int kSampleThreads = 256;
constexpr int kSampleWarps = kSampleThreads / 32;
using SampleScan = cub::BlockScan<double, kSampleThreads>;

__device__ __forceinline__ double widen(float x) {
  return static_cast<double>(x);
}
__device__ __forceinline__ double widen(double x) {
  return x;
}

// max over the block (valid in every thread afterwards).
__device__ double block_max_all(double v, double* scratch) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kSampleWarps ? scratch[lane] : -INFINITY;
  v = warp_max(v);
  return v;
}

// sum over the block in a fixed order (valid in every thread afterwards).
__device__ double block_sum_all(double v, double* scratch) {
  __syncthreads();  // earlier readers of scratch are done
  v = block_sum<kSampleThreads>(v, scratch);
  __syncthreads();
  if (threadIdx.x == 0) scratch[0] = v;
  __syncthreads();
  const double out = scratch[0];
  __syncthreads();
  return out;
}

// min over the block of an int64 (valid in every thread afterwards).
__device__ int64_t block_min_all(int64_t v, int64_t* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const int64_t o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = o < v ? o : v;
  }
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  int64_t out = scratch[0];
  for (int w = 1; w < kSampleWarps; ++w) out = scratch[w] < out ? scratch[w] : out;
  return out;
}

// The first i in [0, n) at which the running sum of prob(0) + ... + prob(i) (summed tile by
// tile: a block-wide inclusive scan plus the carry of earlier tiles) satisfies crossed(sum);
// n when none does. Every thread of the block calls it and gets the answer.
template <class Prob, class Crossed>
__device__ int64_t first_crossing(int64_t n, Prob prob, Crossed crossed,
                                  typename SampleScan::TempStorage& storage, double* scratch,
                                  int64_t* iscratch) {
  double carry = 0.0;
  int64_t hit = n;
  for (int64_t base = 0; base < n && hit == n; base += kSampleThreads) {
    const int64_t i = base + threadIdx.x;
    const double p = i < n ? prob(i) : 0.0;
    double cum = 0.0;
    SampleScan(storage).InclusiveSum(p, cum);
    cum += carry;
    hit = block_min_all(i < n && crossed(cum) ? i : n, iscratch);
    carry += block_sum_all(p, scratch);
  }
  return hit;
}

struct SampleConfig {
  double inv_t;  // 1 / temperature (unused when greedy)
  bool greedy;
  bool truncated;
  int64_t k;  // kept by top-k (<= vocab)
  double top_p;
};

__device__ __forceinline__ void report_bad(int64_t* first_bad, int64_t row) {
  atomicMin(reinterpret_cast<unsigned long long*>(first_bad), static_cast<unsigned long long>(row));
}

// Per row: lse1 (all V columns), the finiteness check, and either the greedy result or
// lse_t; rows without truncation are finished here too. Sorting rows leave ids to the
// second kernel. keys/vals (truncation only): the row's sampling columns and their ids.
template <class T>
__global__ void __launch_bounds__(kSampleThreads)
    sample_stats_kernel(int32_t* ids, double* logp, double* model_logp, double* lse_t_out,
                        int64_t* first_bad, T* keys, int32_t* vals, const T* logits,
                        const double* u, int64_t rows, int64_t V, int64_t vocab, SampleConfig cfg) {
  __shared__ double scratch[kSampleWarps];
  __shared__ int64_t iscratch[kSampleWarps];
  __shared__ typename SampleScan::TempStorage scan_storage;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* x = logits + r * V;
    // lse over all V (the model at temperature 1), two passes in a fixed order.
    double m = -INFINITY;
    for (int64_t v = threadIdx.x; v < V; v += kSampleThreads) m = fmax(m, widen(x[v]));
    m = block_max_all(m, scratch);
    double s = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += kSampleThreads) s += exp(widen(x[v]) - m);
    const double lse1 = m + log(block_sum_all(s, scratch));
    // The sampling columns must be finite.
    int64_t bad = vocab;
    for (int64_t v = threadIdx.x; v < vocab; v += kSampleThreads)
      if (!isfinite(widen(x[v]))) {
        bad = v;
        break;
      }
    bad = block_min_all(bad, iscratch);
    if (bad < vocab) {
      if (threadIdx.x == 0) report_bad(first_bad, r);
      continue;
    }
    if (cfg.greedy) {
      // argmax, ties to the lowest id: reduce (value, id) as the max value's lowest id.
      double best = -INFINITY;
      int64_t best_id = vocab;
      for (int64_t v = threadIdx.x; v < vocab; v += kSampleThreads)
        if (widen(x[v]) > best) {
          best = widen(x[v]);
          best_id = v;
        }
      const double top = block_max_all(best, scratch);
      const int64_t id = block_min_all(best == top ? best_id : vocab, iscratch);
      if (threadIdx.x == 0) {
        ids[r] = static_cast<int32_t>(id);
        logp[r] = 0.0;
        model_logp[r] = widen(x[id]) - lse1;
      }
      continue;
    }
    double mt = -INFINITY;
    for (int64_t v = threadIdx.x; v < vocab; v += kSampleThreads)
      mt = fmax(mt, widen(x[v]) * cfg.inv_t);
    mt = block_max_all(mt, scratch);
    double st = 0.0;
    for (int64_t v = threadIdx.x; v < vocab; v += kSampleThreads)
      st += exp(widen(x[v]) * cfg.inv_t - mt);
    const double lse_t = mt + log(block_sum_all(st, scratch));
    if (cfg.truncated) {
      for (int64_t v = threadIdx.x; v < vocab; v += kSampleThreads) {
        keys[r * vocab + v] = x[v];
        vals[r * vocab + v] = static_cast<int32_t>(v);
      }
      if (threadIdx.x == 0) {
        lse_t_out[r] = lse_t;
        model_logp[r] = lse1;  // the second kernel subtracts it from the drawn logit
      }
      continue;
    }
    // Inverse CDF in id order: the first v with cum_v > u[r], else the last column.
    const double ur = u[r];
    const int64_t hit = first_crossing(
        vocab, [&](int64_t v) { return exp(widen(x[v]) * cfg.inv_t - lse_t); },
        [&](double cum) { return !(ur >= cum); }, scan_storage, scratch, iscratch);
    if (threadIdx.x == 0) {
      const int64_t id = hit < vocab ? hit : vocab - 1;
      ids[r] = static_cast<int32_t>(id);
      logp[r] = log(exp(widen(x[id]) * cfg.inv_t - lse_t));
      model_logp[r] = widen(x[id]) - lse1;
    }
  }
}

// Truncated rows, after the sort: sorted keys/vals of each row's sampling columns.
template <class T>
__global__ void __launch_bounds__(kSampleThreads)
    sample_truncated_kernel(int32_t* ids, double* logp, double* model_logp, const T* keys,
                            const int32_t* vals, const double* lse_t_in, const int64_t* first_bad,
                            const double* u, int64_t rows, int64_t vocab, SampleConfig cfg) {
  __shared__ double scratch[kSampleWarps];
  __shared__ int64_t iscratch[kSampleWarps];
  __shared__ typename SampleScan::TempStorage scan_storage;
  if (*first_bad >= 0) return;  // a row failed the finiteness check: the op throws
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* key = keys + r * vocab;
    const int32_t* val = vals + r * vocab;
    const double lse_t = lse_t_in[r];
    const int64_t k = cfg.k;
    // Mass of the top-k set, then the nucleus cut: keep = first i with cum_i >= top_p * total.
    double total = 0.0;
    for (int64_t i = threadIdx.x; i < k; i += kSampleThreads)
      total += exp(widen(key[i]) * cfg.inv_t - lse_t);
    total = block_sum_all(total, scratch);
    int64_t keep = k;
    if (cfg.top_p < 1.0) {
      const double target = cfg.top_p * total;
      const int64_t cut = first_crossing(
          k, [&](int64_t i) { return exp(widen(key[i]) * cfg.inv_t - lse_t); },
          [&](double cum) { return cum >= target; }, scan_storage, scratch, iscratch);
      keep = cut < k ? cut + 1 : k;
    }
    double kept = 0.0;
    for (int64_t i = threadIdx.x; i < keep; i += kSampleThreads)
      kept += exp(widen(key[i]) * cfg.inv_t - lse_t);
    kept = block_sum_all(kept, scratch);
    // Inverse CDF over the kept prefix, renormalised.
    const double ur = u[r];
    const int64_t hit = first_crossing(
        keep, [&](int64_t i) { return exp(widen(key[i]) * cfg.inv_t - lse_t) / kept; },
        [&](double cum) { return !(ur >= cum); }, scan_storage, scratch, iscratch);
    if (threadIdx.x == 0) {
      const int64_t i = hit < keep ? hit : keep - 1;
      ids[r] = val[i];
      logp[r] = log(exp(widen(key[i]) * cfg.inv_t - lse_t) / kept);
      model_logp[r] = widen(key[i]) - model_logp[r];  // model_logp held lse1
    }
  }
}

__global__ void segment_offsets_kernel(int* offsets, int64_t rows, int64_t vocab) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r <= rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x)
    offsets[r] = static_cast<int>(r * vocab);
}

SampleConfig sample_config(double temperature, int64_t top_k, double top_p, int64_t vocab) {
  SampleConfig c{};
  c.greedy = temperature == 0.0;
  c.inv_t = c.greedy ? 0.0 : 1.0 / temperature;
  c.k = top_k > 0 && top_k < vocab ? top_k : vocab;
  c.top_p = top_p;
  c.truncated = !c.greedy && (c.k < vocab || top_p < 1.0);
  return c;
}

size_t aligned(size_t bytes) {
  return (bytes + 255) / 256 * 256;
}

template <class T>
size_t sort_scratch_bytes(int64_t rows, int64_t vocab) {
  size_t bytes = 0;
  FM_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, bytes, static_cast<const T*>(nullptr), static_cast<T*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<int>(rows * vocab), static_cast<int>(rows), static_cast<const int*>(nullptr),
      static_cast<const int*>(nullptr)));
  return bytes;
}

}  // namespace

template <class T>
size_t sample_rows_workspace_bytes(int64_t rows, int64_t vocab, int64_t top_k, double top_p,
                                   double temperature) {
  const SampleConfig c = sample_config(temperature, top_k, top_p, vocab);
  if (!c.truncated) return 0;
  const auto n = static_cast<size_t>(rows * vocab);
  return 2 * aligned(n * sizeof(T)) + 2 * aligned(n * sizeof(int32_t)) +
         aligned(static_cast<size_t>(rows + 1) * sizeof(int)) +
         aligned(static_cast<size_t>(rows) * sizeof(double)) +
         aligned(sort_scratch_bytes<T>(rows, vocab));
}

template <class T>
void launch_sample_rows(int32_t* ids, double* logp, double* model_logp, int64_t* first_bad,
                        const T* logits, const double* u, int64_t rows, int64_t V, int64_t vocab,
                        double temperature, int64_t top_k, double top_p, void* workspace,
                        size_t workspace_bytes, cudaStream_t s) {
  const SampleConfig c = sample_config(temperature, top_k, top_p, vocab);
  FM_CUDA_CHECK(cudaMemsetAsync(first_bad, 0xff, sizeof(int64_t), s));  // -1: none
  if (rows == 0) return;
  const int grid = blocks_for(rows, 1);
  if (!c.truncated) {
    sample_stats_kernel<T><<<grid, kSampleThreads, 0, s>>>(
        ids, logp, model_logp, nullptr, first_bad, nullptr, nullptr, logits, u, rows, V, vocab, c);
    FM_CUDA_LAUNCH_CHECK();
    return;
  }
  if (workspace_bytes < sample_rows_workspace_bytes<T>(rows, vocab, top_k, top_p, temperature))
    throw_cuda_error(cudaErrorInvalidValue, "launch_sample_rows: workspace too small", __FILE__,
                     __LINE__);
  const auto n = static_cast<size_t>(rows * vocab);
  char* base = static_cast<char*>(workspace);
  T* keys_in = reinterpret_cast<T*>(base);
  base += aligned(n * sizeof(T));
  T* keys_out = reinterpret_cast<T*>(base);
  base += aligned(n * sizeof(T));
  int32_t* vals_in = reinterpret_cast<int32_t*>(base);
  base += aligned(n * sizeof(int32_t));
  int32_t* vals_out = reinterpret_cast<int32_t*>(base);
  base += aligned(n * sizeof(int32_t));
  int* offsets = reinterpret_cast<int*>(base);
  base += aligned(static_cast<size_t>(rows + 1) * sizeof(int));
  double* lse_t = reinterpret_cast<double*>(base);
  base += aligned(static_cast<size_t>(rows) * sizeof(double));
  size_t scratch_bytes = sort_scratch_bytes<T>(rows, vocab);
  sample_stats_kernel<T><<<grid, kSampleThreads, 0, s>>>(
      ids, logp, model_logp, lse_t, first_bad, keys_in, vals_in, logits, u, rows, V, vocab, c);
  FM_CUDA_LAUNCH_CHECK();
  segment_offsets_kernel<<<blocks_for(rows + 1), kThreads, 0, s>>>(offsets, rows, vocab);
  FM_CUDA_LAUNCH_CHECK();
  // Stable: equal logits keep ascending ids (the CPU's tie order). All key bits sorted.
  FM_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      base, scratch_bytes, keys_in, keys_out, vals_in, vals_out, static_cast<int>(n),
      static_cast<int>(rows), offsets, offsets + 1, 0, static_cast<int>(sizeof(T) * 8), s));
  sample_truncated_kernel<T><<<grid, kSampleThreads, 0, s>>>(
      ids, logp, model_logp, keys_out, vals_out, lse_t, first_bad, u, rows, vocab, c);
  FM_CUDA_LAUNCH_CHECK();
}

#define FM_SAMPLE_INSTANTIATE(T)                                                                 \
  template size_t sample_rows_workspace_bytes<T>(int64_t, int64_t, int64_t, double, double);     \
  template void launch_sample_rows<T>(int32_t*, double*, double*, int64_t*, const T*,            \
                                      const double*, int64_t, int64_t, int64_t, double, int64_t, \
                                      double, void*, size_t, cudaStream_t);
FM_SAMPLE_INSTANTIATE(float)
FM_SAMPLE_INSTANTIATE(double)
#undef FM_SAMPLE_INSTANTIATE

}  // namespace fm::cuda
