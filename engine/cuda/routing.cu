// Router and token-permutation kernels: top-k over scores [N, E], the column gather and
// scatter over [N, K] selections, the row normalisation of [N, K], and the row gather /
// scatter / scatter-add that permute tokens [M, C] to and from expert order.
// Precision: f32 and f64, in the tensor's precision. Every kernel rounds exactly as the
// CPU reference (engine/cpu/router.h, rows.h) does: sums run in the CPU's order and
// products are rounded before they are added (no FMA contraction), so results match the
// CPU's bit for bit on IEEE hosts and repeat run to run (no float atomics).
// bf16: the row copies move bit patterns; scatter_add_rows sums in f32 exactly as the f32
// kernel does and rounds each destination once (the other kernels are reached widened).
// Speed: memory bound throughout. Top-k: one warp per row, K passes over the row (each
// selects the next key below the previous one), so O(K E / 32) loads per lane from
// L1/L2, small next to the router GEMM. [N, K] ops: one thread per row (K is small;
// gather_cols: per element).
// Row ops: one thread per element; scatter-add groups sources by destination row with a
// stable radix sort (CUB), then the first position of each run adds the run in order.
#include <climits>
#include <cub/device/device_radix_sort.cuh>

#include "engine/cuda/common.cuh"
#include "engine/cuda/routing_kernels.h"

namespace fm::cuda {

namespace {

__global__ void set_value_kernel(int64_t* x, int64_t value) {
  *x = value;
}

// The smallest bad position wins: atomicMin is order-independent, so the result is too.
__global__ void find_bad_id_kernel(int64_t* first_bad, const int32_t* ids, int64_t n,
                                   int64_t bound) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t id = ids[i];
    if (id < 0 || id >= bound)
      atomicMin(reinterpret_cast<unsigned long long*>(first_bad),
                static_cast<unsigned long long>(i));
  }
}

// Products rounded on their own, as the CPU (no FMA) computes them.
__device__ __forceinline__ float mul_rn(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ double mul_rn(double a, double b) {
  return __dmul_rn(a, b);
}

// Lowers *first_bad (-1 = none, i.e. all bits set as unsigned) to `row`.
__device__ __forceinline__ void report_bad(int64_t* first_bad, int64_t row) {
  atomicMin(reinterpret_cast<unsigned long long*>(first_bad), static_cast<unsigned long long>(row));
}

void reset_bad(int64_t* first_bad, cudaStream_t s) {
  FM_CUDA_CHECK(cudaMemsetAsync(first_bad, 0xff, sizeof(int64_t), s));  // -1
}

// --- top-k -------------------------------------------------------------------------------

// (key, id) pairs in the selection order: larger key first, then lower id. With distinct
// ids this is a strict total order, so the warp-wide best is the same on every lane.
template <class T>
__device__ __forceinline__ bool ranks_before(T key, int id, T other_key, int other_id) {
  return key > other_key || (key == other_key && id < other_id);
}

// One warp per row. Selection k is the best key ranked after selection k - 1, so no set of
// chosen experts is kept: each pass rescans the row (from L1) and skips everything ranked
// at or before the previous pick.
template <class T>
__global__ void topk_kernel(int32_t* ids, int64_t* first_bad, const T* scores, const T* bias,
                            int64_t rows, int64_t experts, int64_t k) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int e_count = static_cast<int>(experts);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* x = scores + r * experts;
    bool nan = false;
    for (int e = lane; e < e_count; e += 32) nan = nan || isnan(x[e] + (bias ? bias[e] : T(0)));
    if (__any_sync(0xffffffffu, nan)) {  // reported; ids 0..K-1, so later ops stay in range
      if (lane == 0) report_bad(first_bad, r);
      for (int64_t j = lane; j < k; j += 32) ids[r * k + j] = static_cast<int32_t>(j);
      continue;
    }
    T prev_key = T(0);
    int prev_id = -1;  // nothing selected yet
    for (int64_t j = 0; j < k; ++j) {
      T best = -INFINITY;
      int best_id = INT_MAX;  // ranks after every real (key, e), -inf keys included
      for (int e = lane; e < e_count; e += 32) {
        const T key = x[e] + (bias ? bias[e] : T(0));  // the CPU's key, rounded the same
        if (prev_id >= 0 && !ranks_before(prev_key, prev_id, key, e)) continue;
        if (ranks_before(key, e, best, best_id)) {
          best = key;
          best_id = e;
        }
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
        const T other = __shfl_xor_sync(0xffffffffu, best, offset);
        const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
        if (ranks_before(other, other_id, best, best_id)) {
          best = other;
          best_id = other_id;
        }
      }
      if (lane == 0) ids[r * k + j] = best_id;
      prev_key = best;
      prev_id = best_id;
    }
  }
}

