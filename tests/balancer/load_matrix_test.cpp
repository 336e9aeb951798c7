// Load matrices from routing traces and sequence assignments: hand-counted matrices, agreement
// with trace_stats' static-EP rank loads, step totals, and malformed input.
#include "balancer/load_matrix.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <stdexcept>
#include <string>

#include "balancer/synthetic_trace.h"
#include "balancer/trace_stats.h"

namespace fm {
namespace {

// 4 experts, top-2, 2 MoE layers; sequences of 2, 1, 3 tokens. Layer 1 routes every token to
// experts {3, 0}; layer 0 as listed.
RoutingTrace small_trace() {
  RoutingTrace t;
  t.n_moe_layers = 2;
  t.top_k = 2;
  t.n_experts = 4;
  t.seq_offsets = {0, 2, 3, 6};
  const uint16_t layer0[6][2] = {{0, 1}, {0, 2}, {3, 1}, {2, 3}, {2, 0}, {1, 2}};
  for (int n = 0; n < 6; ++n) {
    t.ids.insert(t.ids.end(), {layer0[n][0], layer0[n][1]});
    t.ids.insert(t.ids.end(), {3, 0});
  }
  return t;
}

void expect_error(const std::function<void()>& f, const std::string& fragment) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing: " << fragment;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(LoadMatrix, CountsEveryTokenKAssignmentOfAGeneralAssignment) {
  const RoutingTrace t = small_trace();
  // Micro-step 0: rank 0 runs sequence 2, rank 1 runs sequences 1 and 0 (out of order).
  // Micro-step 1: rank 0 nothing, rank 1 nothing: sequences may be left out.
  const SequenceAssignment a = {{{2}, {1, 0}}, {{}, {}}};
  const auto loads = load_matrices(t, a);
  ASSERT_EQ(loads.size(), 2u);
  ASSERT_EQ(loads[0].size(), 2u);
  // Layer 0, rank 0 (tokens 3-5): {2,3}, {2,0}, {1,2} -> e0 1, e1 1, e2 3, e3 1.
  // Rank 1 (tokens 0-2): {0,1}, {0,2}, {3,1} -> e0 2, e1 2, e2 1, e3 1.
  EXPECT_EQ(loads[0][0], (LoadMatrix{{1, 2}, {1, 2}, {3, 1}, {1, 1}}));
  // Layer 1: every token to experts 3 and 0; rank 0 has 3 tokens, rank 1 has 3.
  EXPECT_EQ(loads[0][1], (LoadMatrix{{3, 3}, {0, 0}, {0, 0}, {3, 3}}));
  EXPECT_EQ(loads[1][0], (LoadMatrix(4, std::vector<int64_t>(2, 0))));
  EXPECT_EQ(load_matrix(t, 0, a[0]), loads[0][0]);
  // Step totals: layer 0 per expert = row sums of micro-step 0.
  const auto step = step_expert_load(loads);
  EXPECT_EQ(step[0], (std::vector<int64_t>{3, 3, 4, 2}));
  EXPECT_EQ(step[1], (std::vector<int64_t>{6, 0, 0, 6}));
}

TEST(LoadMatrix, ConsecutiveAssignmentAgreesWithTraceStats) {
  SyntheticTraceOptions o;
  o.n_experts = 16;
  o.top_k = 3;
  o.n_moe_layers = 3;
  o.sequences = 27;  // the last micro-step is partial
  o.seq_len = 9;
  o.skew = 1.3;
  o.seed = 4;
  const RoutingTrace t = synthetic_trace(o);
  const int64_t W = 4, mb = 2;
  const SequenceAssignment a = consecutive_assignment(t, W, mb);
  ASSERT_EQ(a.size(), 4u);
  EXPECT_EQ(a[3][1], (std::vector<int64_t>{26}));
  EXPECT_TRUE(a[3][2].empty());
  const auto loads = load_matrices(t, a);
  const TraceImbalance stats = trace_imbalance(t, W, mb);
  ASSERT_EQ(stats.n_micro_steps(), 4);
  for (int64_t m = 0; m < 4; ++m)
    for (int64_t l = 0; l < 3; ++l) {
      // Static EP: rank h computes its home experts' load from every source.
      std::vector<int64_t> rank(W, 0);
      int64_t total = 0;
      for (int64_t e = 0; e < 16; ++e)
        for (int64_t r = 0; r < W; ++r) {
          rank[e / 4] += loads[m][l][e][r];
          total += loads[m][l][e][r];
        }
      EXPECT_EQ(*std::max_element(rank.begin(), rank.end()),
                stats.max_rank_load[static_cast<size_t>(m * 3 + l)])
          << "micro-step " << m << " layer " << l;
      const MicroStep& ms = stats.micro_steps[static_cast<size_t>(m)];
      EXPECT_EQ(total, (ms.end_token - ms.first_token) * 3);
      // Source rank r's column holds k x its micro-batch's tokens.
      for (int64_t r = 0; r < W; ++r) {
        int64_t column = 0;
        for (int64_t e = 0; e < 16; ++e) column += loads[m][l][e][r];
        EXPECT_EQ(column, ms.rank_tokens[static_cast<size_t>(r)] * 3);
      }
    }
  const auto step = step_expert_load(loads);
  for (int64_t l = 0; l < 3; ++l) EXPECT_EQ(step[l], expert_load(t, l, 0, t.tokens()));
}

TEST(LoadMatrix, RejectsMalformedInputNamingTheProblem) {
  const RoutingTrace t = small_trace();
  expect_error(
      [&] {
        load_matrices(t, {{{0}, {7}}});
      },
      "micro-step 0, rank 1: sequence 7 is out of range [0, 3)");
  expect_error(
      [&] {
        load_matrices(t, {{{0}, {1}}, {{2}, {0}}});
      },
      "micro-step 1, rank 1: sequence 0 is assigned twice");
  expect_error(
      [&] {
        load_matrices(t, {{{0}, {1}}, {{2}, {}, {}}});
      },
      "micro-step 1 has 3 ranks, micro-step 0 has 2");
  expect_error(
      [&] {
        load_matrices(t, {{{0}, {1}, {2}}});
      },
      "4 experts cannot be split evenly over 3 ranks");
  expect_error([&] { load_matrices(t, {}); }, "no micro-steps");
  expect_error([&] { load_matrix(t, 2, {{0}, {1}}); }, "layer 2 is out of range [0, 2)");
  expect_error([&] { consecutive_assignment(t, 0, 1); }, "ranks must be >= 1 (got 0)");
  expect_error([&] { consecutive_assignment(t, 2, 0); }, "micro_batch must be >= 1 (got 0)");
  expect_error(
      [&] {
        std::vector<std::vector<LoadMatrix>> loads(2);
        loads[0].push_back(LoadMatrix(4, std::vector<int64_t>(2, 0)));
        loads[1].push_back(LoadMatrix(3, std::vector<int64_t>(2, 0)));
        step_expert_load(loads);
      },
      "micro-step 1 layer 0 has 3 experts, expected 4");
  // A trace whose ids do not match its counts is rejected before counting.
  RoutingTrace bad = t;
  bad.ids.pop_back();
  EXPECT_ANY_THROW(load_matrices(bad, {{{0}, {1}}}));
  expect_error(
      [] {
        validate_load_matrix({{1, 2}, {3, -4}}, 2, 2);
      },
      "expert 1 from rank 1: negative count -4");
  expect_error(
      [] {
        validate_load_matrix({{1, 2}, {3}}, 2, 2);
      },
      "expert 1 has 1 source ranks, expected 2");
  expect_error([] { validate_load_matrix({{1, 2}, {3, 4}}, 2, 0); }, "world size must be >= 1");
}

}  // namespace
}  // namespace fm
