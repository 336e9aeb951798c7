#include "balancer/plan_metrics.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

#include "balancer/load_matrix.h"

namespace fm {

int64_t placement_lower_bound(const std::vector<int64_t>& A, int32_t replica_slots) {
  const int64_t W = static_cast<int64_t>(A.size());
  if (W < 1) throw std::invalid_argument("placement_lower_bound: no ranks");
  if (replica_slots < 0)
    throw std::invalid_argument(
        fmt::format("placement_lower_bound: replica_slots must be >= 0 (got {})", replica_slots));
  int64_t T = 0, max_a = 0;
  for (int64_t a : A) {
    T += a;
    max_a = std::max(max_a, a);
  }
  if (T == 0) return 0;
  const int64_t slots = W * replica_slots;
  // Replica slots needed if no rank may exceed M (fact (2) of the header).
  auto needed = [&](int64_t M) {
    int64_t n = 0;
    for (int64_t a : A)
      if (a > M) n += (a - M + M - 1) / M;
    return n;
  };
  int64_t lo = std::max<int64_t>(1, (T + W - 1) / W), hi = max_a;  // needed(hi) == 0
  if (lo >= hi || needed(lo) <= slots) return lo;
  while (hi - lo > 1) {  // invariant: needed(lo) > slots >= needed(hi)
    const int64_t mid = lo + (hi - lo) / 2;
    (needed(mid) <= slots ? hi : lo) = mid;
  }
  return hi;
}

int64_t placement_lower_bound(const LoadMatrix& load, int32_t world_size, int32_t replica_slots) {
  validate_load_matrix(load, static_cast<int32_t>(load.size()), world_size,
                       "placement_lower_bound");
  const int32_t per_rank = static_cast<int32_t>(load.size()) / world_size;
  std::vector<int64_t> A(static_cast<size_t>(world_size), 0);
  for (size_t e = 0; e < load.size(); ++e)
    for (int64_t c : load[e]) A[e / per_rank] += c;
  return placement_lower_bound(A, replica_slots);
}

PlanMetrics plan_metrics(const LayerPlacement& plan, const LoadMatrix& load,
                         const Topology& topology, const LayerPlacement* previous,
                         int64_t expert_bytes) {
  validate_topology(topology);
  validate_placement(plan, load, "plan_metrics");
  const int32_t W = plan.world_size, S = plan.replica_slots;
  if (topology.world_size() != W)
    throw std::invalid_argument(
        fmt::format("plan_metrics: the topology has {} ranks ({} nodes x {} GPUs), the plan {}",
                    topology.world_size(), topology.nodes, topology.gpus_per_node, W));
  if (previous != nullptr && (previous->world_size != W || previous->replica_slots != S ||
                              static_cast<int32_t>(previous->slots.size()) != W))
    throw std::invalid_argument(
        fmt::format("plan_metrics: the previous plan has {} ranks x {} slots, this one {} x {}",
                    previous->world_size, previous->replica_slots, W, S));
  if (expert_bytes < 0)
    throw std::invalid_argument(
        fmt::format("plan_metrics: expert_bytes must be >= 0 (got {})", expert_bytes));

  PlanMetrics m;
  m.rank_load.assign(static_cast<size_t>(W), 0);
  for (int32_t e = 0; e < plan.n_experts; ++e)
    for (int32_t s = 0; s < W; ++s)
      for (const TokenShare& sh : plan.split[e][s]) {
        const int32_t r = sh.instance.rank;
        m.rank_load[r] += sh.tokens;
        if (r != s) m.cross_gpu_tokens += sh.tokens;
        if (topology.node_of(r) != topology.node_of(s)) m.cross_node_tokens += sh.tokens;
      }
  for (int64_t l : m.rank_load) {
    m.total += l;
    m.max_load = std::max(m.max_load, l);
  }
  m.mean_load = static_cast<double>(m.total) / static_cast<double>(W);
  m.lower_bound = placement_lower_bound(load, W, S);
  if (m.total > 0) {
    m.max_over_mean = static_cast<double>(m.max_load) / m.mean_load;
    m.ratio_to_bound = static_cast<double>(m.max_load) / static_cast<double>(m.lower_bound);
  }
  for (int32_t r = 0; r < W; ++r)
    for (int32_t i = 0; i < S; ++i) {
      const int32_t e = plan.slots[r][i];
      if (e < 0) continue;
      ++m.replicas;
      const bool resident = previous != nullptr &&
                            static_cast<int32_t>(previous->slots[r].size()) == S &&
                            previous->slots[r][i] == e;
      if (!resident) ++m.new_replicas;
    }
  m.bytes_moved = static_cast<int64_t>(m.new_replicas) * expert_bytes;
  return m;
}

}  // namespace fm
