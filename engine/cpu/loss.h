// LM-head loss pieces over logits [N, V]: the target log-probability, the entropy
// and their gradients. One thread owns each row; a row is summed in vocab order.
#pragma once

#include <cmath>
#include <cstdint>

#include "engine/cpu/vec.h"

namespace fm::cpu {

// lse = max + log sum_v exp(x_v - max);  H = sum_v p_v (lse - x_v) = -sum_v p_v log p_v
template <class T>
T row_entropy(const T* x, T lse, int64_t V) {
  T h = 0;
  for (int64_t v = 0; v < V; ++v) h += std::exp(x[v] - lse) * (lse - x[v]);
  return h;
}

// lse[n] = logsumexp(x[n]);  logp[n] = x[n, t] - lse[n] (0 when t < 0);  entropy[n] = H(p[n])
template <class T>
void logprob_forward(T* logp, T* entropy, T* lse, const T* logits, const int32_t* targets,
                     int64_t N, int64_t V) {
#pragma omp parallel for schedule(static) if (N * V > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    const T* x = logits + n * V;
    const T m = max_of(x, V);
    T sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(x[v] - m);
    const T l = m + std::log(sum);
    lse[n] = l;
    entropy[n] = row_entropy(x, l, V);
    logp[n] = targets[n] >= 0 ? x[targets[n]] - l : T(0);
  }
}

// With p_v = exp(x_v - lse):
//   d logp / d x_v    = [v == t] - p_v                 (zero when t < 0)
//   d entropy / d x_v = -p_v (log p_v + H)
// dlogits[n, v] = dlogp[n] * d logp/d x_v + dentropy[n] * d entropy/d x_v  (dentropy may be null)
template <class T>
void logprob_backward(T* dlogits, const T* dlogp, const T* dentropy, const T* logits, const T* lse,
                      const int32_t* targets, int64_t N, int64_t V) {
#pragma omp parallel for schedule(static) if (N * V > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    const T* x = logits + n * V;
    T* dx = dlogits + n * V;
    const T l = lse[n];
    const int32_t t = targets[n];
    const T dlp = t >= 0 ? dlogp[n] : T(0);
    const T dh = dentropy ? dentropy[n] : T(0);
    const T h = dh != T(0) ? row_entropy(x, l, V) : T(0);
    for (int64_t v = 0; v < V; ++v) {
      const T log_p = x[v] - l;
      const T p = std::exp(log_p);
      dx[v] = -dlp * p - dh * p * (log_p + h);
    }
    if (t >= 0) dx[t] += dlp;
  }
}

}  // namespace fm::cpu
