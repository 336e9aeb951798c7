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
  check(o.layer_skew.empty() || static_cast<int64_t>(o.layer_skew.size()) == L,
        fmt::format("layer_skew must be empty or have one entry per MoE layer ({}) (got {})", L,
                    o.layer_skew.size()));
  for (size_t l = 0; l < o.layer_skew.size(); ++l)
    check(std::isfinite(o.layer_skew[l]) && o.layer_skew[l] >= 0,
          fmt::format("layer_skew[{}] must be >= 0 (got {})", l, o.layer_skew[l]));
  check(o.preference >= 0 && o.preference <= 1,
        fmt::format("preference must be in [0, 1] (got {})", o.preference));
  check(std::isfinite(o.preference_skew) && o.preference_skew >= 0,
        fmt::format("preference_skew must be >= 0 (got {})", o.preference_skew));
  check(o.preference_group >= 1,
        fmt::format("preference_group must be >= 1 (got {})", o.preference_group));

  RoutingTrace t;
  t.n_moe_layers = L;
  t.top_k = K;
  t.n_experts = E;
  t.seq_offsets.resize(static_cast<size_t>(o.sequences + 1));
  for (int64_t s = 0; s <= o.sequences; ++s) t.seq_offsets[static_cast<size_t>(s)] = s * o.seq_len;
  t.ids.resize(static_cast<size_t>(t.tokens() * L * K));

  Draw draw{std::mt19937_64(o.seed)};
  auto zipf_weights = [E](double skew) {
    std::vector<double> w(static_cast<size_t>(E));
    for (int64_t i = 0; i < E; ++i)
      w[static_cast<size_t>(i)] = std::pow(static_cast<double>(i + 1), -skew);
    return w;
  };
  // zipf[l][i] = the weight of popularity rank i in layer l.
  std::vector<std::vector<double>> zipf;
  for (int64_t l = 0; l < L; ++l)
    zipf.push_back(
        zipf_weights(o.layer_skew.empty() ? o.skew : o.layer_skew[static_cast<size_t>(l)]));
  auto shuffled = [&](std::vector<uint16_t>& ord) {
    ord.resize(static_cast<size_t>(E));
    std::iota(ord.begin(), ord.end(), uint16_t{0});
    for (int64_t i = E - 1; i > 0; --i)  // Fisher-Yates
      std::swap(ord[static_cast<size_t>(i)], ord[static_cast<size_t>(draw.below(i + 1))]);
  };
  // order[l][i] = the expert at popularity rank i of layer l.
  std::vector<std::vector<uint16_t>> order(static_cast<size_t>(L));
  for (auto& ord : order) shuffled(ord);
  // Per-sequence preference: pref[l] = the current group's own order; its weights.
  const bool prefer = o.preference > 0;
  std::vector<std::vector<uint16_t>> pref(static_cast<size_t>(L));
  const std::vector<double> pref_zipf = zipf_weights(o.preference_skew);
  const double pref_sum = std::accumulate(pref_zipf.begin(), pref_zipf.end(), 0.0);
  std::vector<uint16_t> identity(static_cast<size_t>(E));
  std::iota(identity.begin(), identity.end(), uint16_t{0});
  std::vector<double> mixed(static_cast<size_t>(E));

  const int64_t swaps = std::llround(o.drift * static_cast<double>(E));
  std::vector<double> cdf(static_cast<size_t>(E));
  std::vector<uint16_t> chosen;
  for (int64_t s = 0; s < o.sequences; ++s) {
    if (prefer && s % o.preference_group == 0)
      for (auto& p : pref) shuffled(p);
    for (int64_t l = 0; l < L; ++l) {
      std::vector<uint16_t>& ord = order[static_cast<size_t>(l)];
      for (int64_t i = 0; i < swaps && E > 1; ++i)
        std::swap(ord[static_cast<size_t>(draw.below(E))], ord[static_cast<size_t>(draw.below(E))]);
      // Draw indices i with weights wt[i]; the expert is map[i]. Without preference, i is a
      // popularity rank (wt = Zipf, map = the layer's order); with it, i is the expert.
      const std::vector<double>* wt = &zipf[static_cast<size_t>(l)];
      const std::vector<uint16_t>* map = &ord;
      if (prefer) {
        const std::vector<double>& z = zipf[static_cast<size_t>(l)];
        const double z_sum = std::accumulate(z.begin(), z.end(), 0.0);
        const std::vector<uint16_t>& own = pref[static_cast<size_t>(l)];
        for (int64_t i = 0; i < E; ++i) {
          const auto u = static_cast<size_t>(i);
          mixed[ord[u]] = (1 - o.preference) * z[u] / z_sum;
        }
        for (int64_t i = 0; i < E; ++i) {
          const auto u = static_cast<size_t>(i);
          mixed[own[u]] += o.preference * pref_zipf[u] / pref_sum;
        }
        wt = &mixed;
        map = &identity;
      }
      double acc = 0;
      for (int64_t i = 0; i < E; ++i)
        cdf[static_cast<size_t>(i)] = acc += (*wt)[static_cast<size_t>(i)];
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
          } else {  // heavy skew: scan the weights left after removing the chosen indices
            double left = 0;
            for (int64_t i = 0; i < E; ++i)
              if (std::find(chosen.begin(), chosen.end(), i) == chosen.end())
                left += (*wt)[static_cast<size_t>(i)];
            double u = draw.uniform() * left;
            rank = -1;
            for (int64_t i = 0; i < E; ++i) {
              if (std::find(chosen.begin(), chosen.end(), i) != chosen.end()) continue;
              rank = i;
              u -= (*wt)[static_cast<size_t>(i)];
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
          t.at(n, l, k) = (*map)[static_cast<size_t>(chosen[static_cast<size_t>(k)])];
      }
    }
  }
  return t;
}

}  // namespace fm
