// RMSNorm over the last dim: y = x / sqrt(mean(x^2) + eps) * w;  x, y [N, C], w [C].
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "engine/cpu/elementwise.h"
#include "engine/cpu/vec.h"

namespace fm::cpu {

// rstd[n] = 1 / sqrt(mean_c x[n, c]^2 + eps);  y[n, c] = x[n, c] * rstd[n] * w[c]
template <class T>
void rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, int64_t N, int64_t C, T eps) {
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    const T* xn = x + n * C;
    const T r = T(1) / std::sqrt(dot(xn, xn, C) / static_cast<T>(C) + eps);
    rstd[n] = r;
    for (int64_t c = 0; c < C; ++c) y[n * C + c] = xn[c] * r * w[c];
  }
}

// dx[n, c] = rstd w[c] dy[n, c] - rstd^3 x[n, c] / C * sum_k dy[n, k] w[k] x[n, k]   (written)
// dw[c] += sum_n dy[n, c] x[n, c] rstd[n]   (accumulated; whole columns per thread, rows in order)
template <class T>
void rmsnorm_backward(T* dx, T* dw, const T* dy, const T* x, const T* w, const T* rstd, int64_t N,
                      int64_t C) {
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    const T* xn = x + n * C;
    const T* dyn = dy + n * C;
    const T r = rstd[n];
    T dyw_x = 0;
    for (int64_t c = 0; c < C; ++c) dyw_x += dyn[c] * w[c] * xn[c];
    const T k = r * r * r * dyw_x / static_cast<T>(C);
    for (int64_t c = 0; c < C; ++c) dx[n * C + c] = r * w[c] * dyn[c] - k * xn[c];
  }
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
  for (int64_t c0 = 0; c0 < C; c0 += kColumnBlock) {
    const int64_t c1 = std::min(C, c0 + kColumnBlock);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = c0; c < c1; ++c) dw[c] += dy[n * C + c] * x[n * C + c] * rstd[n];
  }
}

}  // namespace fm::cpu
