#include "balancer/placement.h"

#include <fmt/format.h>

#include <stdexcept>

namespace fm {

// The balancer depends on nothing project-internal: its errors are std::invalid_argument.
#define PLAN_CHECK(cond, ...)                                           \
  do {                                                                  \
    if (!(cond)) throw std::invalid_argument(fmt::format(__VA_ARGS__)); \
  } while (0)

int64_t LayerPlacement::tokens(int32_t expert, int32_t source) const {
  int64_t t = 0;
  for (const TokenShare& s : split[expert][source]) t += s.tokens;
  return t;
}

LayerPlacement trivial_placement(const LoadMatrix& load, int32_t world_size,
                                 int32_t replica_slots) {
  const int32_t E = static_cast<int32_t>(load.size());
  PLAN_CHECK(world_size >= 1 && E % world_size == 0,
             "placement: {} experts cannot be split evenly over {} ranks", E, world_size);
  PLAN_CHECK(replica_slots >= 0, "placement: replica_slots must be >= 0 (got {})", replica_slots);
  LayerPlacement p;
  p.world_size = world_size;
  p.n_experts = E;
  p.replica_slots = replica_slots;
  p.slots.assign(static_cast<size_t>(world_size), std::vector<int32_t>(replica_slots, -1));
  p.split.resize(static_cast<size_t>(E));
  for (int32_t e = 0; e < E; ++e) {
    PLAN_CHECK(static_cast<int32_t>(load[e].size()) == world_size,
               "placement: load row of expert {} has {} source ranks, expected {}", e,
               load[e].size(), world_size);
    p.split[e].resize(static_cast<size_t>(world_size));
    for (int32_t r = 0; r < world_size; ++r)
      p.split[e][r].push_back(
          {ExpertInstance{p.home_rank(e), ExpertInstance::kHomeSlot}, load[e][r]});
  }
  return p;
}

void validate_placement(const LayerPlacement& p, const LoadMatrix& load, const std::string& what) {
  const int32_t W = p.world_size, E = p.n_experts, S = p.replica_slots;
  PLAN_CHECK(W >= 1, "{}: world_size must be >= 1 (got {})", what, W);
  PLAN_CHECK(E >= 1 && E % W == 0, "{}: {} experts cannot be split evenly over {} ranks", what, E,
             W);
  PLAN_CHECK(S >= 0, "{}: replica_slots must be >= 0 (got {})", what, S);
  PLAN_CHECK(static_cast<int32_t>(load.size()) == E, "{}: load has {} experts, the plan {}", what,
             load.size(), E);
  PLAN_CHECK(static_cast<int32_t>(p.slots.size()) == W, "{}: slots has {} ranks, expected {}", what,
             p.slots.size(), W);
  for (int32_t r = 0; r < W; ++r) {
    PLAN_CHECK(static_cast<int32_t>(p.slots[r].size()) == S,
               "{}: rank {} has {} replica slots, expected {}", what, r, p.slots[r].size(), S);
    for (int32_t s = 0; s < S; ++s)
      PLAN_CHECK(p.slots[r][s] >= -1 && p.slots[r][s] < E,
                 "{}: rank {} slot {} holds expert {}, not in [-1, {})", what, r, s, p.slots[r][s],
                 E);
  }
  PLAN_CHECK(static_cast<int32_t>(p.split.size()) == E, "{}: split has {} experts, expected {}",
             what, p.split.size(), E);
  for (int32_t e = 0; e < E; ++e) {
    PLAN_CHECK(static_cast<int32_t>(load[e].size()) == W,
               "{}: load row of expert {} has {} source ranks, expected {}", what, e,
               load[e].size(), W);
    PLAN_CHECK(static_cast<int32_t>(p.split[e].size()) == W,
               "{}: split of expert {} has {} source ranks, expected {}", what, e,
               p.split[e].size(), W);
    for (int32_t r = 0; r < W; ++r) {
      int64_t sum = 0;
      for (const TokenShare& s : p.split[e][r]) {
        const ExpertInstance& in = s.instance;
        PLAN_CHECK(s.tokens >= 0, "{}: expert {} from rank {}: negative share {}", what, e, r,
                   s.tokens);
        PLAN_CHECK(in.rank >= 0 && in.rank < W,
                   "{}: expert {} from rank {}: share sent to rank {}, not in [0, {})", what, e, r,
                   in.rank, W);
        if (in.is_home()) {
          PLAN_CHECK(in.rank == p.home_rank(e),
                     "{}: expert {} from rank {}: share sent to rank {}'s home experts, but "
                     "expert {} lives on rank {}",
                     what, e, r, in.rank, e, p.home_rank(e));
        } else {
          PLAN_CHECK(in.slot >= 0 && in.slot < S,
                     "{}: expert {} from rank {}: share sent to slot {} of rank {}, not in [0, {})",
                     what, e, r, in.slot, in.rank, S);
          PLAN_CHECK(p.slots[in.rank][in.slot] == e,
                     "{}: expert {} from rank {}: share sent to rank {} slot {}, which holds "
                     "expert {}",
                     what, e, r, in.rank, in.slot, p.slots[in.rank][in.slot]);
        }
        sum += s.tokens;
      }
      PLAN_CHECK(sum == load[e][r], "{}: expert {} from rank {}: shares add up to {}, load is {}",
                 what, e, r, sum, load[e][r]);
    }
  }
}

}  // namespace fm
