#include "balancer/trace_stats.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace fm {

RatioSummary summarize(std::vector<double> v) {
  RatioSummary s;
  s.count = static_cast<int64_t>(v.size());
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / static_cast<double>(v.size());
  // numpy's default percentile: linear interpolation at position q * (n - 1).
  auto pct = [&](double q) {
    const double pos = q * static_cast<double>(v.size() - 1);
    const size_t lo = static_cast<size_t>(std::floor(pos));
    const size_t hi = std::min(lo + 1, v.size() - 1);
    return v[lo] + (pos - static_cast<double>(lo)) * (v[hi] - v[lo]);
  };
  s.p50 = pct(0.50);
  s.p95 = pct(0.95);
  s.max = v.back();
  return s;
}

// max / mean of non-negative loads; 1 when all are zero.
static double max_over_mean(const std::vector<int64_t>& load) {
  int64_t total = 0, mx = 0;
  for (int64_t l : load) {
    total += l;
    mx = std::max(mx, l);
  }
  if (total == 0) return 1.0;
  return static_cast<double>(mx) * static_cast<double>(load.size()) / static_cast<double>(total);
}

static void check_layout(const RoutingTrace& t, int64_t ranks, int64_t micro_batch) {
  if (ranks < 1) throw std::invalid_argument(fmt::format("ranks must be >= 1 (got {})", ranks));
  if (micro_batch < 1)
    throw std::invalid_argument(fmt::format("micro_batch must be >= 1 (got {})", micro_batch));
  if (t.n_experts % ranks != 0)
    throw std::invalid_argument(fmt::format(
        "n_experts {} is not divisible by ranks {}: static expert parallelism needs E % W == 0",
        t.n_experts, ranks));
  if (t.seq_offsets.size() < 2) throw std::invalid_argument("the routing trace has no sequences");
}

std::vector<MicroStep> micro_steps(const RoutingTrace& t, int64_t ranks, int64_t micro_batch) {
  check_layout(t, ranks, micro_batch);
  const int64_t S = static_cast<int64_t>(t.seq_offsets.size()) - 1;
  const int64_t per_step = ranks * micro_batch;
  auto offset = [&](int64_t seq) { return t.seq_offsets[static_cast<size_t>(std::min(seq, S))]; };
  std::vector<MicroStep> steps;
  for (int64_t first = 0; first < S; first += per_step) {
    MicroStep m;
    m.first_seq = first;
    m.end_seq = std::min(first + per_step, S);
    m.first_token = offset(m.first_seq);
    m.end_token = offset(m.end_seq);
    m.partial = m.end_seq - m.first_seq < per_step;
    m.rank_tokens.resize(static_cast<size_t>(ranks));
    for (int64_t r = 0; r < ranks; ++r)
      m.rank_tokens[static_cast<size_t>(r)] =
          offset(first + (r + 1) * micro_batch) - offset(first + r * micro_batch);
    m.token_ratio = max_over_mean(m.rank_tokens);
    const int64_t total = (m.end_token - m.first_token) * t.top_k;
    if (total > 0)
      m.lower_bound_ratio = static_cast<double>((total + ranks - 1) / ranks) *
                            static_cast<double>(ranks) / static_cast<double>(total);
    steps.push_back(std::move(m));
  }
  return steps;
}

TraceImbalance trace_imbalance(const RoutingTrace& t, int64_t ranks, int64_t micro_batch) {
  validate_trace(t);
  check_layout(t, ranks, micro_batch);
  TraceImbalance out;
  out.ranks = ranks;
  out.micro_batch = micro_batch;
  out.experts_per_rank = t.n_experts / ranks;
  out.n_layers = t.n_moe_layers;
  out.micro_steps = micro_steps(t, ranks, micro_batch);
  const int64_t M = out.n_micro_steps(), L = t.n_moe_layers, W = ranks;
  out.ratio.assign(static_cast<size_t>(M * L), 1.0);
  out.max_rank_load.assign(static_cast<size_t>(M * L), 0);
  out.layers.resize(static_cast<size_t>(L));

  double sum_max = 0, sum_mean = 0, sum_bound = 0, sum_whole = 0;
  for (int64_t l = 0; l < L; ++l) {
    LayerImbalance& li = out.layers[static_cast<size_t>(l)];
    li.expert_load.assign(static_cast<size_t>(t.n_experts), 0);
    li.rank_load.assign(static_cast<size_t>(W), 0);
    std::vector<double> ratios;
    double layer_max = 0, layer_mean = 0;
    for (int64_t m = 0; m < M; ++m) {
      const MicroStep& ms = out.micro_steps[static_cast<size_t>(m)];
      const std::vector<int64_t> experts = expert_load(t, l, ms.first_token, ms.end_token);
      std::vector<int64_t> rank(static_cast<size_t>(W), 0);
      for (int64_t e = 0; e < t.n_experts; ++e) {
        rank[static_cast<size_t>(e / out.experts_per_rank)] += experts[static_cast<size_t>(e)];
        li.expert_load[static_cast<size_t>(e)] += experts[static_cast<size_t>(e)];
      }
      int64_t total = 0, mx = 0;
      for (int64_t r = 0; r < W; ++r) {
        li.rank_load[static_cast<size_t>(r)] += rank[static_cast<size_t>(r)];
        total += rank[static_cast<size_t>(r)];
        mx = std::max(mx, rank[static_cast<size_t>(r)]);
      }
      const size_t at = static_cast<size_t>(m * L + l);
      out.ratio[at] = max_over_mean(rank);
      out.max_rank_load[at] = mx;
      ratios.push_back(out.ratio[at]);
      const double mean = static_cast<double>(total) / static_cast<double>(W);
      layer_max += static_cast<double>(mx);
      layer_mean += mean;
      sum_bound += static_cast<double>((total + W - 1) / W);
    }
    li.max_vio = max_violation(li.expert_load);
    li.whole_trace_ratio = max_over_mean(li.rank_load);
    li.micro_step = summarize(std::move(ratios));
    li.time_ratio = layer_mean > 0 ? layer_max / layer_mean : 1.0;
    sum_max += layer_max;
    sum_mean += layer_mean;
    sum_whole += li.whole_trace_ratio;
  }
  out.whole_trace_ratio = sum_whole / static_cast<double>(L);
  out.overall = summarize(out.ratio);
  out.time_ratio = sum_mean > 0 ? sum_max / sum_mean : 1.0;
  out.lower_bound_time_ratio = sum_mean > 0 ? sum_bound / sum_mean : 1.0;
  std::vector<double> tokens;
  for (const MicroStep& ms : out.micro_steps) tokens.push_back(ms.token_ratio);
  out.token_ratio = summarize(std::move(tokens));
  return out;
}

}  // namespace fm
