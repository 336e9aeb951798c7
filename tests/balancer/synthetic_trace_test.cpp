// Synthetic traces: valid, reproducible, and skewed the way the options say.
#include "balancer/synthetic_trace.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <stdexcept>
#include <vector>

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

// FNV-1a over the expert ids: a fingerprint of a whole trace.
uint64_t fingerprint(const RoutingTrace& t) {
  uint64_t h = 1469598103934665603ull;
  for (uint16_t id : t.ids) h = (h ^ id) * 1099511628211ull;
  return h;
}

TEST(SyntheticTrace, NewOptionsLeftAtDefaultsKeepTheTrace) {
  SyntheticTraceOptions o;
  o.n_experts = 16;
  o.top_k = 4;
  o.n_moe_layers = 3;
  o.sequences = 12;
  o.seq_len = 10;
  o.skew = 1.2;
  o.drift = 0.2;
  o.seed = 5;
  // The value the generator gave before layer_skew and preference existed.
  EXPECT_EQ(fingerprint(synthetic_trace(o)), 3858335792216127546ull);
  o.layer_skew = {1.2, 1.2, 1.2};  // the same skew spelled per layer
  o.preference_group = 3;          // ignored while preference = 0
  EXPECT_EQ(fingerprint(synthetic_trace(o)), 3858335792216127546ull);
}

TEST(SyntheticTrace, LayerSkewSetsEachLayersImbalance) {
  SyntheticTraceOptions o;
  o.n_experts = 32;
  o.top_k = 2;
  o.n_moe_layers = 2;
  o.sequences = 64;
  o.seq_len = 128;
  o.drift = 0.0;
  o.skew = 5.0;  // overridden by layer_skew
  o.layer_skew = {0.0, 1.2};
  const RoutingTrace t = synthetic_trace(o);
  // Same figures and margins as SkewControlsExpertImbalance: uniform < 0.3, Zipf 1.2 ~7.88.
  EXPECT_LT(max_violation(expert_load(t, 0, 0, t.tokens())), 0.3);
  EXPECT_NEAR(max_violation(expert_load(t, 1, 0, t.tokens())), 7.88, 0.4);
}

// Groups of `group` sequences: the fraction of groups whose sequences all have the same most
// used expert, and how many different such experts the groups have.
std::pair<double, size_t> group_top_experts(const RoutingTrace& t, int64_t group) {
  std::vector<int> tops;
  for (int64_t s = 0; s + 1 < static_cast<int64_t>(t.seq_offsets.size()); ++s) {
    const std::vector<int64_t> load = expert_load(t, 0, t.seq_offsets[static_cast<size_t>(s)],
                                                  t.seq_offsets[static_cast<size_t>(s + 1)]);
    tops.push_back(static_cast<int>(std::max_element(load.begin(), load.end()) - load.begin()));
  }
  int agree = 0;
  std::set<int> distinct;
  const int64_t groups = static_cast<int64_t>(tops.size()) / group;
  for (int64_t g = 0; g < groups; ++g) {
    const auto first = tops.begin() + g * group;
    agree += std::all_of(first, first + group, [&](int e) { return e == *first; });
    distinct.insert(*first);
  }
  return {static_cast<double>(agree) / static_cast<double>(groups), distinct.size()};
}

TEST(SyntheticTrace, PreferenceGivesEachGroupItsOwnHotExperts) {
  SyntheticTraceOptions o;
  o.n_experts = 64;
  o.top_k = 4;
  o.n_moe_layers = 1;
  o.sequences = 64;
  o.seq_len = 64;
  o.skew = 0.0;  // no global popularity: any hot expert comes from the preference
  o.drift = 0.0;
  o.preference = 0.8;
  o.preference_skew = 1.5;
  o.preference_group = 4;
  o.seed = 3;
  // A group's favourite has weight ~0.8 / 2.36 + 0.2 / 64 ~ 0.34 per draw against ~0.12 for its
  // second: in 64 tokens x top-4 it leads every sequence of its group with near certainty.
  // 16 groups' favourites are uniform over 64 experts: ~14.3 distinct expected.
  const auto [agree, distinct] = group_top_experts(synthetic_trace(o), 4);
  EXPECT_GE(agree, 0.9);
  EXPECT_GE(distinct, 10u);
  // Without preference the routing is uniform (256 assignments over 64 experts per sequence):
  // four sequences agreeing on their most used expert is rare.
  o.preference = 0;
  EXPECT_LT(group_top_experts(synthetic_trace(o), 4).first, 0.3);
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
  o.layer_skew = {1.0};  // 4 layers
  EXPECT_THAT([&] { synthetic_trace(o); },
              ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr("layer_skew")));
  o = {};
  o.preference = 1.5;
  EXPECT_THAT([&] { synthetic_trace(o); },
              ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr("preference")));
  o = {};
  o.preference_group = 0;
  EXPECT_THAT([&] { synthetic_trace(o); }, ::testing::ThrowsMessage<std::invalid_argument>(
                                               ::testing::HasSubstr("preference_group")));
  o = {};
  o.n_experts = 70000;
  EXPECT_THAT([&] { synthetic_trace(o); },
              ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr("experts")));
}

}  // namespace
}  // namespace fm
