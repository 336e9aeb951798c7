// Grouped GEMM with device-side group offsets (grouped_gemm_kernels.h): the expert GEMMs of
// a decode step routed on the device (model/src/moe_block.cpp, moe_forward_device_routed).
//
// bf16: each block owns one 16 x 64 tile column strip of one group's output: grid
// (n / 64, G, row splits), each block reads its group's offsets and walks that group's
// 16-row tiles (every gridDim.z-th). Per 64-wide slice of k the block stages the x tile
// [16, 64] and the weight tile [64 (k), 64 (n)] in shared memory, zero-padded past every
// edge, and its 4 warps each multiply-accumulate one 16 x 16 output tile with WMMA
// (bf16 x bf16 -> f32). The weight tile keeps the weight's own layout (trans_w: rows of n,
// read as a column-major B; else rows of k, row-major B), so the staging copies are
// contiguous 16-byte loads. The f32 tile is rounded once into y.
// Speed: a decode group has a few rows, so each weight element is read from HBM once per
// 16-row tile, once in all for groups of <= 16 rows: the step is bound by HBM bandwidth,
// which is the decode roofline (model/config.h, decode_step_bytes). Big groups (prefill,
// training) re-read the weights per tile; the host knows their offsets and uses cuBLAS.
//
// f32 / f64: one thread per output element, a binary search of the offsets for its group,
// the dot product in order of k. A reference-grade path for full-precision models.
//
// Weight gradient (launch_grouped_weight_grad_bf16): dw[g] [R, S] += dy_g^T [R, m_g] @ x_g
// [m_g, S] for every group in one launch, the alternative to one cublasGemmEx per expert
// (cuBLAS's grouped-batched call takes no bf16-in / f32-out; CudaGroupedWgrad picks the path).
// Grid (S / 64, R / 64, G): each block owns one 64 x 64 tile of one group's dw, so every
// output element has exactly one writer (no atomics: deterministic for a given shape), and a
// block of an empty group returns before touching dw. The block walks its group's rows in
// chunks of 32: it stages dy's chunk [32 rows][64 of R] and x's chunk [32 rows][64 of S] in
// shared memory (load_tile, zero-padded past the group's last row and past R and S), and each
// of its 4 warps multiply-accumulates a 32 x 32 quarter of the tile as 2 x 2 WMMA fragments
// (bf16 x bf16 -> f32). A = dy^T is dy's chunk read as a column-major matrix_a, so both
// stagings are contiguous row copies (16-byte loads when R and S are multiples of 8). After
// the last chunk the f32 tile is added into dw once: f32 dw += acc; bf16 dw = round(dw + acc).
// Speed (not yet measured on a GPU): a reference kernel. Its loads are synchronous (no
// cp.async double buffering) and it uses WMMA rather than Hopper's wgmma, so on a big group it
// should reach well under cuBLAS's per-GEMM throughput, perhaps a quarter to a half. What it
// saves is launches: one for all G experts instead of G, which matters when the experts are
// many and their groups short (RL batches spread over 64+ experts). A group's rows are walked
// by its R / 64 x S / 64 blocks alone (no split over rows, which would need a second pass or
// atomics), so few, long groups on a small R x S leave most of the GPU idle.
#include <mma.h>

#include <type_traits>

#include "engine/cuda/common.cuh"
#include "engine/cuda/grouped_gemm_kernels.h"

namespace fm::cuda {

namespace {

constexpr int kTileM = 16, kTileN = 64, kTileK = 64;
constexpr int kWarps = kTileN / 16;  // one 16 x 16 accumulator per warp
constexpr int kThreadsPerBlock = 32 * kWarps;
constexpr int kMaxRowSplits = 32;

// dst [R, C] (shared, row-major) = src rows [0, R) and columns [0, C) (global, leading
// dimension ld), zero where r >= rows or c >= cols. kWide: 8 bf16 per load; needs ld, cols
// multiples of 8 and src 16-byte aligned.
template <int R, int C, bool kWide>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, int64_t ld, int64_t rows,
                                          int64_t cols) {
  if constexpr (kWide) {
    constexpr int kPerRow = C / 8;
    for (int i = static_cast<int>(threadIdx.x); i < R * kPerRow; i += kThreadsPerBlock) {
      const int r = i / kPerRow, c = (i % kPerRow) * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows && c < cols) v = *reinterpret_cast<const uint4*>(src + r * ld + c);
      *reinterpret_cast<uint4*>(dst + r * C + c) = v;
    }
  } else {
    for (int i = static_cast<int>(threadIdx.x); i < R * C; i += kThreadsPerBlock) {
      const int r = i / C, c = i % C;
      dst[i] = (r < rows && c < cols) ? src[r * ld + c] : __float2bfloat16_rn(0.0f);
    }
  }
}

