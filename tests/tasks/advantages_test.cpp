// Advantage estimators against hand-computed values.
#include "rl/advantages.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "engine/config.h"
#include "engine/error.h"

namespace fm {
namespace {

AdvantageConfig with(AdvantageEstimator e) {
  AdvantageConfig c;
  c.estimator = e;
  return c;
}

// Group 7: scores 1, 0, 0, 1 (mean 0.5, unbiased std sqrt(1/3) = 0.57735);
// group 2: scores 1, 1 (mean 1, std 0); group 9: one sample.
const std::vector<double> kScores = {1, 0, 1, 0, 1, 1, 0.3};
const std::vector<int64_t> kGroups = {7, 7, 2, 7, 7, 2, 9};

TEST(Advantages, GrpoNormalisesByTheUnbiasedGroupStd) {
  const auto a = group_advantages(with(AdvantageEstimator::grpo), kScores, kGroups);
  const double s = 0.5 / (std::sqrt(1.0 / 3.0) + 1e-6);  // 0.866024...
  EXPECT_NEAR(a[0], s, 1e-12);
  EXPECT_NEAR(a[1], -s, 1e-12);
  EXPECT_NEAR(a[3], -s, 1e-12);
  EXPECT_NEAR(a[4], s, 1e-12);
  EXPECT_EQ(a[2], 0.0);  // identical scores: no signal
  EXPECT_EQ(a[5], 0.0);
  EXPECT_EQ(a[6], 0.0);  // a group of one has no baseline
  EXPECT_NEAR(s, 0.8660239, 1e-6);
}

TEST(Advantages, GrpoWithoutStdIsDrGrpo) {
  AdvantageConfig c = with(AdvantageEstimator::grpo);
  c.norm_adv_by_std_in_grpo = false;
  const auto a = group_advantages(c, kScores, kGroups);
  const auto d = group_advantages(with(AdvantageEstimator::drgrpo), kScores, kGroups);
  EXPECT_EQ(a, d);
  EXPECT_EQ(d, (std::vector<double>{0.5, -0.5, 0, -0.5, 0.5, 0, 0}));
}

TEST(Advantages, RlooSubtractsTheMeanOfTheOthers) {
  const auto a = group_advantages(with(AdvantageEstimator::rloo), kScores, kGroups);
  // Sample 0: 1 - mean(0, 0, 1) = 2/3; sample 1: 0 - mean(1, 0, 1) = -2/3.
  EXPECT_NEAR(a[0], 2.0 / 3.0, 1e-15);
  EXPECT_NEAR(a[1], -2.0 / 3.0, 1e-15);
  EXPECT_NEAR(a[4], 2.0 / 3.0, 1e-15);
  EXPECT_EQ(a[2], 0.0);
  EXPECT_EQ(a[6], 0.0);
}

TEST(Advantages, GaeMatchesTheRecursionByHand) {
  // T = 3, gamma 0.9, lambda 0.8; reward only at the end.
  const std::vector<double> r = {0, 0, 1}, v = {0.5, 0.6, 0.7};
  const GaeResult g = gae(r, v, 0.9, 0.8);
  // delta_2 = 1 - 0.7 = 0.3;  delta_1 = 0 + 0.9*0.7 - 0.6 = 0.03;  delta_0 = 0.9*0.6 - 0.5 = 0.04
  // A_2 = 0.3;  A_1 = 0.03 + 0.72*0.3 = 0.246;  A_0 = 0.04 + 0.72*0.246 = 0.21712
  EXPECT_NEAR(g.advantages[2], 0.3, 1e-12);
  EXPECT_NEAR(g.advantages[1], 0.246, 1e-12);
  EXPECT_NEAR(g.advantages[0], 0.21712, 1e-12);
  EXPECT_NEAR(g.returns[0], 0.71712, 1e-12);
  // gamma = lambda = 1: the advantage is the return-to-go minus the value.
  const GaeResult m = gae(r, v, 1.0, 1.0);
  EXPECT_NEAR(m.advantages[0], 1 - 0.5, 1e-12);
  EXPECT_NEAR(m.returns[1], 1.0, 1e-12);
}

TEST(Advantages, WhitenUsesOnlyMaskedEntries) {
  std::vector<double> x = {1, 100, 3, 5};
  whiten(x, {1, 0, 1, 1}, 0.0);
  // mean 3, population std sqrt(8/3)
  const double s = std::sqrt(8.0 / 3.0);
  EXPECT_NEAR(x[0], -2 / s, 1e-12);
  EXPECT_EQ(x[1], 100);
  EXPECT_NEAR(x[2], 0, 1e-12);
  EXPECT_NEAR(x[3], 2 / s, 1e-12);
}

TEST(Advantages, BadInputAndConfigErrors) {
  using ::testing::HasSubstr;
  EXPECT_THAT(
      [] {
        group_advantages(with(AdvantageEstimator::grpo), {1, 2}, {0});
      },
      ::testing::ThrowsMessage<Error>(HasSubstr("2 scores for 1 group ids")));
  EXPECT_THAT(
      [] {
        group_advantages(with(AdvantageEstimator::grpo), {1, NAN}, {0, 0});
      },
      ::testing::ThrowsMessage<Error>(HasSubstr("score 1 is not finite")));
  EXPECT_THROW(group_advantages(with(AdvantageEstimator::gae), {1}, {0}), Error);
  auto load = [](const std::string& y) {
    return AdvantageConfig::from_yaml(ConfigNode::parse(y, "rl.yaml"));
  };
  EXPECT_THAT([&] { load("adv_estimator: ppo\n"); },
              ::testing::ThrowsMessage<Error>(HasSubstr("rl.yaml: adv_estimator")));
  EXPECT_THAT([&] { load("gamma: 1.5\n"); }, ::testing::ThrowsMessage<Error>(HasSubstr("gamma")));
  EXPECT_EQ(load("adv_estimator: rloo\n").estimator, AdvantageEstimator::rloo);
}

}  // namespace
}  // namespace fm