// --- [N, K] column ops ----------------------------------------------------------------------

template <class T>
__global__ void gather_cols_kernel(T* out, const T* x, const int32_t* ids, int64_t rows,
                                   int64_t experts, int64_t k) {
  const int64_t total = rows * k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = x[(i / k) * experts + ids[i]];
}

template <class T>
__global__ void scatter_add_cols_kernel(T* dx, const T* dout, const int32_t* ids, int64_t rows,
                                        int64_t experts, int64_t k) {
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < rows;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x)
    for (int64_t j = 0; j < k; ++j) dx[n * experts + ids[n * k + j]] += dout[n * k + j];
}

template <class T>
__global__ void normalize_rows_forward_kernel(T* g, const T* p, int64_t rows, int64_t k) {
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < rows;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T* pr = p + n * k;
    T sum = T(0);
    for (int64_t j = 0; j < k; ++j) sum += pr[j];
    for (int64_t j = 0; j < k; ++j) g[n * k + j] = pr[j] / sum;
  }
}

template <class T>
__global__ void normalize_rows_backward_kernel(T* dp, const T* dg, const T* p, int64_t rows,
                                               int64_t k) {
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < rows;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T* pr = p + n * k;
    const T* dgr = dg + n * k;
    T sum = T(0), dg_p = T(0);
    for (int64_t j = 0; j < k; ++j) sum += pr[j];
    for (int64_t j = 0; j < k; ++j) dg_p += mul_rn(dgr[j], pr[j]);
    for (int64_t j = 0; j < k; ++j) dp[n * k + j] = dgr[j] / sum - dg_p / (sum * sum);
  }
}

// --- row ops: one thread per element -------------------------------------------------------

template <class T>
__global__ void gather_rows_kernel(T* out, const T* src, const int32_t* idx, int64_t m,
                                   int64_t cols) {
  const int64_t total = m * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / cols, c = e - row * cols;
    out[e] = src[static_cast<int64_t>(idx[row]) * cols + c];
  }
}

template <class T>
__global__ void scatter_rows_kernel(T* dst, const T* src, const int32_t* idx, int64_t m,
                                    int64_t cols) {
  const int64_t total = m * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / cols, c = e - row * cols;
    dst[static_cast<int64_t>(idx[row]) * cols + c] = src[e];
  }
}

__global__ void iota_kernel(int32_t* x, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = static_cast<int32_t>(i);
}

// Sorted position p repeats a destination when the position before it has the same row;
// the stable sort keeps each run in ascending m, so the smallest such source is the first
// m that repeats an earlier one.
__global__ void find_repeated_row_kernel(int64_t* first_bad, const uint32_t* sorted_rows,
                                         const int32_t* sorted_src, int64_t m) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x + 1; p < m;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x)
    if (sorted_rows[p] == sorted_rows[p - 1]) report_bad(first_bad, sorted_src[p]);
}

// Element (p, c) of the sorted sources. Only the first position of a run of equal rows
// works: it owns that dst row, reads it once, adds the run's sources in ascending m and
// writes it back, so no two threads touch one dst element.
template <class T>
__global__ void scatter_add_rows_kernel(T* dst, const T* src, const T* w,
                                        const uint32_t* sorted_rows, const int32_t* sorted_src,
                                        int64_t m, int64_t cols) {
  const int64_t total = m * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = e / cols, c = e - p * cols;
    const uint32_t row = sorted_rows[p];
    if (p > 0 && sorted_rows[p - 1] == row) continue;
    T* d = dst + static_cast<int64_t>(row) * cols + c;
    compute_t<T> acc = widen(*d);  // bf16: summed in f32, rounded once
    for (int64_t q = p; q < m && sorted_rows[q] == row; ++q) {
      const int64_t j = sorted_src[q];
      const compute_t<T> v = widen(src[j * cols + c]);
      acc = acc + (w ? mul_rn(widen(w[j]), v) : v);  // CPU: y += w * x, with w = 1 when null
    }
    *d = narrow<T>(acc);
  }
}