template <class Out, bool kTransW, bool kWide>
__global__ void __launch_bounds__(kThreadsPerBlock)
    grouped_bf16_kernel(Out* y, const bf16* x, const bf16* w, const int32_t* off, int64_t n,
                        int64_t k) {
  using namespace nvcuda;
  using BLayout = std::conditional_t<kTransW, wmma::col_major, wmma::row_major>;
  __shared__ __align__(32) bf16 a_tile[kTileM * kTileK];
  // kTransW: [kTileN][kTileK] (the weight's rows of n); else [kTileK][kTileN].
  __shared__ __align__(32) bf16 b_tile[kTileK * kTileN];
  __shared__ __align__(32) float c_tile[kTileM * kTileN];
  const int g = static_cast<int>(blockIdx.y);
  const int64_t lo = off[g], hi = off[g + 1];
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const bf16* wg = w + static_cast<int64_t>(g) * n * k;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t m0 = lo + static_cast<int64_t>(blockIdx.z) * kTileM; m0 < hi;
       m0 += static_cast<int64_t>(gridDim.z) * kTileM) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
      load_tile<kTileM, kTileK, kWide>(a_tile, x + m0 * k + k0, k, hi - m0, k - k0);
      if constexpr (kTransW)
        load_tile<kTileN, kTileK, kWide>(b_tile, wg + n0 * k + k0, k, n - n0, k - k0);
      else
        load_tile<kTileK, kTileN, kWide>(b_tile, wg + k0 * n + n0, n, k - k0, n - n0);
      __syncthreads();
      for (int kk = 0; kk < kTileK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, BLayout> b;
        wmma::load_matrix_sync(a, a_tile + kk, kTileK);
        if constexpr (kTransW)  // B(kk, j) at b_tile[j * kTileK + kk]
          wmma::load_matrix_sync(b, b_tile + warp * 16 * kTileK + kk, kTileK);
        else  // B(kk, j) at b_tile[kk * kTileN + j]
          wmma::load_matrix_sync(b, b_tile + kk * kTileN + warp * 16, kTileN);
        wmma::mma_sync(acc, a, b, acc);
      }
      __syncthreads();  // the tiles are refilled next
    }
    wmma::store_matrix_sync(c_tile + warp * 16, acc, kTileN, wmma::mem_row_major);
    __syncthreads();
    for (int i = static_cast<int>(threadIdx.x); i < kTileM * kTileN; i += kThreadsPerBlock) {
      const int64_t row = m0 + i / kTileN, col = n0 + i % kTileN;
      if (row < hi && col < n) y[row * n + col] = narrow<Out>(c_tile[i]);
    }
    __syncthreads();  // c_tile is rewritten by the next row tile
  }
}

// The weight-gradient kernel's tiling (see the file comment).
constexpr int kWgTile = 64;   // a block's dw tile: kWgTile x kWgTile
constexpr int kWgChunk = 32;  // rows of dy and x staged per step (the GEMM's k)
static_assert(kWarps == 4 && kWgTile == 2 * 32, "4 warps, each a 32 x 32 quarter of the tile");

