// How good a placement plan is (balancer/placement.h), as numbers a researcher can compare
// across planners: the balance it reaches, how far that is from a provable bound, the traffic
// its token split causes and the expert weights it makes the transfer engine move.
//
// Rank load. load_r = sum over (e, source s) of the tokens the plan sends to an instance on
// rank r (its home experts and its replica slots): the (token, k) assignments whose expert GEMM
// rows rank r computes. The MoE layer finishes when the busiest rank does, so
//   max_over_mean = max_r load_r / mean_r load_r        (1 = perfect; 1 when there is no load).
//
// Lower bound (placement_lower_bound). T = sum of the load, A_h = the load of rank h's home
// experts, S = replica slots per rank, M = the plan's max rank load. Two facts bound M:
//   (1) M >= ceil(T / W): the W ranks together compute all T assignments.
//   (2) Rank h keeps at most M, so at least A_h - M of its home experts' tokens run on replicas,
//       each on a rank whose load is <= M: that needs >= ceil((A_h - M) / M) replica slots.
//       Different home ranks' experts need different slots and there are W*S of them, so
//         sum_h ceil(max(0, A_h - M) / M) <= W*S.
//       The smallest M satisfying it is the "largest piece that cannot be split further given
//       the slot count": with S = 0 it is max_h A_h (no replica can take any of it).
//   lower_bound = max(ceil(T / W), smallest integer M >= 1 meeting (2))  (0 when T = 0)
// (2) is monotone in M, so the bound is found by bisection. It ignores that one rank holds at
// most one useful instance of an expert, so it is a valid bound but not always attainable. In
// practice term (2) binds only for S = 0: at M = ceil(T/W), sum_h ceil((A_h - M)/M) over the
// ranks above M is at most sum_h A_h / M <= W <= W*S, so for S >= 1 the bound is ceil(T / W).
//   ratio_to_bound = max_r load_r / lower_bound     (>= 1; 1 = provably optimal; 1 when T = 0)
//
// Traffic. A share of source rank s sent to an instance on rank r crosses a GPU boundary when
// r != s and a node boundary when node(r) != node(s) (balancer/topology.h); counted in tokens
// (assignments). Weights. A replica (rank r, slot i, expert e) is new unless the previous plan
// of the same layer had expert e in rank r's slot i; each new replica costs expert_bytes:
//   bytes_moved = new_replicas x expert_bytes.
// Planning time is measured by the caller (it is not a property of the plan) and stored here.
#pragma once

#include <cstdint>
#include <vector>

#include "balancer/placement.h"
#include "balancer/topology.h"

namespace fm {

struct PlanMetrics {
  std::vector<int64_t> rank_load;  // [W] assignments computed by each rank
  int64_t total = 0;               // sum of rank_load = sum of the load matrix
  int64_t max_load = 0;            // max_r rank_load
  double mean_load = 0;            // total / W
  double max_over_mean = 1;        // max_load / mean_load (1 when total = 0)
  int64_t lower_bound = 0;         // placement_lower_bound(load, W, S)
  double ratio_to_bound = 1;       // max_load / lower_bound (1 when total = 0)
  int64_t cross_gpu_tokens = 0;    // assignments computed on another rank than their source
  int64_t cross_node_tokens = 0;   // ... on another node than their source
  int32_t replicas = 0;            // non-empty replica slots
  int32_t new_replicas = 0;        // of which not resident in the previous plan
  int64_t bytes_moved = 0;         // new_replicas x expert_bytes
  double planning_seconds = 0;     // filled by the caller
};

// The bound above for `load` (E x W), W ranks with `replica_slots` slots each. Throws like
// validate_load_matrix when the shape is wrong or a count is negative.
int64_t placement_lower_bound(const LoadMatrix& load, int32_t world_size, int32_t replica_slots);

// The same from the home-rank loads A_h (size W) alone: what the bound depends on.
int64_t placement_lower_bound(const std::vector<int64_t>& home_rank_load, int32_t replica_slots);

// Metrics of `plan` for `load` on `topology` (its world size must be the plan's).
// `previous` is the previous plan of the same layer (nullptr: nothing resident, every replica
// is new). Validates the plan first (validate_placement) and throws std::invalid_argument on
// a topology or previous plan of another shape.
PlanMetrics plan_metrics(const LayerPlacement& plan, const LoadMatrix& load,
                         const Topology& topology, const LayerPlacement* previous,
                         int64_t expert_bytes);

}  // namespace fm
