// RoutingTrace: every token's top-k LOGICAL expert ids for every MoE layer,
// as recorded by the model (before any replica mapping) and replayed later.
// Layout [tokens, moe_layers, k]; tokens are packed sequences delimited by
// seq_offsets. Pure data: the balancer builds load matrices from it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fm {

struct RoutingTrace {
  int64_t n_moe_layers = 0;
  int64_t top_k = 0;
  int64_t n_experts = 0;
  std::vector<int64_t> seq_offsets;  // [S + 1], seq_offsets[0] == 0
  std::vector<uint16_t> ids;         // [tokens, n_moe_layers, top_k]

  int64_t tokens() const { return seq_offsets.empty() ? 0 : seq_offsets.back(); }
  uint16_t at(int64_t token, int64_t layer, int64_t k) const {
    return ids[static_cast<size_t>((token * n_moe_layers + layer) * top_k + k)];
  }
  uint16_t& at(int64_t token, int64_t layer, int64_t k) {
    return ids[static_cast<size_t>((token * n_moe_layers + layer) * top_k + k)];
  }
  bool operator==(const RoutingTrace&) const = default;
};

// Throws fm-style std::runtime_error naming the problem when sizes disagree or an id >= n_experts.
void validate_trace(const RoutingTrace& trace);

// Tokens routed to each expert in one MoE layer over tokens [begin, end).
std::vector<int64_t> expert_load(const RoutingTrace& trace, int64_t layer, int64_t begin,
                                 int64_t end);

// MaxVio = (max_i load_i - mean load) / mean load; 0 for an empty load.
double max_violation(const std::vector<int64_t>& load);

}  // namespace fm
