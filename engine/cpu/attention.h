// Causal grouped-query attention over packed variable-length sequences.
// q [N, Hq, D], k/v [N, Hkv, D]; query head h reads kv head h / (Hq / Hkv); token i
// attends to tokens j in [begin(i), i] of its own sequence. Scores are
// s_ij = scale * q_i . k_j, P = softmax_j(s), out_i = sum_j P_ij v_j, lse_i = logsumexp_j s_ij.
//
// Forward: one thread per query token (all heads). Backward recomputes P from q, k and
// lse (flash-attention style) in two passes, each owning its outputs: dq per query row,
// dk/dv per key row, with the inner sums in fixed token order -- bit-identical results
// whatever the thread count.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "engine/cpu/vec.h"

namespace fm::cpu {

struct AttentionDims {
  int64_t N, Hq, Hkv, D;
  int64_t group() const { return Hq / Hkv; }  // query heads per kv head
};

// For each token, the first token and one past the last token of its sequence.
struct TokenSpans {
  std::vector<int64_t> begin, end;
  int64_t causal_pairs = 0;  // (i, j) pairs with j in [begin(i), i]: the work of one head
};

// seq_off [S + 1], checked by the caller (0 = seq_off[0] <= ... <= seq_off[S] = N).
inline TokenSpans token_spans(const int32_t* seq_off, int64_t S, int64_t N) {
  TokenSpans t{std::vector<int64_t>(static_cast<size_t>(N)),
               std::vector<int64_t>(static_cast<size_t>(N))};
  for (int64_t s = 0; s < S; ++s)
    for (int64_t i = seq_off[s]; i < seq_off[s + 1]; ++i) {
      t.begin[i] = seq_off[s];
      t.end[i] = seq_off[s + 1];
      t.causal_pairs += i - seq_off[s] + 1;
    }
  return t;
}

// One query row against `n` keys/values at k0 + j * stride, v0 + j * stride (j = 0 .. n-1):
// o = softmax_j(scale * q . k_j) v, returns logsumexp of the scaled scores.
// p is scratch of at least n entries. Shared by the packed and the cached forward so
// both give bit-identical rows.
template <class T>
T attend_row(T* o, T* p, const T* qi, const T* k0, const T* v0, int64_t n, int64_t stride,
             int64_t D, T scale) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    p[j] = scale * dot(qi, k0 + j * stride, D);
    m = p[j] > m ? p[j] : m;
  }
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - m));
  set_zero(o, D);
  for (int64_t j = 0; j < n; ++j) add_scaled(o, p[j], v0 + j * stride, D);
  for (int64_t c = 0; c < D; ++c) o[c] /= sum;
  return m + std::log(sum);
}

template <class T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, const TokenSpans& spans,
                       const AttentionDims& d, T scale) {
  const int64_t D = d.D, stride = d.Hkv * D;
  const bool parallel = spans.causal_pairs * d.Hq * D > kParallelMinWork;
#pragma omp parallel if (parallel)
  {
    std::vector<T> p;  // scores, then unnormalised probabilities, of one query row
#pragma omp for schedule(static)
    for (int64_t i = 0; i < d.N; ++i) {
      const int64_t j0 = spans.begin[i];
      p.resize(static_cast<size_t>(i - j0 + 1));
      for (int64_t h = 0; h < d.Hq; ++h) {
        const int64_t kvh = h / d.group();
        lse[i * d.Hq + h] = attend_row(out + (i * d.Hq + h) * D, p.data(), q + (i * d.Hq + h) * D,
                                       k + (j0 * d.Hkv + kvh) * D, v + (j0 * d.Hkv + kvh) * D,
                                       i - j0 + 1, stride, D, scale);
      }
    }
  }
}

