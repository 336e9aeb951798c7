#include "balancer/synthetic_trace.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <stdexcept>

namespace fm {

namespace {

// Portable draws from mt19937_64's raw output (std distributions differ between libraries).
struct Draw {
  std::mt19937_64 gen;
  double uniform() { return static_cast<double>(gen() >> 11) * 0x1.0p-53; }  // [0, 1)
  int64_t below(int64_t n) { return static_cast<int64_t>(uniform() * static_cast<double>(n)); }
};

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("synthetic trace: " + what);
}

}  // namespace

RoutingTrace synthetic_trace(const SyntheticTraceOptions& o) {
  check(o.n_experts >= 1 && o.n_experts <= 65536,
        fmt::format("experts must be in [1, 65536] (got {})", o.n_experts));
  check(o.top_k >= 1 && o.top_k <= o.n_experts,
        fmt::format("top_k must be in [1, experts {}] (got {})", o.n_experts, o.top_k));
  check(o.n_moe_layers >= 1, fmt::format("layers must be >= 1 (got {})", o.n_moe_layers));
  check(o.sequences >= 1, fmt::format("sequences must be >= 1 (got {})", o.sequences));
  check(o.seq_len >= 0, fmt::format("seq_len must be >= 0 (got {})", o.seq_len));
  check(std::isfinite(o.skew) && o.skew >= 0, fmt::format("skew must be >= 0 (got {})", o.skew));
  check(o.drift >= 0 && o.drift <= 1, fmt::format("drift must be in [0, 1] (got {})", o.drift));

  const int64_t E = o.n_experts, K = o.top_k, L = o.n_moe_layers;
  RoutingTrace t;
  t.n_moe_layers = L;
  t.top_k = K;
  t.n_experts = E;
  t.seq_offsets.resize(static_cast<size_t>(o.sequences + 1));
  for (int64_t s = 0; s <= o.sequences; ++s) t.seq_offsets[static_cast<size_t>(s)] = s * o.seq_len;
  t.ids.resize(static_cast<size_t>(t.tokens() * L * K));

  Draw draw{std::mt19937_64(o.seed)};
  std::vector<double> zipf(static_cast<size_t>(E));
  for (int64_t i = 0; i < E; ++i)
    zipf[static_cast<size_t>(i)] = std::pow(static_cast<double>(i + 1), -o.skew);
  // order[l][i] = the expert at popularity rank i of layer l.
  std::vector<std::vector<uint16_t>> order(static_cast<size_t>(L));
  for (auto& ord : order) {
    ord.resize(static_cast<size_t>(E));
    std::iota(ord.begin(), ord.end(), uint16_t{0});
    for (int64_t i = E - 1; i > 0; --i)  // Fisher-Yates
      std::swap(ord[static_cast<size_t>(i)], ord[static_cast<size_t>(draw.below(i + 1))]);
  }
  const int64_t swaps = std::llround(o.drift * static_cast<double>(E));
  std::vector<double> cdf(static_cast<size_t>(E));
  std::vector<uint16_t> chosen;
  for (int64_t s = 0; s < o.sequences; ++s) {
    for (int64_t l = 0; l < L; ++l) {
      std::vector<uint16_t>& ord = order[static_cast<size_t>(l)];
      for (int64_t i = 0; i < swaps && E > 1; ++i)
        std::swap(ord[static_cast<size_t>(draw.below(E))], ord[static_cast<size_t>(draw.below(E))]);
      // cdf over popularity ranks; expert = ord[rank].
      double acc = 0;
      for (int64_t i = 0; i < E; ++i)
        cdf[static_cast<size_t>(i)] = acc += zipf[static_cast<size_t>(i)];
      for (int64_t n = t.seq_offsets[static_cast<size_t>(s)];
           n < t.seq_offsets[static_cast<size_t>(s + 1)]; ++n) {
        chosen.clear();
        int rejections = 0;
        while (static_cast<int64_t>(chosen.size()) < K) {
          int64_t rank;
          if (rejections < 64) {  // rejection of repeats = exact sampling without replacement
            const double u = draw.uniform() * acc;
            rank = std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin();
            rank = std::min(rank, E - 1);
          } else {  // heavy skew: scan the weights left after removing the chosen ranks
            double left = 0;
            for (int64_t i = 0; i < E; ++i)
              if (std::find(chosen.begin(), chosen.end(), i) == chosen.end())
                left += zipf[static_cast<size_t>(i)];
            double u = draw.uniform() * left;
            rank = -1;
            for (int64_t i = 0; i < E; ++i) {
              if (std::find(chosen.begin(), chosen.end(), i) != chosen.end()) continue;
              rank = i;
              u -= zipf[static_cast<size_t>(i)];
              if (u < 0) break;
            }
          }
          if (std::find(chosen.begin(), chosen.end(), rank) != chosen.end()) {
            ++rejections;
            continue;
          }
          chosen.push_back(static_cast<uint16_t>(rank));
        }
        for (int64_t k = 0; k < K; ++k)
          t.at(n, l, k) = ord[static_cast<size_t>(chosen[static_cast<size_t>(k)])];
      }
    }
  }
  return t;
}

}  // namespace fm
