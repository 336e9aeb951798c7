// The planner imbalance study: steps and micro-steps cut as documented, every planner run,
// metrics agreeing with trace_stats' static figures.
#include "balancer/planner_study.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <stdexcept>
#include <tuple>

#include "balancer/synthetic_trace.h"
#include "balancer/trace_stats.h"

namespace fm {
namespace {

RoutingTrace small_trace() {
  SyntheticTraceOptions o;
  o.n_experts = 16;
  o.top_k = 2;
  o.n_moe_layers = 2;
  o.sequences = 70;  // 4 steps of 16 sequences and 6 left over
  o.seq_len = 16;
  o.skew = 1.2;
  o.preference = 0.5;
  o.preference_group = 4;
  o.seed = 11;
  return synthetic_trace(o);
}

PlannerStudyOptions small_options() {
  PlannerStudyOptions o;
  o.topology = Topology{2, 2};  // W = 4
  o.replica_slots = 2;
  o.micro_batch = 2;
  o.micro_steps = 2;  // 16 sequences per step
  return o;
}

TEST(PlannerStudy, NoneMatchesTraceStatsStaticImbalance) {
  const RoutingTrace trace = small_trace();
  PlannerStudyOptions o = small_options();
  o.planners = {"none"};
  const std::vector<PlannerStudyRow> rows = run_planner_study(trace, o);
  ASSERT_EQ(rows.size(), 4u * 2 * 2);  // steps x micro-steps x layers; the partial step left out
  // Unshuffled, micro-step m of step t is trace_stats' micro-step t * 2 + m.
  const TraceImbalance ref = trace_imbalance(trace, 4, 2);
  for (const PlannerStudyRow& r : rows) {
    EXPECT_NEAR(r.max_over_mean, ref.at(r.step * 2 + r.micro_step, r.layer), 1e-12)
        << "step " << r.step << " micro-step " << r.micro_step << " layer " << r.layer;
    EXPECT_EQ(r.total, 4 * 2 * 16 * 2);  // ranks x mb x seq_len x top_k
    EXPECT_EQ(r.replicas, 0);
  }
}

TEST(PlannerStudy, RunsEveryPlannerAndForesightNeverLosesToStatic) {
  const std::vector<PlannerStudyRow> rows = run_planner_study(small_trace(), small_options());
  ASSERT_EQ(rows.size(), 4u * 16);
  std::map<std::tuple<int64_t, int64_t, int64_t>, double> none;
  for (size_t i = 0; i < rows.size(); ++i) {
    const PlannerStudyRow& r = rows[i];
    // Planner order, then step, micro-step, layer.
    EXPECT_EQ(r.planner, small_options().planners[i / 16]);
    EXPECT_EQ(r.step * 4 + r.micro_step * 2 + r.layer, static_cast<int64_t>(i % 16));
    EXPECT_GE(r.ratio_to_bound, 1.0);
    if (r.planner == "none") none[{r.step, r.micro_step, r.layer}] = r.max_over_mean;
    if (r.planner == "foresight") {
      EXPECT_LE(r.max_over_mean, none.at({r.step, r.micro_step, r.layer}));
    }
  }
  const std::vector<PlannerStudySummary> s = summarize_planner_study(rows);
  ASSERT_EQ(s.size(), 4u);
  EXPECT_EQ(s[3].planner, "foresight");
  EXPECT_EQ(s[3].max_over_mean.count, 16);
  EXPECT_LT(s[3].max_over_mean.mean, s[0].max_over_mean.mean);
}

TEST(PlannerStudy, ShuffleChangesTheMicroStepsNotTheirSize) {
  const RoutingTrace trace = small_trace();
  PlannerStudyOptions o = small_options();
  o.planners = {"none"};
  const std::vector<PlannerStudyRow> plain = run_planner_study(trace, o);
  o.shuffle_seed = 3;
  const std::vector<PlannerStudyRow> shuffled = run_planner_study(trace, o);
  ASSERT_EQ(plain.size(), shuffled.size());
  // Each rank still gets mb whole sequences of the step (same totals), but the micro-steps
  // are made of other sequences, so some static imbalance changes.
  bool differs = false;
  for (size_t i = 0; i < plain.size(); ++i) {
    EXPECT_EQ(plain[i].total, shuffled[i].total);
    differs |= plain[i].max_over_mean != shuffled[i].max_over_mean;
  }
  EXPECT_TRUE(differs);
}

TEST(PlannerStudy, RejectsATraceShorterThanOneStep) {
  PlannerStudyOptions o = small_options();
  o.micro_steps = 10;  // 80 sequences per step, the trace has 70
  EXPECT_THAT(
      [&] { run_planner_study(small_trace(), o); },
      ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr("fewer than one step")));
  o = small_options();
  o.micro_batch = 0;
  EXPECT_THAT([&] { run_planner_study(small_trace(), o); },
              ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr("micro_batch")));
}

}  // namespace
}  // namespace fm