// --- grouping by destination: a stable radix sort of (idx[m], m) ---------------------------

// Workspace layout: sorted rows, source positions in, source positions out, CUB scratch;
// each part starts on a 256-byte boundary.
constexpr size_t kAlign = 256;
size_t aligned(size_t bytes) {
  return (bytes + kAlign - 1) / kAlign * kAlign;
}

int key_bits(int64_t rows) {
  int bits = 1;
  while (bits < 32 && (int64_t{1} << bits) < rows) ++bits;
  return bits;
}

size_t sort_scratch_bytes(int64_t m, int64_t rows) {
  size_t bytes = 0;
  FM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), static_cast<int>(m), 0,
      key_bits(rows)));
  return bytes;
}

struct RowsByDestination {
  const uint32_t* rows;  // [m] destination rows, ascending
  const int32_t* src;    // [m] their source positions, ascending within a row
};

// Sorts idx [m] (as unsigned keys on the low key_bits(rows) bits; entries outside
// [0, rows) land somewhere but are never dereferenced here).
RowsByDestination sort_by_destination(const int32_t* idx, int64_t m, int64_t rows, void* workspace,
                                      size_t workspace_bytes, cudaStream_t s) {
  const size_t ints = aligned(sizeof(int32_t) * static_cast<size_t>(m));
  size_t scratch_bytes = sort_scratch_bytes(m, rows);
  if (3 * ints + scratch_bytes > workspace_bytes)
    throw_cuda_error(cudaErrorInvalidValue, "sort_by_destination: workspace too small", __FILE__,
                     __LINE__);
  char* base = static_cast<char*>(workspace);
  auto* sorted_rows = reinterpret_cast<uint32_t*>(base);
  auto* src_in = reinterpret_cast<int32_t*>(base + ints);
  auto* src_out = reinterpret_cast<int32_t*>(base + 2 * ints);
  iota_kernel<<<blocks_for(m), kThreads, 0, s>>>(src_in, m);
  FM_CUDA_LAUNCH_CHECK();
  FM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      base + 3 * ints, scratch_bytes, reinterpret_cast<const uint32_t*>(idx), sorted_rows, src_in,
      src_out, static_cast<int>(m), 0, key_bits(rows), s));
  return {sorted_rows, src_out};
}

// Keys for the assignment sort: key[j] where in [0, n_keys), else 0 (and reported).
__global__ void clamp_keys_kernel(int32_t* out, int64_t* first_bad, const int32_t* key, int64_t nk,
                                  int64_t n_keys) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nk;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t e = key[j];
    const bool bad = e < 0 || e >= n_keys;
    if (bad) report_bad(first_bad, j);
    out[j] = bad ? 0 : e;
  }
}

__global__ void assignment_rows_kernel(int32_t* perm_assign, int32_t* perm_token,
                                       const int32_t* sorted_src, int64_t nk, int64_t k) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < nk;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t j = sorted_src[p];
    perm_assign[p] = j;
    perm_token[p] = static_cast<int32_t>(j / k);
  }
}

// offsets[g] = the first position p of sorted_keys [nk] (ascending) with key >= g.
__global__ void group_offsets_kernel(int32_t* offsets, const uint32_t* sorted_keys, int64_t nk,
                                     int64_t n_keys) {
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g <= n_keys;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = nk;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (static_cast<int64_t>(sorted_keys[mid]) < g)
        lo = mid + 1;
      else
        hi = mid;
    }
    offsets[g] = static_cast<int32_t>(lo);
  }
}

}  // namespace

