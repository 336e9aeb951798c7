// Router pieces over [N, E] scores and [N, K] selections: softmax, top-k,
// column gather/scatter and row normalisation. Every op works row by row; a
// thread owns whole rows, so a row's result never depends on the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "engine/cpu/vec.h"

namespace fm::cpu {

// probs[n, :] = exp(logits[n, :] - max) / sum exp(logits[n, :] - max)
template <class T>
void softmax_forward(T* probs, const T* logits, int64_t N, int64_t E) {
  if (E == 0) return;
#pragma omp parallel for schedule(static) if (N * E > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    const T* x = logits + n * E;
    T* p = probs + n * E;
    const T m = max_of(x, E);
    T sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(x[e] - m));
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
  }
}

// dlogits[n, e] = p[n, e] * (dp[n, e] - sum_k dp[n, k] p[n, k])
template <class T>
void softmax_backward(T* dlogits, const T* dprobs, const T* probs, int64_t N, int64_t E) {
#pragma omp parallel for schedule(static) if (N * E > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    const T* p = probs + n * E;
    const T* dp = dprobs + n * E;
    const T mean = dot(dp, p, E);
    for (int64_t e = 0; e < E; ++e) dlogits[n * E + e] = p[e] * (dp[e] - mean);
  }
}

// ids[n, :] = the K experts with the largest scores[n, e] + bias[e] (bias may be null),
// in descending order, ties to the lower expert id. Returns the first row whose keys
// contain a NaN (its ids are left unwritten), or -1.
template <class T>
int64_t topk(int32_t* ids, const T* scores, const T* bias, int64_t N, int64_t E, int64_t K) {
  std::vector<char> has_nan(static_cast<size_t>(N), 0);
#pragma omp parallel if (N * E > kParallelMinWork)
  {
    std::vector<T> key(static_cast<size_t>(E));
    std::vector<int32_t> order(static_cast<size_t>(E));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      bool nan = false;
      for (int64_t e = 0; e < E; ++e) {
        key[e] = scores[n * E + e] + (bias ? bias[e] : T(0));
        nan = nan || std::isnan(key[e]);
      }
      if (nan) {
        has_nan[n] = 1;
        continue;
      }
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int32_t a, int32_t b) {
        return key[a] > key[b] || (key[a] == key[b] && a < b);
      });
      std::copy(order.begin(), order.begin() + K, ids + n * K);
    }
  }
  const auto bad = std::find(has_nan.begin(), has_nan.end(), 1);
  return bad == has_nan.end() ? -1 : bad - has_nan.begin();
}

// out[n, k] = x[n, ids[n, k]];  x [N, E], ids [N, K] (checked in range by the caller)
template <class T>
void gather_cols(T* out, const T* x, const int32_t* ids, int64_t N, int64_t E, int64_t K) {
#pragma omp parallel for schedule(static) if (N * K > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) out[n * K + k] = x[n * E + ids[n * K + k]];
}

// dx[n, ids[n, k]] += dout[n, k], over k in order
template <class T>
void scatter_add_cols(T* dx, const T* dout, const int32_t* ids, int64_t N, int64_t E, int64_t K) {
#pragma omp parallel for schedule(static) if (N * K > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) dx[n * E + ids[n * K + k]] += dout[n * K + k];
}

// g[n, k] = p[n, k] / sum_j p[n, j]
template <class T>
void normalize_rows_forward(T* g, const T* p, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static) if (N * K > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    T sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += p[n * K + k];
    for (int64_t k = 0; k < K; ++k) g[n * K + k] = p[n * K + k] / sum;
  }
}

// dp[n, k] = dg[n, k] / S - sum_j dg[n, j] p[n, j] / S^2,  S = sum_j p[n, j]
template <class T>
void normalize_rows_backward(T* dp, const T* dg, const T* p, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static) if (N * K > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    T sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += p[n * K + k];
    const T dg_p = dot(dg + n * K, p + n * K, K);
    for (int64_t k = 0; k < K; ++k) dp[n * K + k] = dg[n * K + k] / sum - dg_p / (sum * sum);
  }
}

}  // namespace fm::cpu
