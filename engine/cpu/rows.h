// Row gathers and scatters: embedding lookup and the token permutation for experts.
// Scatters are the reductions here: sources are grouped by destination row
// (a stable counting sort), and one thread adds all sources of a destination row
// in ascending source order, so the sum never depends on the thread count.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "engine/cpu/vec.h"

namespace fm::cpu {

// For destination rows [0, R): the source rows m with idx[m] == r, ascending, are
// source[begin[r] .. begin[r + 1]).
struct RowsByDestination {
  std::vector<int64_t> begin;   // [R + 1]
  std::vector<int64_t> source;  // [M]
};

// idx [M], every entry in [0, R) (checked by the caller).
inline RowsByDestination rows_by_destination(const int32_t* idx, int64_t M, int64_t R) {
  RowsByDestination g;
  g.begin.assign(static_cast<size_t>(R + 1), 0);
  for (int64_t m = 0; m < M; ++m) ++g.begin[idx[m] + 1];
  for (int64_t r = 0; r < R; ++r) g.begin[r + 1] += g.begin[r];
  std::vector<int64_t> next(g.begin.begin(), g.begin.end() - 1);
  g.source.resize(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) g.source[next[idx[m]]++] = m;
  return g;
}

// out[m, :] = src[idx[m], :];  src [R, C], out [M, C]. Also the embedding lookup.
template <class T>
void gather_rows(T* out, const T* src, const int32_t* idx, int64_t M, int64_t C) {
#pragma omp parallel for schedule(static) if (M * C > kParallelMinWork)
  for (int64_t m = 0; m < M; ++m) std::memcpy(out + m * C, src + idx[m] * C, C * sizeof(T));
}

// dst[idx[m], :] = src[m, :];  dst [R, C], src [M, C], idx distinct (checked by the caller).
template <class T>
void scatter_rows(T* dst, const T* src, const int32_t* idx, int64_t M, int64_t C) {
#pragma omp parallel for schedule(static) if (M * C > kParallelMinWork)
  for (int64_t m = 0; m < M; ++m) std::memcpy(dst + idx[m] * C, src + m * C, C * sizeof(T));
}

// dst[idx[m], :] += w[m] * src[m, :], summed in order of m (w may be null = 1).
// dst [R, C], src [M, C]. Also the embedding backward (w null).
template <class T>
void scatter_add_rows(T* dst, const T* src, const int32_t* idx, const T* w, int64_t M, int64_t R,
                      int64_t C) {
  const RowsByDestination by_dst = rows_by_destination(idx, M, R);
#pragma omp parallel for schedule(static) if (M * C > kParallelMinWork)
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t i = by_dst.begin[r]; i < by_dst.begin[r + 1]; ++i) {
      const int64_t m = by_dst.source[i];
      add_scaled(dst + r * C, w ? w[m] : T(1), src + m * C, C);
    }
  }
}

}  // namespace fm::cpu
