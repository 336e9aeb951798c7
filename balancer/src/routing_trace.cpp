#include "balancer/routing_trace.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

namespace fm {

void validate_trace(const RoutingTrace& t) {
  auto fail = [](const std::string& what) { throw std::runtime_error("routing trace: " + what); };
  if (t.n_moe_layers < 1 || t.top_k < 1 || t.n_experts < 1 || t.n_experts > 65536)
    fail(fmt::format("bad dimensions (moe_layers {}, top_k {}, experts {})", t.n_moe_layers,
                     t.top_k, t.n_experts));
  if (t.seq_offsets.empty() || t.seq_offsets.front() != 0) fail("seq_offsets must start with 0");
  for (size_t s = 1; s < t.seq_offsets.size(); ++s)
    if (t.seq_offsets[s] < t.seq_offsets[s - 1])
      fail(fmt::format("seq_offsets decrease at index {}", s));
  const int64_t want = t.tokens() * t.n_moe_layers * t.top_k;
  if (static_cast<int64_t>(t.ids.size()) != want)
    fail(fmt::format("ids has {} entries, expected tokens {} x layers {} x k {} = {}", t.ids.size(),
                     t.tokens(), t.n_moe_layers, t.top_k, want));
  for (size_t i = 0; i < t.ids.size(); ++i)
    if (t.ids[i] >= t.n_experts)
      fail(fmt::format("expert id {} at entry {} is >= n_experts {}", t.ids[i], i, t.n_experts));
}

std::vector<int64_t> expert_load(const RoutingTrace& t, int64_t layer, int64_t begin, int64_t end) {
  if (layer < 0 || layer >= t.n_moe_layers || begin < 0 || end > t.tokens() || begin > end)
    throw std::runtime_error(
        fmt::format("expert_load: layer {} tokens [{}, {}) out of range", layer, begin, end));
  std::vector<int64_t> load(static_cast<size_t>(t.n_experts), 0);
  for (int64_t n = begin; n < end; ++n)
    for (int64_t k = 0; k < t.top_k; ++k) ++load[t.at(n, layer, k)];
  return load;
}

double max_violation(const std::vector<int64_t>& load) {
  if (load.empty()) return 0.0;
  int64_t total = 0;
  for (int64_t l : load) total += l;
  if (total == 0) return 0.0;
  const double mean = static_cast<double>(total) / static_cast<double>(load.size());
  return (static_cast<double>(*std::max_element(load.begin(), load.end())) - mean) / mean;
}

}  // namespace fm