size_t sort_assignments_workspace_bytes(int64_t nk, int64_t n_keys) {
  return aligned(sizeof(int32_t) * static_cast<size_t>(nk)) +
         rows_by_destination_workspace_bytes(nk, n_keys);
}

void launch_sort_assignments(int32_t* offsets, int32_t* perm_assign, int32_t* perm_token,
                             int64_t* first_bad, const int32_t* key, int64_t nk, int64_t k,
                             int64_t n_keys, void* workspace, size_t workspace_bytes,
                             cudaStream_t s) {
  const size_t keys_bytes = aligned(sizeof(int32_t) * static_cast<size_t>(nk));
  if (keys_bytes > workspace_bytes)
    throw_cuda_error(cudaErrorInvalidValue, "launch_sort_assignments: workspace too small",
                     __FILE__, __LINE__);
  auto* keys = static_cast<int32_t*>(workspace);
  const uint32_t* sorted_keys = nullptr;
  if (nk > 0) {
    clamp_keys_kernel<<<blocks_for(nk), kThreads, 0, s>>>(keys, first_bad, key, nk, n_keys);
    FM_CUDA_LAUNCH_CHECK();
    const RowsByDestination by_key =
        sort_by_destination(keys, nk, n_keys, static_cast<char*>(workspace) + keys_bytes,
                            workspace_bytes - keys_bytes, s);
    assignment_rows_kernel<<<blocks_for(nk), kThreads, 0, s>>>(perm_assign, perm_token, by_key.src,
                                                               nk, k);
    FM_CUDA_LAUNCH_CHECK();
    sorted_keys = by_key.rows;
  }
  group_offsets_kernel<<<blocks_for(n_keys + 1), kThreads, 0, s>>>(offsets, sorted_keys, nk,
                                                                   n_keys);
  FM_CUDA_LAUNCH_CHECK();
}

void launch_find_bad_id(int64_t* first_bad, const int32_t* ids, int64_t n_ids, int64_t bound,
                        cudaStream_t s) {
  set_value_kernel<<<1, 1, 0, s>>>(first_bad, n_ids);
  FM_CUDA_LAUNCH_CHECK();
  if (n_ids == 0) return;
  find_bad_id_kernel<<<blocks_for(n_ids), kThreads, 0, s>>>(first_bad, ids, n_ids, bound);
  FM_CUDA_LAUNCH_CHECK();
}

// --- launchers -------------------------------------------------------------------------------

