// Next-token sampling: the truncated distributions are exactly the documented
// sets, and draws follow their distribution (chi-square).
#include "model/sampling.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "engine/config.h"
#include "engine/error.h"
#include "engine/rng.h"

namespace fm {
namespace {

const std::vector<double> kLogits = {0.5, 2.0, -1.0, 1.0, 2.0, 0.0, -3.0, 1.5};

std::vector<double> softmax(const std::vector<double>& z, double temperature) {
  double m = *std::max_element(z.begin(), z.end()), s = 0;
  std::vector<double> p(z.size());
  for (size_t i = 0; i < z.size(); ++i) s += p[i] = std::exp((z[i] - m) / temperature);
  for (double& x : p) x /= s;
  return p;
}

std::map<int32_t, double> as_map(const std::vector<std::pair<int32_t, double>>& d) {
  return {d.begin(), d.end()};
}

TEST(Sampling, FullDistributionIsTheTemperedSoftmax) {
  SamplingConfig cfg;
  cfg.temperature = 0.7;
  const auto d = as_map(sampling_distribution(kLogits.data(), 8, cfg));
  const std::vector<double> p = softmax(kLogits, 0.7);
  ASSERT_EQ(d.size(), 8u);
  for (int32_t v = 0; v < 8; ++v) EXPECT_NEAR(d.at(v), p[v], 1e-15);
}

TEST(Sampling, TopKKeepsTheKMostLikelyTiesToTheLowerId) {
  SamplingConfig cfg;
  cfg.top_k = 3;  // logits 2.0 (ids 1 and 4, tied) and 1.5 (id 7)
  const auto d = sampling_distribution(kLogits.data(), 8, cfg);
  ASSERT_EQ(d.size(), 3u);
  EXPECT_EQ(d[0].first, 1);
  EXPECT_EQ(d[1].first, 4);
  EXPECT_EQ(d[2].first, 7);
  const std::vector<double> p = softmax(kLogits, 1.0);
  const double mass = p[1] + p[4] + p[7];
  EXPECT_NEAR(d[2].second, p[7] / mass, 1e-15);
  cfg.top_k = 1;  // tie: the lower id
  EXPECT_EQ(sampling_distribution(kLogits.data(), 8, cfg)[0].first, 1);
}

TEST(Sampling, TopPKeepsTheSmallestPrefixReachingP) {
  const std::vector<double> p = softmax(kLogits, 1.0);
  // Descending order: 1, 4, 7, 3, 0, 5, 2, 6.
  const std::vector<int32_t> order = {1, 4, 7, 3, 0, 5, 2, 6};
  double cum = 0;
  for (size_t n = 1; n <= order.size(); ++n) {
    cum += p[order[n - 1]];
    // Just below the mass of the first n entries: exactly n are kept.
    SamplingConfig cfg;
    cfg.top_p = std::min(1.0, cum - 1e-9);
    const auto d = sampling_distribution(kLogits.data(), 8, cfg);
    ASSERT_EQ(d.size(), n) << "top_p " << cfg.top_p;
    for (size_t i = 0; i < n; ++i) {
      EXPECT_EQ(d[i].first, order[i]);
      EXPECT_NEAR(d[i].second, p[order[i]] / cum, 1e-9);
    }
  }
}

TEST(Sampling, TopKThenTopP) {
  SamplingConfig cfg;
  cfg.top_k = 4;
  cfg.top_p = 0.5;
  const std::vector<double> p = softmax(kLogits, 1.0);
  const double mass4 = p[1] + p[4] + p[7] + p[3];
  // Within the top 4, id 1 alone has p[1]/mass4 < 0.5, ids 1 + 4 exceed it.
  ASSERT_LT(p[1] / mass4, 0.5);
  const auto d = sampling_distribution(kLogits.data(), 8, cfg);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_NEAR(d[0].second, 0.5, 1e-12);
}

TEST(Sampling, GreedyIsThePointMassAtTheArgmax) {
  SamplingConfig cfg;
  cfg.temperature = 0.0;
  const SampledToken t = sample_token(kLogits.data(), 8, cfg, 0.99);
  EXPECT_EQ(t.id, 1);
  EXPECT_EQ(t.logp, 0.0);
  EXPECT_NEAR(t.model_logp, std::log(softmax(kLogits, 1.0)[1]), 1e-12);
}

// Chi-square goodness of fit of 40k draws against the sampling distribution, for a
// few configurations. 7 degrees of freedom at most: the 0.999 quantile is 24.3, so a
// correct sampler fails this with probability < 1e-3 per case (and the seed is fixed).
TEST(Sampling, DrawsFollowTheDistributionChiSquare) {
  const std::vector<SamplingConfig> cases = {
      {1.0, 1.0, 0}, {0.6, 1.0, 0}, {1.3, 0.8, 0}, {1.0, 1.0, 5}, {2.0, 0.9, 6}};
  Rng rng(2024, 1);
  const int draws = 40000;
  for (const SamplingConfig& cfg : cases) {
    const auto d = sampling_distribution(kLogits.data(), 8, cfg);
    std::map<int32_t, int> count;
    for (int i = 0; i < draws; ++i) {
      const SampledToken t = sample_token(kLogits.data(), 8, cfg, rng.next_double());
      ++count[t.id];
      ASSERT_NEAR(t.logp, std::log(as_map(d).at(t.id)), 1e-12);
    }
    double chi2 = 0;
    for (const auto& [id, prob] : d) {
      const double expected = prob * draws;
      chi2 += (count[id] - expected) * (count[id] - expected) / expected;
    }
    EXPECT_EQ(count.size(), d.size()) << "a token outside the kept set was drawn";
    EXPECT_LT(chi2, 24.3) << "temperature " << cfg.temperature << " top_p " << cfg.top_p
                          << " top_k " << cfg.top_k;
  }
}

TEST(Sampling, ConfigErrorsNameTheKey) {
  auto load = [](const std::string& yaml) {
    const ConfigNode n = ConfigNode::parse(yaml, "gen.yaml");
    return SamplingConfig::from_yaml(n);
  };
  using ::testing::HasSubstr;
  EXPECT_THAT([&] { load("top_p: 0\n"); },
              ::testing::ThrowsMessage<Error>(HasSubstr("gen.yaml: top_p: must be > 0")));
  EXPECT_THAT([&] { load("top_k: -2\n"); },
              ::testing::ThrowsMessage<Error>(HasSubstr("top_k: must be >= 0")));
  EXPECT_THAT([&] { load("temperature: -1\n"); },
              ::testing::ThrowsMessage<Error>(HasSubstr("temperature")));
  const SamplingConfig c = load("temperature: 0.5\ntop_p: 0.9\ntop_k: 40\n");
  EXPECT_EQ(c.temperature, 0.5);
  EXPECT_EQ(c.top_p, 0.9);
  EXPECT_EQ(c.top_k, 40);
}

TEST(Sampling, RejectsNonFiniteLogits) {
  std::vector<double> z = kLogits;
  z[3] = NAN;
  EXPECT_THROW(sampling_distribution(z.data(), 8, SamplingConfig{}), Error);
}

}  // namespace
}  // namespace fm

namespace fm {
namespace {

TEST(Sampling, VocabLimitNeverSamplesIdsAboveIt) {
  SamplingConfig cfg;
  cfg.vocab_limit = 4;  // ids 4..7 (among them the argmax pair's id 4 and id 7) are out
  const auto d = sampling_distribution(kLogits.data(), 8, cfg);
  ASSERT_EQ(d.size(), 4u);
  for (const auto& [id, p] : d) EXPECT_LT(id, 4);
  cfg.temperature = 0.0;
  const SampledToken t = sample_token(kLogits.data(), 8, cfg, 0.5);
  EXPECT_EQ(t.id, 1);
  // model_logp stays the log-prob under the model's whole vocabulary.
  EXPECT_NEAR(t.model_logp, std::log(softmax(kLogits, 1.0)[1]), 1e-12);
}

}  // namespace
}  // namespace fm
