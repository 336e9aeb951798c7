// Synthetic traces: valid, reproducible, and skewed the way the options say.
#include "balancer/synthetic_trace.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <set>
#include <stdexcept>

#include "balancer/trace_stats.h"

namespace fm {
namespace {

TEST(SyntheticTrace, IsValidReproducibleAndPicksDistinctExperts) {
  SyntheticTraceOptions o;
  o.n_experts = 16;
  o.top_k = 4;
  o.n_moe_layers = 3;
  o.sequences = 10;
  o.seq_len = 20;
  o.skew = 1.5;
  o.seed = 7;
  const RoutingTrace a = synthetic_trace(o);
  EXPECT_NO_THROW(validate_trace(a));
  EXPECT_EQ(a.tokens(), 200);
  EXPECT_EQ(a, synthetic_trace(o));
  o.seed = 8;
  EXPECT_NE(a, synthetic_trace(o));
  for (int64_t n = 0; n < a.tokens(); ++n)
    for (int64_t l = 0; l < a.n_moe_layers; ++l) {
      std::set<uint16_t> picked;
      for (int64_t k = 0; k < a.top_k; ++k) picked.insert(a.at(n, l, k));
      ASSERT_EQ(picked.size(), 4u) << "token " << n << " layer " << l;
    }
}

TEST(SyntheticTrace, SkewControlsExpertImbalance) {
  SyntheticTraceOptions o;
  o.n_experts = 32;
  o.top_k = 2;
  o.n_moe_layers = 1;
  o.sequences = 64;
  o.seq_len = 128;
  o.drift = 0.0;  // one fixed popularity order: the whole-trace load follows Zipf exactly
  o.skew = 0.0;
  const double uniform = max_violation(expert_load(synthetic_trace(o), 0, 0, 64 * 128));
  o.skew = 1.2;
  const double skewed = max_violation(expert_load(synthetic_trace(o), 0, 0, 64 * 128));
  // Uniform: 16384 assignments over 32 experts, 512 each, sd ~22: MaxVio well under 0.3.
  EXPECT_LT(uniform, 0.3);
  // Zipf 1.2 over 32 experts, top-2 without replacement: the top expert is in ~55.5% of the
  // 8192 tokens' top-2: MaxVio ~ (0.555 * 8192 - 512) / 512 ~ 7.88; binomial sd of the count
  // ~45, i.e. ~0.09 in MaxVio, so +-0.4 is > 4 sd.
  EXPECT_NEAR(skewed, 7.88, 0.4);
}

TEST(SyntheticTrace, DriftMakesMicroStepsWorseThanTheWholeTrace) {
  SyntheticTraceOptions o;
  o.n_experts = 64;
  o.top_k = 4;
  o.n_moe_layers = 2;
  o.sequences = 128;
  o.seq_len = 64;
  o.skew = 1.0;
  o.drift = 0.5;
  const TraceImbalance r = trace_imbalance(synthetic_trace(o), /*ranks=*/8, /*micro_batch=*/1);
  EXPECT_GT(r.overall.mean, r.whole_trace_ratio + 0.2);
}

TEST(SyntheticTrace, RejectsBadOptions) {
  SyntheticTraceOptions o;
  o.top_k = o.n_experts + 1;
  EXPECT_THAT([&] { synthetic_trace(o); },
              ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr("top_k")));
  o = {};
  o.skew = -1;
  EXPECT_THAT([&] { synthetic_trace(o); },
              ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr("skew")));
  o = {};
  o.n_experts = 70000;
  EXPECT_THAT([&] { synthetic_trace(o); },
              ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr("experts")));
}

}  // namespace
}  // namespace fm