template <class T>
void launch_topk(int32_t* ids, int64_t* first_bad, const T* scores, const T* bias, int64_t rows,
                 int64_t experts, int64_t k, cudaStream_t s) {
  if (rows == 0 || k == 0) return;
  topk_kernel<T><<<blocks_for(rows, kRowsPerBlock), 32 * kRowsPerBlock, 0, s>>>(
      ids, first_bad, scores, bias, rows, experts, k);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_gather_cols(T* out, const T* x, const int32_t* ids, int64_t rows, int64_t experts,
                        int64_t k, cudaStream_t s) {
  if (rows == 0 || k == 0) return;
  gather_cols_kernel<T><<<blocks_for(rows * k), kThreads, 0, s>>>(out, x, ids, rows, experts, k);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_scatter_add_cols(T* dx, const T* dout, const int32_t* ids, int64_t rows,
                             int64_t experts, int64_t k, cudaStream_t s) {
  if (rows == 0 || k == 0) return;
  scatter_add_cols_kernel<T><<<blocks_for(rows), kThreads, 0, s>>>(dx, dout, ids, rows, experts, k);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_normalize_rows_forward(T* g, const T* p, int64_t rows, int64_t k, cudaStream_t s) {
  if (rows == 0 || k == 0) return;
  normalize_rows_forward_kernel<T><<<blocks_for(rows), kThreads, 0, s>>>(g, p, rows, k);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_normalize_rows_backward(T* dp, const T* dg, const T* p, int64_t rows, int64_t k,
                                    cudaStream_t s) {
  if (rows == 0 || k == 0) return;
  normalize_rows_backward_kernel<T><<<blocks_for(rows), kThreads, 0, s>>>(dp, dg, p, rows, k);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_gather_rows(T* out, const T* src, const int32_t* idx, int64_t m, int64_t cols,
                        cudaStream_t s) {
  if (m == 0 || cols == 0) return;
  gather_rows_kernel<T><<<blocks_for(m * cols), kThreads, 0, s>>>(out, src, idx, m, cols);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_scatter_rows(T* dst, const T* src, const int32_t* idx, int64_t m, int64_t cols,
                         cudaStream_t s) {
  if (m == 0 || cols == 0) return;
  scatter_rows_kernel<T><<<blocks_for(m * cols), kThreads, 0, s>>>(dst, src, idx, m, cols);
  FM_CUDA_LAUNCH_CHECK();
}

size_t rows_by_destination_workspace_bytes(int64_t m, int64_t rows) {
  return 3 * aligned(sizeof(int32_t) * static_cast<size_t>(m)) +
         aligned(sort_scratch_bytes(m, rows));
}

void launch_find_repeated_row(int64_t* first_bad, const int32_t* idx, int64_t m, int64_t rows,
                              void* workspace, size_t workspace_bytes, cudaStream_t s) {
  reset_bad(first_bad, s);
  if (m < 2) return;
  const RowsByDestination by_dst = sort_by_destination(idx, m, rows, workspace, workspace_bytes, s);
  find_repeated_row_kernel<<<blocks_for(m), kThreads, 0, s>>>(first_bad, by_dst.rows, by_dst.src,
                                                              m);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_scatter_add_rows(T* dst, const T* src, const int32_t* idx, const T* w, int64_t m,
                             int64_t rows, int64_t cols, void* workspace, size_t workspace_bytes,
                             cudaStream_t s) {
  if (m == 0 || cols == 0) return;
  const RowsByDestination by_dst = sort_by_destination(idx, m, rows, workspace, workspace_bytes, s);
  scatter_add_rows_kernel<T>
      <<<blocks_for(m * cols), kThreads, 0, s>>>(dst, src, w, by_dst.rows, by_dst.src, m, cols);
  FM_CUDA_LAUNCH_CHECK();
}

#define FM_ROUTING_INSTANTIATE(T)                                                                 \
  template void launch_topk<T>(int32_t*, int64_t*, const T*, const T*, int64_t, int64_t, int64_t, \
                               cudaStream_t);                                                     \
  template void launch_gather_cols<T>(T*, const T*, const int32_t*, int64_t, int64_t, int64_t,    \
                                      cudaStream_t);                                              \
  template void launch_scatter_add_cols<T>(T*, const T*, const int32_t*, int64_t, int64_t,        \
                                           int64_t, cudaStream_t);                                \
  template void launch_normalize_rows_forward<T>(T*, const T*, int64_t, int64_t, cudaStream_t);   \
  template void launch_normalize_rows_backward<T>(T*, const T*, const T*, int64_t, int64_t,       \
                                                  cudaStream_t);                                  \
  template void launch_gather_rows<T>(T*, const T*, const int32_t*, int64_t, int64_t,             \
                                      cudaStream_t);                                              \
  template void launch_scatter_rows<T>(T*, const T*, const int32_t*, int64_t, int64_t,            \
                                       cudaStream_t);                                             \
  template void launch_scatter_add_rows<T>(T*, const T*, const int32_t*, const T*, int64_t,       \
                                           int64_t, int64_t, void*, size_t, cudaStream_t);
FM_ROUTING_INSTANTIATE(float)
FM_ROUTING_INSTANTIATE(double)
#undef FM_ROUTING_INSTANTIATE
template void launch_scatter_add_rows<bf16>(bf16*, const bf16*, const int32_t*, const bf16*,
                                            int64_t, int64_t, int64_t, void*, size_t, cudaStream_t);
// The row copies move bf16 as bit patterns (a copy needs no arithmetic).
template void launch_gather_rows<uint16_t>(uint16_t*, const uint16_t*, const int32_t*, int64_t,
                                           int64_t, cudaStream_t);
template void launch_scatter_rows<uint16_t>(uint16_t*, const uint16_t*, const int32_t*, int64_t,
                                            int64_t, cudaStream_t);

}  // namespace fm::cuda
