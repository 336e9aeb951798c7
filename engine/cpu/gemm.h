// Dense GEMM for the CPU backend: OpenBLAS computes, we split the work.
// C is cut into fixed kGemmTileRows x kGemmTileCols tiles (constants, not derived
// from the thread count) and each tile is one single-threaded BLAS call over the
// full K. Every output element is therefore produced by the same call with the
// same operands however many OpenMP threads run the tiles: bit-identical results.
// Speed is bound by the BLAS micro-kernel (math); the tiles only add threads.
#pragma once

#include <cblas.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "engine/cpu/vec.h"

namespace fm::cpu {

inline constexpr int64_t kGemmTileRows = 128;
inline constexpr int64_t kGemmTileCols = 128;

// c = alpha * op(a) @ op(b) + beta * c on row-major storage with leading dims.
// op(a) is [m, k], op(b) is [k, n], c is [m, n]; callers check the dims fit in int.
template <class T>
struct GemmProblem {
  int64_t m = 0, n = 0, k = 0;
  const T* a = nullptr;
  int64_t lda = 0;
  bool trans_a = false;
  const T* b = nullptr;
  int64_t ldb = 0;
  bool trans_b = false;
  T* c = nullptr;
  int64_t ldc = 0;
  T alpha = 1, beta = 0;
};

inline void blas_gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n,
              k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda,
                      const double* b, int ldb, double beta, double* c, int ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n,
              k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// The tile of c at rows [i0, i0 + kGemmTileRows), cols [j0, j0 + kGemmTileCols).
template <class T>
void gemm_tile(const GemmProblem<T>& p, int64_t i0, int64_t j0) {
  const int64_t mb = std::min(kGemmTileRows, p.m - i0);
  const int64_t nb = std::min(kGemmTileCols, p.n - j0);
  T* c = p.c + i0 * p.ldc + j0;
  if (p.k == 0) {  // empty reduction: c = beta * c (beta == 0 overwrites, NaNs included)
    for (int64_t i = 0; i < mb; ++i)
      for (int64_t j = 0; j < nb; ++j)
        c[i * p.ldc + j] = p.beta == T(0) ? T(0) : p.beta * c[i * p.ldc + j];
    return;
  }
  // Row i of op(a) starts at a + i * lda untransposed, at column i (a + i) transposed.
  const T* a = p.trans_a ? p.a + i0 : p.a + i0 * p.lda;
  const T* b = p.trans_b ? p.b + j0 * p.ldb : p.b + j0;
  blas_gemm(p.trans_a, p.trans_b, static_cast<int>(mb), static_cast<int>(nb), static_cast<int>(p.k),
            p.alpha, a, static_cast<int>(p.lda), b, static_cast<int>(p.ldb), p.beta, c,
            static_cast<int>(p.ldc));
}

// Runs every tile of several independent problems (one for matmul, one per expert
// group for the grouped ops) in a single parallel loop.
template <class T>
void gemm_tiled(const std::vector<GemmProblem<T>>& problems) {
  struct Tile {
    size_t problem;
    int64_t i0, j0;
  };
  std::vector<Tile> tiles;
  int64_t work = 0;  // multiply-adds
  for (size_t p = 0; p < problems.size(); ++p) {
    work += problems[p].m * problems[p].n * problems[p].k;
    for (int64_t i0 = 0; i0 < problems[p].m; i0 += kGemmTileRows)
      for (int64_t j0 = 0; j0 < problems[p].n; j0 += kGemmTileCols) tiles.push_back({p, i0, j0});
  }
  const int64_t count = static_cast<int64_t>(tiles.size());
#pragma omp parallel for schedule(static) if (count > 1 && work > kParallelMinWork)
  for (int64_t t = 0; t < count; ++t)
    gemm_tile(problems[tiles[t].problem], tiles[t].i0, tiles[t].j0);
}

}  // namespace fm::cpu
