// Routing traces: validation and the load statistics the balancer plans from.
#include "balancer/routing_trace.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <stdexcept>

namespace fm {
namespace {

RoutingTrace three_tokens() {
  RoutingTrace t;
  t.n_moe_layers = 2;
  t.top_k = 2;
  t.n_experts = 4;
  t.seq_offsets = {0, 2, 3};
  // token-major [tokens, layers, k]
  t.ids = {0, 1, 2, 3,  //
           0, 2, 2, 1,  //
           3, 0, 2, 0};
  return t;
}

TEST(RoutingTrace, ExpertLoadCountsAssignmentsPerLayerAndTokenRange) {
  const RoutingTrace t = three_tokens();
  EXPECT_NO_THROW(validate_trace(t));
  EXPECT_EQ(expert_load(t, 0, 0, 3), (std::vector<int64_t>{3, 1, 1, 1}));
  EXPECT_EQ(expert_load(t, 1, 0, 3), (std::vector<int64_t>{1, 1, 3, 1}));
  EXPECT_EQ(expert_load(t, 1, 2, 3), (std::vector<int64_t>{1, 0, 1, 0}));
  EXPECT_THROW(expert_load(t, 2, 0, 3), std::runtime_error);
  EXPECT_THROW(expert_load(t, 0, 0, 4), std::runtime_error);
}

TEST(RoutingTrace, ValidationNamesTheProblem) {
  RoutingTrace t = three_tokens();
  t.ids[5] = 4;
  EXPECT_THAT([&] { validate_trace(t); },
              ::testing::ThrowsMessage<std::runtime_error>(::testing::HasSubstr("expert id 4")));
  t = three_tokens();
  t.ids.pop_back();
  EXPECT_THAT([&] { validate_trace(t); }, ::testing::ThrowsMessage<std::runtime_error>(
                                              ::testing::HasSubstr("ids has 11 entries")));
  t = three_tokens();
  t.seq_offsets = {0, 3, 2};
  EXPECT_THAT([&] { validate_trace(t); },
              ::testing::ThrowsMessage<std::runtime_error>(::testing::HasSubstr("decrease")));
}

TEST(RoutingTrace, MaxViolation) {
  EXPECT_DOUBLE_EQ(max_violation({3, 1, 1, 1}), 1.0);
  EXPECT_DOUBLE_EQ(max_violation({2, 2, 2, 2}), 0.0);
  EXPECT_DOUBLE_EQ(max_violation({0, 0}), 0.0);
}

}  // namespace
}  // namespace fm
