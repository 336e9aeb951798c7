// The placement plan type: the trivial plan, and validation naming every kind of bad plan.
#include "balancer/placement.h"

#include <gtest/gtest.h>

#include <functional>
#include <stdexcept>
#include <string>

namespace fm {
namespace {

// 4 experts over 2 ranks (experts 0, 1 on rank 0; 2, 3 on rank 1), uneven load with zeros.
LoadMatrix sample_load() {
  return {{5, 0}, {2, 7}, {0, 0}, {3, 9}};
}

void expect_error(const std::function<void()>& f, const std::string& fragment) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing: " << fragment;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(Placement, TrivialPlanSendsEverythingHome) {
  const LoadMatrix load = sample_load();
  const LayerPlacement p = trivial_placement(load, 2, 3);
  validate_placement(p, load);
  EXPECT_EQ(p.experts_per_rank(), 2);
  EXPECT_EQ(p.home_rank(1), 0);
  EXPECT_EQ(p.home_rank(2), 1);
  for (int32_t e = 0; e < 4; ++e)
    for (int32_t r = 0; r < 2; ++r) {
      ASSERT_EQ(p.split[e][r].size(), 1u);
      EXPECT_TRUE(p.split[e][r][0].instance.is_home());
      EXPECT_EQ(p.split[e][r][0].instance.rank, p.home_rank(e));
      EXPECT_EQ(p.tokens(e, r), load[e][r]);
    }
  for (const auto& slots : p.slots) EXPECT_EQ(slots, std::vector<int32_t>(3, -1));
}

TEST(Placement, ReplicaSplitValidates) {
  const LoadMatrix load = sample_load();
  LayerPlacement p = trivial_placement(load, 2, 1);
  // Expert 3 (home rank 1) gets a replica in rank 0's slot 0; rank 0's 3 tokens go there and
  // rank 1's 9 are split 4 home / 5 replica.
  p.slots[0][0] = 3;
  p.split[3][0] = {{{0, 0}, 3}};
  p.split[3][1] = {{{1, ExpertInstance::kHomeSlot}, 4}, {{0, 0}, 5}};
  validate_placement(p, load);
}

TEST(Placement, ValidationNamesTheProblem) {
  const LoadMatrix load = sample_load();
  const LayerPlacement good = trivial_placement(load, 2, 1);
  expect_error([&] { trivial_placement(load, 3); }, "4 experts cannot be split evenly over 3");
  {
    LayerPlacement p = good;
    p.split[1][1][0].tokens = 6;
    expect_error([&] { validate_placement(p, load, "layer 2"); },
                 "layer 2: expert 1 from rank 1: shares add up to 6, load is 7");
  }
  {
    LayerPlacement p = good;
    p.split[0][0][0].instance = {1, ExpertInstance::kHomeSlot};
    expect_error([&] { validate_placement(p, load); },
                 "share sent to rank 1's home experts, but expert 0 lives on rank 0");
  }
  {
    LayerPlacement p = good;
    p.split[0][0][0].instance = {1, 0};  // rank 1 slot 0 is empty
    expect_error([&] { validate_placement(p, load); }, "slot 0, which holds expert -1");
  }
  {
    LayerPlacement p = good;
    p.split[0][0][0].instance = {1, 4};
    expect_error([&] { validate_placement(p, load); }, "slot 4 of rank 1, not in [0, 1)");
  }
  {
    LayerPlacement p = good;
    p.split[0][0][0].instance = {2, ExpertInstance::kHomeSlot};
    expect_error([&] { validate_placement(p, load); }, "sent to rank 2, not in [0, 2)");
  }
  {
    LayerPlacement p = good;
    p.slots[1][0] = 4;
    expect_error([&] { validate_placement(p, load); }, "rank 1 slot 0 holds expert 4");
  }
  {
    LayerPlacement p = good;
    p.split[2][0] = {{{1, ExpertInstance::kHomeSlot}, 3}, {{1, ExpertInstance::kHomeSlot}, -3}};
    expect_error([&] { validate_placement(p, load); }, "negative share -3");
  }
  {
    LayerPlacement p = good;
    p.replica_slots = -1;
    expect_error([&] { validate_placement(p, load); }, "replica_slots must be >= 0");
  }
  {
    LayerPlacement p = good;
    LoadMatrix short_load = load;
    short_load.pop_back();
    expect_error([&] { validate_placement(p, short_load); }, "load has 3 experts, the plan 4");
  }
}

}  // namespace
}  // namespace fm
