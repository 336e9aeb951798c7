// Embedding lookup and its backward, plus the index check both share.
// Shapes: table/dtable [V, C], ids [N] i32, out/dout [N, C].
// Precision: f32 and f64. The forward is a copy; the backward adds each
// destination row's sources in ascending n, one rounding per add exactly as the
// CPU's scatter_add_rows, so the result is bit-identical to the CPU's and
// repeats bit for bit (no atomics).
// Backward: a stable radix sort of (id, n) pairs (CUB) groups the tokens by
// destination row; then one block column-chunk per run of equal ids reads the
// row once, adds its sources in sorted (= ascending n) order and writes it back.
// Speed: memory bound (every dout element read once, every touched dtable row
// read and written once); the sort is O(N) passes over log2(V) bits.
#include <cub/device/device_radix_sort.cuh>

#include "engine/cuda/attention_kernels.h"
#include "engine/cuda/common.cuh"

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

template <class T>
__global__ void embedding_forward_kernel(T* out, const T* table, const int32_t* ids, int64_t n,
                                         int64_t cols) {
  const int64_t total = n * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / cols, c = e - row * cols;
    out[e] = table[static_cast<int64_t>(ids[row]) * cols + c];
  }
}

__global__ void iota_kernel(int32_t* x, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = static_cast<int32_t>(i);
}

// Block (x = sorted position p, y = column chunk). Only the first position of a run of
// equal ids works: it owns that dtable row, so no two blocks write the same element.
template <class T>
__global__ void embedding_backward_kernel(T* dtable, const T* dout, const uint32_t* sorted_ids,
                                          const int32_t* sorted_src, int64_t n, int64_t cols) {
  const int64_t p = blockIdx.x;
  const uint32_t row = sorted_ids[p];
  if (p > 0 && sorted_ids[p - 1] == row) return;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  T* dst = dtable + static_cast<int64_t>(row) * cols + c;
  T acc = *dst;
  for (int64_t q = p; q < n && sorted_ids[q] == row; ++q)
    acc += dout[static_cast<int64_t>(sorted_src[q]) * cols + c];
  *dst = acc;
}

// Workspace layout: sorted ids, source positions in, source positions out, CUB scratch;
// each part starts on a 256-byte boundary.
constexpr size_t kAlign = 256;
size_t aligned(size_t bytes) {
  return (bytes + kAlign - 1) / kAlign * kAlign;
}

int key_bits(int64_t vocab) {
  int bits = 1;
  while (bits < 32 && (int64_t{1} << bits) < vocab) ++bits;
  return bits;
}

size_t sort_scratch_bytes(int64_t n, int64_t vocab) {
  size_t bytes = 0;
  FM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), static_cast<int>(n), 0,
      key_bits(vocab)));
  return bytes;
}

}  // namespace

void launch_find_bad_id(int64_t* first_bad, const int32_t* ids, int64_t n_ids, int64_t bound,
                        cudaStream_t s) {
  set_value_kernel<<<1, 1, 0, s>>>(first_bad, n_ids);
  FM_CUDA_LAUNCH_CHECK();
  if (n_ids == 0) return;
  find_bad_id_kernel<<<blocks_for(n_ids), kThreads, 0, s>>>(first_bad, ids, n_ids, bound);
  FM_CUDA_LAUNCH_CHECK();
}

template <class T>
void launch_embedding_forward(T* out, const T* table, const int32_t* ids, int64_t n, int64_t cols,
                              cudaStream_t s) {
  if (n == 0 || cols == 0) return;
  embedding_forward_kernel<T><<<blocks_for(n * cols), kThreads, 0, s>>>(out, table, ids, n, cols);
  FM_CUDA_LAUNCH_CHECK();
}

size_t embedding_backward_workspace_bytes(int64_t n, int64_t vocab) {
  const size_t ints = aligned(sizeof(int32_t) * static_cast<size_t>(n));
  return 3 * ints + aligned(sort_scratch_bytes(n, vocab));
}

template <class T>
void launch_embedding_backward(T* dtable, const T* dout, const int32_t* ids, int64_t n,
                               int64_t vocab, int64_t cols, void* workspace, size_t workspace_bytes,
                               cudaStream_t s) {
  if (n == 0 || cols == 0) return;
  const size_t ints = aligned(sizeof(int32_t) * static_cast<size_t>(n));
  size_t scratch_bytes = sort_scratch_bytes(n, vocab);
  if (3 * ints + scratch_bytes > workspace_bytes)
    throw_cuda_error(cudaErrorInvalidValue, "launch_embedding_backward: workspace too small",
                     __FILE__, __LINE__);
  char* base = static_cast<char*>(workspace);
  auto* sorted_ids = reinterpret_cast<uint32_t*>(base);
  auto* src_in = reinterpret_cast<int32_t*>(base + ints);
  auto* src_out = reinterpret_cast<int32_t*>(base + 2 * ints);
  void* scratch = base + 3 * ints;

  iota_kernel<<<blocks_for(n), kThreads, 0, s>>>(src_in, n);
  FM_CUDA_LAUNCH_CHECK();
  // ids were checked to lie in [0, V): as unsigned keys they sort the same, and only the
  // low key_bits(V) bits differ. The radix sort is stable, so equal ids keep ascending n.
  FM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      scratch, scratch_bytes, reinterpret_cast<const uint32_t*>(ids), sorted_ids, src_in, src_out,
      static_cast<int>(n), 0, key_bits(vocab), s));
  const dim3 grid(static_cast<unsigned>(n),
                  static_cast<unsigned>((cols + kThreads - 1) / kThreads));
  embedding_backward_kernel<T>
      <<<grid, kThreads, 0, s>>>(dtable, dout, sorted_ids, src_out, n, cols);
  FM_CUDA_LAUNCH_CHECK();
}

template void launch_embedding_forward<float>(float*, const float*, const int32_t*, int64_t,
                                              int64_t, cudaStream_t);
template void launch_embedding_forward<double>(double*, const double*, const int32_t*, int64_t,
                                               int64_t, cudaStream_t);
template void launch_embedding_backward<float>(float*, const float*, const int32_t*, int64_t,
                                               int64_t, int64_t, void*, size_t, cudaStream_t);
template void launch_embedding_backward<double>(double*, const double*, const int32_t*, int64_t,
                                                int64_t, int64_t, void*, size_t, cudaStream_t);

}  // namespace fm::cuda
