// Elementwise ops, row/column reductions, SwiGLU and the AdamW update.
// Elementwise loops split freely across threads; each reduction has a fixed
// order (see the comment on each) so results do not depend on the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "engine/cpu/vec.h"

namespace fm::cpu {

// Reductions over a flat array sum fixed-size chunks (a constant, never the thread
// count) and then add the chunk partials in chunk order.
inline constexpr int64_t kReduceChunk = 4096;
// Column reductions give each thread whole blocks of columns; a column's sum runs over
// rows in order.
inline constexpr int64_t kColumnBlock = 64;

// y += alpha * x, over n elements
template <class T>
void axpy(T* y, T alpha, const T* x, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// x *= alpha
template <class T>
void scale(T* x, T alpha, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) x[i] *= alpha;
}

// sum_i x[i]^2 in f64
template <class T>
double sum_squares(const T* x, int64_t n) {
  const int64_t chunks = (n + kReduceChunk - 1) / kReduceChunk;
  std::vector<double> partial(static_cast<size_t>(chunks));
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    double s = 0;
    for (int64_t i = c * kReduceChunk; i < std::min(n, (c + 1) * kReduceChunk); ++i)
      s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
    partial[static_cast<size_t>(c)] = s;
  }
  double total = 0;
  for (double s : partial) total += s;
  return total;
}

// out[n] = sum_c a[n, c] * b[n, c];  a, b [N, C]
template <class T>
void rowwise_dot(T* out, const T* a, const T* b, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) out[n] = dot(a + n * C, b + n * C, C);
}

// out[c] = sum_n x[n, c];  x [N, C]
template <class T>
void column_sum(T* out, const T* x, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
  for (int64_t c0 = 0; c0 < C; c0 += kColumnBlock) {
    const int64_t c1 = std::min(C, c0 + kColumnBlock);
    set_zero(out + c0, c1 - c0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = c0; c < c1; ++c) out[c] += x[n * C + c];
  }
}

// out[n, c] = w[n] * x[n, c];  x, out [N, C]
template <class T>
void scale_rows(T* out, const T* x, const T* w, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) out[n * C + c] = w[n] * x[n * C + c];
}

// x[n, c] += alpha * v[c];  x [N, C]
template <class T>
void add_row_vector(T* x, const T* v, T alpha, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) add_scaled(x + n * C, alpha, v, C);
}

template <class T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// h = silu(gate) * up = gate * sigmoid(gate) * up, elementwise over n
template <class T>
void swiglu_forward(T* h, const T* gate, const T* up, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) h[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

// dgate = dh * up * sig * (1 + gate * (1 - sig)),  dup = dh * silu(gate)
template <class T>
void swiglu_backward(T* dgate, T* dup, const T* dh, const T* gate, const T* up, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) {
    const T sig = sigmoid(gate[i]);
    dgate[i] = dh[i] * up[i] * sig * (T(1) + gate[i] * (T(1) - sig));
    dup[i] = dh[i] * gate[i] * sig;
  }
}

struct AdamWConfig {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;  // t >= 1, for the bias corrections 1 - beta^t
};

// m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
// p -= lr * (m / (1-b1^t) / (sqrt(v / (1-b2^t)) + eps) + wd * p)
template <class T>
void adamw_step(T* p, const T* g, T* m, T* v, int64_t n, const AdamWConfig& cfg) {
  const T b1 = static_cast<T>(cfg.beta1), b2 = static_cast<T>(cfg.beta2);
  const T lr = static_cast<T>(cfg.lr), eps = static_cast<T>(cfg.eps);
  const T wd = static_cast<T>(cfg.weight_decay);
  const T bc1 = static_cast<T>(1.0 - std::pow(cfg.beta1, static_cast<double>(cfg.step)));
  const T bc2 = static_cast<T>(1.0 - std::pow(cfg.beta2, static_cast<double>(cfg.step)));
#pragma omp parallel for schedule(static) if (n > kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) {
    m[i] = b1 * m[i] + (T(1) - b1) * g[i];
    v[i] = b2 * v[i] + (T(1) - b2) * g[i] * g[i];
    p[i] -= lr * (m[i] / bc1 / (std::sqrt(v[i] / bc2) + eps) + wd * p[i]);
  }
}

}  // namespace fm::cpu
