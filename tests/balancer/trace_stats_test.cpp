// Micro-step imbalance under static expert parallelism: hand-built traces with known ratios.
#include "balancer/trace_stats.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <stdexcept>

namespace fm {
namespace {

// One MoE layer, top-1, `lengths[s]` tokens in sequence s; expert ids given token by token.
RoutingTrace top1_trace(int64_t experts, const std::vector<int64_t>& lengths,
                        const std::vector<uint16_t>& ids) {
  RoutingTrace t;
  t.n_moe_layers = 1;
  t.top_k = 1;
  t.n_experts = experts;
  t.seq_offsets = {0};
  for (int64_t n : lengths) t.seq_offsets.push_back(t.seq_offsets.back() + n);
  t.ids = ids;
  return t;
}

// Ratios are quotients of small integers: exact up to one rounding, so EXPECT_DOUBLE_EQ.
TEST(TraceStats, PerfectlyBalancedTraceHasRatioOne) {
  // E 4, W 2 (rank 0: experts 0-1, rank 1: experts 2-3); each micro-step sends 2 tokens to each.
  const RoutingTrace t = top1_trace(4, {2, 2, 2, 2}, {0, 2, 1, 3, 3, 0, 2, 1});
  const TraceImbalance r = trace_imbalance(t, /*ranks=*/2, /*micro_batch=*/1);
  ASSERT_EQ(r.n_micro_steps(), 2);
  EXPECT_EQ(r.experts_per_rank, 2);
  for (int64_t m = 0; m < 2; ++m) EXPECT_DOUBLE_EQ(r.at(m, 0), 1.0);
  EXPECT_DOUBLE_EQ(r.overall.max, 1.0);
  EXPECT_DOUBLE_EQ(r.whole_trace_ratio, 1.0);
  EXPECT_DOUBLE_EQ(r.time_ratio, 1.0);
  EXPECT_DOUBLE_EQ(r.layers[0].max_vio, 0.0);
  EXPECT_EQ(r.layers[0].expert_load, (std::vector<int64_t>{2, 2, 2, 2}));
  EXPECT_EQ(r.layers[0].rank_load, (std::vector<int64_t>{4, 4}));
}

TEST(TraceStats, AllTokensToOneExpertGiveRatioW) {
  // E 8 over W 4: every assignment lands on rank 0, so max = total = W * mean.
  RoutingTrace t;
  t.n_moe_layers = 2;
  t.top_k = 2;
  t.n_experts = 8;
  t.seq_offsets = {0, 3, 5, 6, 10};
  t.ids.assign(10 * 2 * 2, 0);
  for (size_t i = 1; i < t.ids.size(); i += 2) t.ids[i] = 1;  // top-2 = {0, 1}, both on rank 0
  const TraceImbalance r = trace_imbalance(t, 4, 1);
  ASSERT_EQ(r.n_micro_steps(), 1);
  EXPECT_DOUBLE_EQ(r.at(0, 0), 4.0);
  EXPECT_DOUBLE_EQ(r.at(0, 1), 4.0);
  EXPECT_DOUBLE_EQ(r.overall.mean, 4.0);
  EXPECT_DOUBLE_EQ(r.whole_trace_ratio, 4.0);
  EXPECT_DOUBLE_EQ(r.time_ratio, 4.0);
  EXPECT_EQ(r.max_rank_load[0], 20);
  // MaxVio: loads {10, 10, 0, ...}, mean 2.5 -> (10 - 2.5) / 2.5 = 3.
  EXPECT_DOUBLE_EQ(r.layers[1].max_vio, 3.0);
  // Token imbalance: rank micro-batches hold 3, 2, 1, 4 tokens -> 4 / 2.5.
  EXPECT_EQ(r.micro_steps[0].rank_tokens, (std::vector<int64_t>{3, 2, 1, 4}));
  EXPECT_DOUBLE_EQ(r.micro_steps[0].token_ratio, 1.6);
  // 20 assignments over 4 ranks divide exactly: the lower bound is perfect balance.
  EXPECT_DOUBLE_EQ(r.micro_steps[0].lower_bound_ratio, 1.0);
}

TEST(TraceStats, SkewedMicroStepsCanHideInABalancedWholeTrace) {
  // E 2, W 2, mb 1: micro-step 0 (sequences 0, 1) goes all to expert 0, micro-step 1 all to
  // expert 1. Over the whole trace each rank gets half.
  const RoutingTrace t = top1_trace(2, {2, 2, 2, 2}, {0, 0, 0, 0, 1, 1, 1, 1});
  const TraceImbalance r = trace_imbalance(t, 2, 1);
  ASSERT_EQ(r.n_micro_steps(), 2);
  EXPECT_DOUBLE_EQ(r.whole_trace_ratio, 1.0);
  EXPECT_DOUBLE_EQ(r.layers[0].whole_trace_ratio, 1.0);
  EXPECT_DOUBLE_EQ(r.layers[0].max_vio, 0.0);
  EXPECT_DOUBLE_EQ(r.at(0, 0), 2.0);
  EXPECT_DOUBLE_EQ(r.at(1, 0), 2.0);
  EXPECT_DOUBLE_EQ(r.layers[0].micro_step.mean, 2.0);
  // Each micro-step takes as long as 4 assignments on one rank, twice the balanced 2.
  EXPECT_DOUBLE_EQ(r.time_ratio, 2.0);
  EXPECT_DOUBLE_EQ(r.lower_bound_time_ratio, 1.0);
  // One big step of mb 2 sees the whole trace and is balanced.
  EXPECT_DOUBLE_EQ(trace_imbalance(t, 2, 2).at(0, 0), 1.0);
}

TEST(TraceStats, PartialLastMicroStepIsIncludedAndFlagged) {
  // 5 sequences over W 2 x mb 1: steps {0,1}, {2,3}, {4}; the last leaves rank 1 without data.
  const RoutingTrace t = top1_trace(2, {1, 1, 1, 1, 3}, {0, 1, 1, 0, 0, 1, 0});
  const TraceImbalance r = trace_imbalance(t, 2, 1);
  ASSERT_EQ(r.n_micro_steps(), 3);
  EXPECT_FALSE(r.micro_steps[0].partial);
  EXPECT_FALSE(r.micro_steps[1].partial);
  const MicroStep& last = r.micro_steps[2];
  EXPECT_TRUE(last.partial);
  EXPECT_EQ(last.first_seq, 4);
  EXPECT_EQ(last.end_seq, 5);
  EXPECT_EQ(last.first_token, 4);
  EXPECT_EQ(last.end_token, 7);
  EXPECT_EQ(last.rank_tokens, (std::vector<int64_t>{3, 0}));
  EXPECT_DOUBLE_EQ(last.token_ratio, 2.0);
  // Expert loads {2, 1}: ratio 2 / 1.5; lower bound ceil(3 / 2) / 1.5.
  EXPECT_DOUBLE_EQ(r.at(2, 0), 4.0 / 3.0);
  EXPECT_DOUBLE_EQ(last.lower_bound_ratio, 4.0 / 3.0);
  EXPECT_EQ(r.layers[0].micro_step.count, 3);
}

TEST(TraceStats, LayersAreIndexedSeparately) {
  // Two layers: layer 0 balanced, layer 1 all on rank 1.
  RoutingTrace t;
  t.n_moe_layers = 2;
  t.top_k = 1;
  t.n_experts = 2;
  t.seq_offsets = {0, 2};
  t.ids = {0, 1, 1, 1};  // token 0: layer 0 -> 0, layer 1 -> 1; token 1: 1, 1
  const TraceImbalance r = trace_imbalance(t, 2, 1);
  EXPECT_DOUBLE_EQ(r.at(0, 0), 1.0);
  EXPECT_DOUBLE_EQ(r.at(0, 1), 2.0);
  EXPECT_DOUBLE_EQ(r.whole_trace_ratio, 1.5);  // mean over layers
  EXPECT_DOUBLE_EQ(r.time_ratio, 3.0 / 2.0);   // (1 + 2) / (1 + 1)
  EXPECT_TRUE(r.micro_steps[0].partial);       // one sequence for two ranks
}

TEST(TraceStats, RejectsBadLayouts) {
  const RoutingTrace t = top1_trace(4, {2, 2}, {0, 1, 2, 3});
  EXPECT_THAT([&] { trace_imbalance(t, 3, 1); },
              ::testing::ThrowsMessage<std::invalid_argument>(
                  ::testing::HasSubstr("n_experts 4 is not divisible by ranks 3")));
  EXPECT_THAT([&] { trace_imbalance(t, 2, 0); }, ::testing::ThrowsMessage<std::invalid_argument>(
                                                     ::testing::HasSubstr("micro_batch must be")));
  EXPECT_THAT([&] { trace_imbalance(t, 0, 1); }, ::testing::ThrowsMessage<std::invalid_argument>(
                                                     ::testing::HasSubstr("ranks must be")));
  const RoutingTrace empty = top1_trace(4, {}, {});
  EXPECT_THAT(
      [&] { trace_imbalance(empty, 2, 1); },
      ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr("no sequences")));
}

TEST(TraceStats, SummaryUsesLinearPercentiles) {
  const RatioSummary s = summarize({5, 1, 4, 2, 3});
  EXPECT_EQ(s.count, 5);
  EXPECT_DOUBLE_EQ(s.mean, 3.0);
  EXPECT_DOUBLE_EQ(s.p50, 3.0);
  EXPECT_DOUBLE_EQ(s.p95, 4.8);  // position 0.95 * 4 = 3.8 between 4 and 5
  EXPECT_DOUBLE_EQ(s.max, 5.0);
  EXPECT_EQ(summarize({}).count, 0);
}

}  // namespace
}  // namespace fm