// Attention of N new tokens against a KV cache [S, T, Hkv, D]: token i sits at position
// pos[i] of cache slot slot[i] (its own k/v already written there) and attends to
// positions 0 .. pos[i] of that slot. Same row arithmetic as attention_forward.
template <class T>
void attention_cached(T* out, const T* q, const T* k_cache, const T* v_cache, const int32_t* slot,
                      const int32_t* pos, const AttentionDims& d, int64_t T_max, T scale) {
  const int64_t D = d.D, stride = d.Hkv * D;
  int64_t pairs = 0;
  for (int64_t i = 0; i < d.N; ++i) pairs += pos[i] + 1;
  const bool parallel = pairs * d.Hq * D > kParallelMinWork;
#pragma omp parallel if (parallel)
  {
    std::vector<T> p;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < d.N; ++i) {
      p.resize(static_cast<size_t>(pos[i] + 1));
      const int64_t row0 = static_cast<int64_t>(slot[i]) * T_max;  // position 0 of the slot
      for (int64_t h = 0; h < d.Hq; ++h) {
        const int64_t kvh = h / d.group();
        attend_row(out + (i * d.Hq + h) * D, p.data(), q + (i * d.Hq + h) * D,
                   k_cache + (row0 * d.Hkv + kvh) * D, v_cache + (row0 * d.Hkv + kvh) * D,
                   static_cast<int64_t>(pos[i]) + 1, stride, D, scale);
      }
    }
  }
}

// dP_ij = dO_i . v_j;  dS_ij = P_ij (dP_ij - dO_i . O_i)
// dq_i = scale sum_j dS_ij k_j;  dk_j = scale sum_{h, i} dS_ij q_i;  dv_j = sum_{h, i} P_ij dO_i
template <class T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                        const T* out, const T* lse, const TokenSpans& spans, const AttentionDims& d,
                        T scale) {
  const int64_t D = d.D;
  const bool parallel = spans.causal_pairs * d.Hq * D > kParallelMinWork;
  auto q_row = [&](const T* base, int64_t i, int64_t h) { return base + (i * d.Hq + h) * D; };
  auto kv_row = [&](const T* base, int64_t j, int64_t h) { return base + (j * d.Hkv + h) * D; };

  // delta[i, h] = dO_i . O_i, the row sum of P * dP
  std::vector<T> delta(static_cast<size_t>(d.N * d.Hq));
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < d.N; ++i)
    for (int64_t h = 0; h < d.Hq; ++h)
      delta[i * d.Hq + h] = dot(q_row(dout, i, h), q_row(out, i, h), D);

  // P_ij for query head h (kv head kvh) and dS_ij, recomputed from the saved lse.
  auto prob = [&](int64_t i, int64_t j, int64_t h, int64_t kvh) {
    return std::exp(scale * dot(q_row(q, i, h), kv_row(k, j, kvh), D) - lse[i * d.Hq + h]);
  };
  auto dscore = [&](T p, int64_t i, int64_t j, int64_t h, int64_t kvh) {
    return p * (dot(q_row(dout, i, h), kv_row(v, j, kvh), D) - delta[i * d.Hq + h]);
  };

  // dq: one thread per query token, keys in order.
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < d.N; ++i) {
    for (int64_t h = 0; h < d.Hq; ++h) {
      const int64_t kvh = h / d.group();
      T* dqi = dq + (i * d.Hq + h) * D;
      set_zero(dqi, D);
      for (int64_t j = spans.begin[i]; j <= i; ++j) {
        const T ds = dscore(prob(i, j, h, kvh), i, j, h, kvh);
        add_scaled(dqi, scale * ds, kv_row(k, j, kvh), D);
      }
    }
  }

  // dk, dv: one thread per key token, then query heads of the group and queries in order.
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t j = 0; j < d.N; ++j) {
    for (int64_t kvh = 0; kvh < d.Hkv; ++kvh) {
      T* dkj = dk + (j * d.Hkv + kvh) * D;
      T* dvj = dv + (j * d.Hkv + kvh) * D;
      set_zero(dkj, D);
      set_zero(dvj, D);
      for (int64_t h = kvh * d.group(); h < (kvh + 1) * d.group(); ++h) {
        for (int64_t i = j; i < spans.end[j]; ++i) {
          const T p = prob(i, j, h, kvh);
          add_scaled(dvj, p, q_row(dout, i, h), D);
          add_scaled(dkj, scale * dscore(p, i, j, h, kvh), q_row(q, i, h), D);
        }
      }
    }
  }
}

}  // namespace fm::cpu
