// Plan metrics on a hand-built plan (every figure computed by hand), the lower bound's two
// regimes, and bad arguments.
#include "balancer/plan_metrics.h"

#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

namespace fm {
namespace {

TEST(PlanMetrics, HandBuiltPlanByHand) {
  // 2 nodes x 2 GPUs, 4 experts (expert e on rank e). Load: expert 0 gets 30 from each rank,
  // expert 3 gets 10 from rank 3. Rank 2's slot 0 holds expert 0, rank 1's slot 1 holds 3.
  const Topology topo{2, 2};
  LoadMatrix load(4, std::vector<int64_t>(4, 0));
  for (int r = 0; r < 4; ++r) load[0][r] = 30;
  load[3][3] = 10;
  LayerPlacement p = trivial_placement(load, 4, 2);
  p.slots[2][0] = 0;
  p.slots[1][1] = 3;
  // Expert 0: rank 2 keeps its 30 on its replica, rank 3 sends 20 to it and 10 home.
  p.split[0][2] = {{{2, 0}, 30}};
  p.split[0][3] = {{{2, 0}, 20}, {{0, -1}, 10}};
  // Expert 3: rank 3's 10 go to the replica on rank 1.
  p.split[3][3] = {{{1, 1}, 10}};
  const PlanMetrics m = plan_metrics(p, load, topo, nullptr, 100);
  EXPECT_EQ(m.rank_load, (std::vector<int64_t>{70, 10, 50, 0}));
  EXPECT_EQ(m.total, 130);
  EXPECT_EQ(m.max_load, 70);
  EXPECT_DOUBLE_EQ(m.mean_load, 32.5);
  EXPECT_DOUBLE_EQ(m.max_over_mean, 70.0 / 32.5);
  EXPECT_EQ(m.lower_bound, 33);  // ceil(130 / 4); S = 2 leaves the slot term slack
  EXPECT_DOUBLE_EQ(m.ratio_to_bound, 70.0 / 33.0);
  // Off the source GPU: rank 1's 30 -> rank 0, rank 3's 20 -> rank 2 and 10 -> rank 0, rank 3's
  // 10 of expert 3 -> rank 1. Off the node (nodes {0, 1}, {2, 3}): only 3 -> 0 and 3 -> 1.
  EXPECT_EQ(m.cross_gpu_tokens, 30 + 20 + 10 + 10);
  EXPECT_EQ(m.cross_node_tokens, 10 + 10);
  EXPECT_EQ(m.replicas, 2);
  EXPECT_EQ(m.new_replicas, 2);
  EXPECT_EQ(m.bytes_moved, 200);
  // Against a previous plan with expert 0 already in rank 2's slot 0 (and 3 in the wrong
  // slot of rank 1): only one replica moves.
  LayerPlacement prev = trivial_placement(load, 4, 2);
  prev.slots[2][0] = 0;
  prev.slots[1][0] = 3;
  const PlanMetrics again = plan_metrics(p, load, topo, &prev, 100);
  EXPECT_EQ(again.new_replicas, 1);
  EXPECT_EQ(again.bytes_moved, 100);
}

TEST(PlanMetrics, LowerBoundWithAndWithoutSlots) {
  // Home-rank loads A = {90, 10, 0, 0}, T = 100.
  const std::vector<int64_t> A = {90, 10, 0, 0};
  // S = 0: nothing can leave its home rank, the bound is the busiest home: 90.
  EXPECT_EQ(placement_lower_bound(A, 0), 90);
  // S >= 1: rank 0 must shed 65 to reach ceil(100 / 4) = 25, in ceil(65 / 25) = 3 replicas
  // <= 4 slots: the bound is 25.
  EXPECT_EQ(placement_lower_bound(A, 1), 25);
  EXPECT_EQ(placement_lower_bound({0, 0}, 3), 0);
  // The matrix form sums each home rank's experts: 2 experts per rank.
  const LoadMatrix load = {{40, 50}, {0, 0}, {5, 5}, {0, 0}};
  EXPECT_EQ(placement_lower_bound(load, 2, 0), 90);
  EXPECT_EQ(placement_lower_bound(load, 2, 1), 50);
  EXPECT_THROW(placement_lower_bound(A, -1), std::invalid_argument);
}

TEST(PlanMetrics, RejectsMismatchedArguments) {
  const LoadMatrix load = {{1, 2}, {3, 4}};
  const LayerPlacement p = trivial_placement(load, 2, 1);
  EXPECT_THROW(plan_metrics(p, load, Topology{2, 2}, nullptr, 1), std::invalid_argument);
  EXPECT_THROW(plan_metrics(p, load, Topology{1, 2}, nullptr, -1), std::invalid_argument);
  const LayerPlacement other = trivial_placement(load, 2, 3);
  EXPECT_THROW(plan_metrics(p, load, Topology{1, 2}, &other, 1), std::invalid_argument);
  LoadMatrix wrong = load;
  wrong[0][0] = 9;  // the plan's shares no longer add up: validate_placement's error
  try {
    plan_metrics(p, wrong, Topology{1, 2}, nullptr, 1);
    ADD_FAILURE() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("shares add up to 1, load is 9"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace fm