template <class Out, bool kWide>
__global__ void __launch_bounds__(kThreadsPerBlock)
    grouped_wgrad_bf16_kernel(Out* dw, const bf16* dy, const bf16* x, const int32_t* off, int64_t r,
                              int64_t s) {
  using namespace nvcuda;
  // dy rows [m0, m0 + 32), columns [r0, r0 + 64): A = dy^T, A(i, k) at a_tile[k * 64 + i],
  // i.e. a column-major [64 (of R)] x [32 (rows)] matrix with leading dimension 64.
  __shared__ __align__(32) bf16 a_tile[kWgChunk * kWgTile];
  // x rows [m0, m0 + 32), columns [s0, s0 + 64): B(k, j) at b_tile[k * 64 + j], row-major.
  __shared__ __align__(32) bf16 b_tile[kWgChunk * kWgTile];
  __shared__ __align__(32) float c_tile[kWgTile * kWgTile];
  const int g = static_cast<int>(blockIdx.z);
  const int64_t lo = off[g], hi = off[g + 1];
  if (lo >= hi) return;  // empty group: dw[g] += 0, and dw[g] is not even rewritten
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kWgTile;
  const int64_t s0 = static_cast<int64_t>(blockIdx.x) * kWgTile;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int wi = (warp >> 1) * 32, wj = (warp & 1) * 32;  // the warp's quarter of the tile
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (auto& row : acc)
    for (auto& f : row) wmma::fill_fragment(f, 0.0f);
  for (int64_t m0 = lo; m0 < hi; m0 += kWgChunk) {
    load_tile<kWgChunk, kWgTile, kWide>(a_tile, dy + m0 * r + r0, r, hi - m0, r - r0);
    load_tile<kWgChunk, kWgTile, kWide>(b_tile, x + m0 * s + s0, s, hi - m0, s - s0);
    __syncthreads();
    for (int kk = 0; kk < kWgChunk; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b[2];
      for (int f = 0; f < 2; ++f) {
        wmma::load_matrix_sync(a[f], a_tile + kk * kWgTile + wi + 16 * f, kWgTile);
        wmma::load_matrix_sync(b[f], b_tile + kk * kWgTile + wj + 16 * f, kWgTile);
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are refilled next
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(c_tile + (wi + 16 * i) * kWgTile + wj + 16 * j, acc[i][j], kWgTile,
                              wmma::mem_row_major);
  __syncthreads();
  // beta = 1: one read-add-write per element of the tile, consecutive threads on consecutive
  // columns of dw (coalesced). A bf16 dw is rounded once, from the f32 sum.
  Out* dwg = dw + static_cast<int64_t>(g) * r * s;
  for (int i = static_cast<int>(threadIdx.x); i < kWgTile * kWgTile; i += kThreadsPerBlock) {
    const int64_t row = r0 + i / kWgTile, col = s0 + i % kWgTile;
    if (row < r && col < s) {
      Out& out = dwg[row * s + col];
      out = narrow<Out>(widen(out) + c_tile[i]);
    }
  }
}

template <class T>
__global__ void grouped_simt_kernel(T* y, const T* x, const T* w, const int32_t* off,
                                    int64_t groups, int64_t rows, int64_t n, int64_t k,
                                    bool trans_w) {
  const int64_t total = rows * n;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / n, c = e - i * n;
    int64_t lo = 0, hi = groups - 1;  // the last g with off[g] <= i: the group holding row i
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (off[mid] <= i)
        lo = mid;
      else
        hi = mid - 1;
    }
    const T* wg = w + lo * n * k;
    T acc = T(0);
    for (int64_t j = 0; j < k; ++j) acc += x[i * k + j] * (trans_w ? wg[c * k + j] : wg[j * n + c]);
    y[e] = acc;
  }
}

template <class Out, bool kTransW, bool kWide>
void launch_bf16(Out* y, const bf16* x, const bf16* w, const int32_t* off, dim3 grid, int64_t n,
                 int64_t k, cudaStream_t s) {
  grouped_bf16_kernel<Out, kTransW, kWide><<<grid, kThreadsPerBlock, 0, s>>>(y, x, w, off, n, k);
  FM_CUDA_LAUNCH_CHECK();
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <class Out, bool kWide>
void launch_wgrad(Out* dw, const bf16* dy, const bf16* x, const int32_t* off, dim3 grid, int64_t r,
                  int64_t s, cudaStream_t stream) {
  grouped_wgrad_bf16_kernel<Out, kWide>
      <<<grid, kThreadsPerBlock, 0, stream>>>(dw, dy, x, off, r, s);
  FM_CUDA_LAUNCH_CHECK();
}

}  // namespace

// groups <= 65535 (the grid's y limit): checked by the caller.
template <class Out>
void launch_grouped_gemm_device_bf16(Out* y, const bf16* x, const bf16* w, const int32_t* off,
                                     int64_t groups, int64_t rows, int64_t n, int64_t k,
                                     bool trans_w, cudaStream_t s) {
  if (rows == 0 || n == 0 || groups == 0) return;
  if (k == 0) {  // empty sums: y = 0
    FM_CUDA_CHECK(cudaMemsetAsync(y, 0, sizeof(Out) * static_cast<size_t>(rows * n), s));
    return;
  }
  // Row splits: enough blocks per group for the mean group's 16-row tiles, so a big group does
  // not walk all its tiles in one block; each block strides over its group's tiles.
  const int64_t mean_tiles = (rows / groups + kTileM - 1) / kTileM;
  const int64_t splits =
      mean_tiles < 1 ? 1 : (mean_tiles > kMaxRowSplits ? kMaxRowSplits : mean_tiles);
  const dim3 grid(static_cast<unsigned>((n + kTileN - 1) / kTileN), static_cast<unsigned>(groups),
                  static_cast<unsigned>(splits));
  const bool wide = k % 8 == 0 && n % 8 == 0 && aligned16(x) && aligned16(w);
  if (trans_w) {
    if (wide)
      launch_bf16<Out, true, true>(y, x, w, off, grid, n, k, s);
    else
      launch_bf16<Out, true, false>(y, x, w, off, grid, n, k, s);
  } else {
    if (wide)
      launch_bf16<Out, false, true>(y, x, w, off, grid, n, k, s);
    else
      launch_bf16<Out, false, false>(y, x, w, off, grid, n, k, s);
  }
}

template <class T>
void launch_grouped_gemm_device(T* y, const T* x, const T* w, const int32_t* off, int64_t groups,
                                int64_t rows, int64_t n, int64_t k, bool trans_w, cudaStream_t s) {
  if (rows == 0 || n == 0 || groups == 0) return;
  grouped_simt_kernel<T>
      <<<blocks_for(rows * n), kThreads, 0, s>>>(y, x, w, off, groups, rows, n, k, trans_w);
  FM_CUDA_LAUNCH_CHECK();
}

// groups <= 65535 and R / 64 <= 65535 (the grid's z and y limits), rows < 2^31 (i32
// offsets): checked by the caller.
template <class Out>
void launch_grouped_weight_grad_bf16(Out* dw, const bf16* dy, const bf16* x, const int32_t* off,
                                     int64_t groups, int64_t rows, int64_t r, int64_t s,
                                     cudaStream_t stream) {
  if (rows == 0 || groups == 0 || r == 0 || s == 0) return;  // every dw[g] += 0
  const dim3 grid(static_cast<unsigned>((s + kWgTile - 1) / kWgTile),
                  static_cast<unsigned>((r + kWgTile - 1) / kWgTile),
                  static_cast<unsigned>(groups));
  // 16-byte loads need every staged row to start 16-byte aligned: dy + m * r + r0 with r0 a
  // multiple of 64, so r (and s for x) multiples of 8 and the base pointers aligned.
  if (r % 8 == 0 && s % 8 == 0 && aligned16(dy) && aligned16(x))
    launch_wgrad<Out, true>(dw, dy, x, off, grid, r, s, stream);
  else
    launch_wgrad<Out, false>(dw, dy, x, off, grid, r, s, stream);
}

template void launch_grouped_weight_grad_bf16<float>(float*, const bf16*, const bf16*,
                                                     const int32_t*, int64_t, int64_t, int64_t,
                                                     int64_t, cudaStream_t);
template void launch_grouped_weight_grad_bf16<bf16>(bf16*, const bf16*, const bf16*, const int32_t*,
                                                    int64_t, int64_t, int64_t, int64_t,
                                                    cudaStream_t);
template void launch_grouped_gemm_device_bf16<bf16>(bf16*, const bf16*, const bf16*, const int32_t*,
                                                    int64_t, int64_t, int64_t, int64_t, bool,
                                                    cudaStream_t);
template void launch_grouped_gemm_device_bf16<float>(float*, const bf16*, const bf16*,
                                                     const int32_t*, int64_t, int64_t, int64_t,
                                                     int64_t, bool, cudaStream_t);
template void launch_grouped_gemm_device<float>(float*, const float*, const float*, const int32_t*,
                                                int64_t, int64_t, int64_t, int64_t, bool,
                                                cudaStream_t);
template void launch_grouped_gemm_device<double>(double*, const double*, const double*,
                                                 const int32_t*, int64_t, int64_t, int64_t, int64_t,
                                                 bool, cudaStream_t);

}  // namespace fm::cuda
