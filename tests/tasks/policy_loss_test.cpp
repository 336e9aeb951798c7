// PPO / GRPO policy loss: hand-computed values on tiny batches, aggregation modes,
// micro-batch additivity, KL estimators, gradients vs finite differences, config errors.
#include "rl/policy_loss.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "engine/config.h"
#include "engine/error.h"

namespace fm {
namespace {

using ::testing::HasSubstr;

// Hand-computed values are exact up to double rounding of a few operations.
constexpr double kTol = 1e-12;

// Tokens with logp == old_logp (ratio 1) and the given advantages.
PolicyLossInput ratio_one(std::vector<int64_t> offsets, std::vector<uint8_t> mask,
                          std::vector<double> adv) {
  PolicyLossInput in;
  in.seq_offsets = std::move(offsets);
  in.mask = std::move(mask);
  in.advantages = std::move(adv);
  in.logp.assign(in.mask.size(), -1.0);
  in.old_logp = in.logp;
  return in;
}

LossNormalizer normalizer_of(const PolicyLossInput& in) {
  return loss_normalizer(std::span<const PolicyLossInput>(&in, 1));
}

TEST(PolicyLoss, RatioOneGivesMinusMeanAdvantage) {
  // seq0: tokens 0-1; seq1: tokens 2-4, the last one off-mask.
  // Response advantages 1, -2, 3, 0.5 -> mean 0.625, so loss = -0.625.
  const PolicyLossInput in = ratio_one({0, 2, 5}, {1, 1, 1, 1, 0}, {1, -2, 3, 0.5, 99});
  const PolicyLossResult r = policy_loss(PolicyLossConfig{}, in, normalizer_of(in));
  EXPECT_NEAR(r.loss, -0.625, kTol);
  EXPECT_NEAR(r.pg_loss, -0.625, kTol);
  EXPECT_EQ(r.pg_clipfrac, 0.0);
  EXPECT_EQ(r.pg_clipfrac_lower, 0.0);
  EXPECT_NEAR(r.ratio_mean, 1.0, kTol);
  EXPECT_NEAR(r.ratio_max, 1.0, kTol);
  EXPECT_NEAR(r.ppo_kl, 0.0, kTol);
  EXPECT_EQ(r.tokens, 4);
  // d loss / d logp = -A r / 4.
  const std::vector<double> want = {-0.25, 0.5, -0.75, -0.125, 0.0};
  ASSERT_EQ(r.dlogp.size(), 5u);
  for (size_t t = 0; t < want.size(); ++t) EXPECT_NEAR(r.dlogp[t], want[t], kTol) << t;
}

TEST(PolicyLoss, RatioOutsideClipRangeIsClippedWithZeroGradient) {
  PolicyLossInput in;
  in.seq_offsets = {0, 3};
  in.mask = {1, 1, 1};
  in.advantages = {1.0, 2.0, -1.0};
  in.old_logp = {-1.0, -1.0, -1.0};
  // r = 1.5 (> 1.2, A > 0: clipped to 1.2); r = 1; r = 0.5 (< 0.8, A < 0: clipped to 0.8).
  in.logp = {-1.0 + std::log(1.5), -1.0, -1.0 + std::log(0.5)};
  const PolicyLossResult r = policy_loss(PolicyLossConfig{}, in, normalizer_of(in));
  // pg = -1 * 1.2, -2 * 1, -(-1) * 0.8 -> (-1.2 - 2 + 0.8) / 3 = -0.8.
  EXPECT_NEAR(r.loss, -0.8, kTol);
  EXPECT_NEAR(r.pg_clipfrac, 2.0 / 3.0, kTol);
  EXPECT_EQ(r.pg_clipfrac_lower, 0.0);
  EXPECT_EQ(r.dlogp[0], 0.0);
  EXPECT_NEAR(r.dlogp[1], -2.0 / 3.0, kTol);  // -A r / 3
  EXPECT_EQ(r.dlogp[2], 0.0);
  EXPECT_NEAR(r.ratio_mean, (1.5 + 1.0 + 0.5) / 3.0, kTol);
  EXPECT_NEAR(r.ratio_max, 1.5, kTol);
  // ppo_kl = mean(old - new) = -(log 1.5 + log 0.5) / 3.
  EXPECT_NEAR(r.ppo_kl, -(std::log(1.5) + std::log(0.5)) / 3.0, kTol);
}

TEST(PolicyLoss, DualClipBoundsNegativeAdvantageLoss) {
  PolicyLossInput in;
  in.seq_offsets = {0, 2};
  in.mask = {1, 1};
  in.advantages = {-1.0, -1.0};
  in.old_logp = {0.0, 0.0};
  in.logp = {2.0, std::log(2.0)};  // r = e^2 = 7.389056..., r = 2
  PolicyLossConfig c;              // clip_ratio_c = 3
  const PolicyLossResult r = policy_loss(c, in, normalizer_of(in));
  // Token 0: pg1 = 7.389, pg2 = 1.2 -> 7.389; dual clip min(7.389, 3) = 3, zero gradient.
  // Token 1: pg1 = 2, pg2 = 1.2 -> 2 (< 3: no dual clip), gradient -A r = 2.
  EXPECT_NEAR(r.loss, (3.0 + 2.0) / 2.0, kTol);
  EXPECT_EQ(r.pg_clipfrac, 0.0);
  EXPECT_NEAR(r.pg_clipfrac_lower, 0.5, kTol);
  EXPECT_EQ(r.dlogp[0], 0.0);
  EXPECT_NEAR(r.dlogp[1], 1.0, kTol);
  EXPECT_NEAR(r.ratio_max, 7.38905609893065, 1e-12);

  c.clip_ratio_c = 0.0;  // disabled: token 0 keeps 7.389 and its gradient e^2 / 2
  const PolicyLossResult off = policy_loss(c, in, normalizer_of(in));
  EXPECT_NEAR(off.loss, (7.38905609893065 + 2.0) / 2.0, 1e-12);
  EXPECT_EQ(off.pg_clipfrac_lower, 0.0);
  EXPECT_NEAR(off.dlogp[0], 7.38905609893065 / 2.0, 1e-12);
}

// seq0: 3 response tokens; seq1: a prompt token then 2 response tokens.
// With ratio 1 the per-token losses are -A = -1, -2, -3 | -4, -6.
PolicyLossInput two_sequences() {
  return ratio_one({0, 3, 6}, {1, 1, 1, 0, 1, 1}, {1, 2, 3, 100, 4, 6});
}

TEST(PolicyLoss, NormalizerCountsTokensSequencesAndLongestResponse) {
  const LossNormalizer n = normalizer_of(two_sequences());
  EXPECT_EQ(n.tokens, 5.0);
  EXPECT_EQ(n.sequences, 2.0);
  EXPECT_EQ(n.norm_length, 3.0);
}

TEST(PolicyLoss, AggregationModesOnUnequalSequences) {
  const PolicyLossInput in = two_sequences();
  const LossNormalizer n = normalizer_of(in);
  PolicyLossConfig c;
  struct Case {
    LossAggMode mode;
    double scale_factor, loss, dlogp0, dlogp4;  // dlogp = -A * w
  };
  const Case cases[] = {
      // sum -16 over 5 tokens; w = 1/5
      {LossAggMode::token_mean, 0, -16.0 / 5.0, -1.0 / 5.0, -4.0 / 5.0},
      // (mean(-1,-2,-3) + mean(-4,-6)) / 2 = (-2 - 5) / 2; w = 1/(n_s * 2)
      {LossAggMode::seq_mean_token_mean, 0, -3.5, -1.0 / 6.0, -4.0 / 4.0},
      // (-6 - 10) / 2; w = 1/2
      {LossAggMode::seq_mean_token_sum, 0, -8.0, -0.5, -2.0},
      // (-6 - 10) / (2 * 3); w = 1/6
      {LossAggMode::seq_mean_token_sum_norm, 0, -16.0 / 6.0, -1.0 / 6.0, -4.0 / 6.0},
      // loss_scale_factor 4 replaces the longest response: -16 / (2 * 4); w = 1/8
      {LossAggMode::seq_mean_token_sum_norm, 4, -2.0, -1.0 / 8.0, -4.0 / 8.0},
  };
  for (const Case& k : cases) {
    c.loss_agg_mode = k.mode;
    c.loss_scale_factor = k.scale_factor;
    const PolicyLossResult r = policy_loss(c, in, n);
    SCOPED_TRACE(int(k.mode));
    EXPECT_NEAR(r.loss, k.loss, kTol);
    EXPECT_NEAR(r.dlogp[0], k.dlogp0, kTol);
    EXPECT_NEAR(r.dlogp[4], k.dlogp4, kTol);
    EXPECT_EQ(r.dlogp[3], 0.0);          // prompt token
    EXPECT_NEAR(r.pg_loss, -3.2, kTol);  // metrics are token means in every mode
  }
}

TEST(PolicyLoss, EntropyBonusValueAndGradient) {
  PolicyLossInput in = ratio_one({0, 2}, {1, 1}, {0.0, 0.0});
  in.entropy = {2.0, 4.0};
  PolicyLossConfig c;
  c.entropy_coeff = 0.01;
  const PolicyLossResult r = policy_loss(c, in, normalizer_of(in));
  EXPECT_NEAR(r.loss, -0.01 * 3.0, kTol);  // -coef * mean entropy
  EXPECT_NEAR(r.entropy, 3.0, kTol);
  EXPECT_NEAR(r.dentropy[0], -0.005, kTol);  // -coef / tokens
  EXPECT_NEAR(r.dentropy[1], -0.005, kTol);
}

TEST(PolicyLoss, KlEstimatorValuesAndGradients) {
  // logp = -1, ref = -1.5: d = logp - ref = 0.5, x = ref - logp = -0.5, e^-0.5 =
  // 0.6065306597126334.
  EXPECT_NEAR(kl_penalty(KlEstimator::k1, -1.0, -1.5), 0.5, kTol);
  EXPECT_NEAR(kl_penalty_grad(KlEstimator::k1, -1.0, -1.5), 1.0, kTol);
  EXPECT_NEAR(kl_penalty(KlEstimator::k2, -1.0, -1.5), 0.125, kTol);  // 0.5 d^2
  EXPECT_NEAR(kl_penalty_grad(KlEstimator::k2, -1.0, -1.5), 0.5, kTol);
  // k3 = e^x - x - 1 = 0.6065306597 + 0.5 - 1; grad = 1 - e^x.
  EXPECT_NEAR(kl_penalty(KlEstimator::k3, -1.0, -1.5), 0.1065306597126334, kTol);
  EXPECT_NEAR(kl_penalty_grad(KlEstimator::k3, -1.0, -1.5), 0.3934693402873666, kTol);
  // k3 is clamped to 10 (x = -20 after clamping gives 19; x = 30 gives e^20): zero gradient.
  EXPECT_EQ(kl_penalty(KlEstimator::k3, 0.0, -30.0), 10.0);
  EXPECT_EQ(kl_penalty_grad(KlEstimator::k3, 0.0, -30.0), 0.0);
  EXPECT_EQ(kl_penalty(KlEstimator::k3, -30.0, 0.0), 10.0);
  EXPECT_EQ(kl_penalty_grad(KlEstimator::k3, -30.0, 0.0), 0.0);

  // Inside the loss: A = 0, ratio 1, coef 0.1 -> loss = 0.1 * k, dlogp = 0.1 * grad.
  PolicyLossInput in = ratio_one({0, 1}, {1}, {0.0});
  in.ref_logp = {-1.5};
  PolicyLossConfig c;
  c.use_kl_loss = true;
  c.kl_loss_coef = 0.1;
  const double want_kl[] = {0.5, 0.125, 0.1065306597126334};
  const double want_grad[] = {1.0, 0.5, 0.3934693402873666};
  const KlEstimator estimators[] = {KlEstimator::k1, KlEstimator::k2, KlEstimator::k3};
  for (int i = 0; i < 3; ++i) {
    c.kl_loss_type = estimators[i];
    const PolicyLossResult r = policy_loss(c, in, normalizer_of(in));
    EXPECT_NEAR(r.loss, 0.1 * want_kl[i], kTol) << i;
    EXPECT_NEAR(r.kl_loss, want_kl[i], kTol) << i;
    EXPECT_NEAR(r.dlogp[0], 0.1 * want_grad[i], kTol) << i;
  }
}

// Random packed batch: ratios kept >= 0.05 away from the clip edges 0.8, 1.2 and the dual
// clip edge 3, so finite differences never cross a branch.
PolicyLossInput random_batch(std::mt19937& rng, int sequences) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  PolicyLossInput in;
  in.seq_offsets = {0};
  for (int s = 0; s < sequences; ++s) {
    const int prompt = 1 + int(u(rng) * 3), response = 1 + int(u(rng) * 6);
    for (int t = 0; t < prompt + response; ++t) {
      const bool resp = t >= prompt;
      in.mask.push_back(resp ? 1 : 0);
      const double ranges[4][2] = {{0.3, 0.75}, {0.85, 1.15}, {1.25, 2.9}, {3.1, 5.0}};
      const auto& rg = ranges[int(u(rng) * 4)];
      const double ratio = rg[0] + (rg[1] - rg[0]) * u(rng);
      const double old = -0.2 - 3.0 * u(rng);
      in.old_logp.push_back(old);
      in.logp.push_back(old + std::log(ratio));
      in.advantages.push_back(u(rng) < 0.5 ? -0.2 - 2 * u(rng) : 0.2 + 2 * u(rng));
      in.ref_logp.push_back(old - 1.0 + 2.0 * u(rng));
      in.entropy.push_back(3.0 * u(rng));
    }
    in.seq_offsets.push_back(int64_t(in.mask.size()));
  }
  return in;
}

constexpr LossAggMode kModes[] = {LossAggMode::token_mean, LossAggMode::seq_mean_token_mean,
                                  LossAggMode::seq_mean_token_sum,
                                  LossAggMode::seq_mean_token_sum_norm};

TEST(PolicyLoss, GradientsMatchFiniteDifferences) {
  std::mt19937 rng(1234);
  const PolicyLossInput in = random_batch(rng, 4);
  const LossNormalizer n = normalizer_of(in);
  const KlEstimator estimators[] = {KlEstimator::k1, KlEstimator::k2, KlEstimator::k3};
  // Central differences with h = 1e-6: truncation ~h^2 * |f'''| ~ 1e-11, rounding
  // ~1e-16 * |loss| / h ~ 1e-10; 1e-7 absolute leaves a wide margin.
  const double h = 1e-6, tol = 1e-7;
  for (LossAggMode mode : kModes) {
    for (KlEstimator est : estimators) {
      PolicyLossConfig c;
      c.loss_agg_mode = mode;
      c.use_kl_loss = true;
      c.kl_loss_coef = 0.3;
      c.kl_loss_type = est;
      c.entropy_coeff = 0.05;
      const PolicyLossResult r = policy_loss(c, in, n);
      const bool clipped_some = r.pg_clipfrac > 0 && r.pg_clipfrac_lower > 0;
      EXPECT_TRUE(clipped_some) << "the batch should exercise both clips";
      for (size_t t = 0; t < in.mask.size(); ++t) {
        PolicyLossInput p = in, m = in;
        p.logp[t] += h;
        m.logp[t] -= h;
        const double fd = (policy_loss(c, p, n).loss - policy_loss(c, m, n).loss) / (2 * h);
        EXPECT_NEAR(r.dlogp[t], fd, tol) << "logp token " << t << " mode " << int(mode);
        p = in;
        m = in;
        p.entropy[t] += h;
        m.entropy[t] -= h;
        const double fde = (policy_loss(c, p, n).loss - policy_loss(c, m, n).loss) / (2 * h);
        EXPECT_NEAR(r.dentropy[t], fde, tol) << "entropy token " << t << " mode " << int(mode);
        if (!in.mask[t]) {
          EXPECT_EQ(r.dlogp[t], 0.0);
          EXPECT_EQ(r.dentropy[t], 0.0);
        }
      }
    }
  }
}

// Sequences [s0, s1) of a packed batch as a micro-batch of their own.
PolicyLossInput slice(const PolicyLossInput& in, size_t s0, size_t s1) {
  PolicyLossInput out;
  const int64_t b = in.seq_offsets[s0], e = in.seq_offsets[s1];
  for (size_t s = s0; s <= s1; ++s) out.seq_offsets.push_back(in.seq_offsets[s] - b);
  auto cut = [&](const auto& v) { return std::decay_t<decltype(v)>(v.begin() + b, v.begin() + e); };
  out.mask = cut(in.mask);
  out.logp = cut(in.logp);
  out.old_logp = cut(in.old_logp);
  out.advantages = cut(in.advantages);
  out.ref_logp = cut(in.ref_logp);
  out.entropy = cut(in.entropy);
  return out;
}

TEST(PolicyLoss, MicroBatchLossesSumToMiniBatchLoss) {
  std::mt19937 rng(99);
  const PolicyLossInput whole = random_batch(rng, 5);
  const std::vector<PolicyLossInput> parts = {slice(whole, 0, 2), slice(whole, 2, 5)};
  const LossNormalizer n = loss_normalizer(parts);
  const LossNormalizer nw = normalizer_of(whole);
  EXPECT_EQ(n.tokens, nw.tokens);
  EXPECT_EQ(n.sequences, 5.0);
  EXPECT_EQ(n.norm_length, nw.norm_length);
  for (LossAggMode mode : kModes) {
    PolicyLossConfig c;
    c.loss_agg_mode = mode;
    c.use_kl_loss = true;
    c.entropy_coeff = 0.01;
    const PolicyLossResult all = policy_loss(c, whole, n);
    const PolicyLossResult a = policy_loss(c, parts[0], n), b = policy_loss(c, parts[1], n);
    // A sum of ~20 terms in a different order: 1e-12 absolute.
    EXPECT_NEAR(a.loss + b.loss, all.loss, 1e-12) << int(mode);
    EXPECT_EQ(a.tokens + b.tokens, all.tokens);
    // Gradients are per token and identical.
    for (size_t t = 0; t < a.dlogp.size(); ++t) EXPECT_NEAR(a.dlogp[t], all.dlogp[t], 1e-15);
    const size_t off = a.dlogp.size();
    for (size_t t = 0; t < b.dlogp.size(); ++t) EXPECT_NEAR(b.dlogp[t], all.dlogp[off + t], 1e-15);
  }
}

TEST(PolicyLoss, InputErrorsNameTheField) {
  auto error_of = [](const PolicyLossConfig& c, const PolicyLossInput& in,
                     const LossNormalizer& n) -> std::string {
    try {
      policy_loss(c, in, n);
    } catch (const Error& e) {
      return e.what();
    }
    return "accepted";
  };
  const PolicyLossInput good = two_sequences();
  const LossNormalizer n = normalizer_of(good);
  PolicyLossInput bad = good;
  bad.logp.pop_back();
  EXPECT_THAT(error_of({}, bad, n), HasSubstr("logp has 5 entries, expected 6"));
  PolicyLossConfig kl;
  kl.use_kl_loss = true;
  EXPECT_THAT(error_of(kl, good, n), HasSubstr("ref_logp"));
  PolicyLossConfig ent;
  ent.entropy_coeff = 0.1;
  EXPECT_THAT(error_of(ent, good, n), HasSubstr("entropy"));
  bad = good;
  bad.seq_offsets = {0, 3, 5};
  EXPECT_THAT(error_of({}, bad, n), HasSubstr("seq_offsets"));
  bad = good;
  bad.mask[0] = 2;
  EXPECT_THAT(error_of({}, bad, n), HasSubstr("mask[0]"));
  EXPECT_THAT(error_of({}, good, LossNormalizer{}), HasSubstr("normalizer.tokens"));
  PolicyLossConfig seq;
  seq.loss_agg_mode = LossAggMode::seq_mean_token_sum_norm;
  EXPECT_THAT(error_of(seq, good, {5, 2, 0}), HasSubstr("normalizer.norm_length"));
}

PolicyLossConfig parse(const std::string& yaml) {
  const ConfigNode node = ConfigNode::parse(yaml, "actor.yaml");
  PolicyLossConfig c = PolicyLossConfig::from_yaml(node);
  node.finish();
  return c;
}

std::string config_error(const std::string& yaml) {
  try {
    parse(yaml);
  } catch (const Error& e) {
    return e.what();
  }
  return "accepted: " + yaml;
}

TEST(PolicyLoss, ConfigReadsVerlKeys) {
  const PolicyLossConfig d = parse("{}");
  EXPECT_EQ(d.clip_ratio_low, 0.2);
  EXPECT_EQ(d.clip_ratio_high, 0.2);
  EXPECT_EQ(d.clip_ratio_c, 3.0);
  EXPECT_EQ(d.kl_loss_type, KlEstimator::k3);
  EXPECT_EQ(d.loss_agg_mode, LossAggMode::token_mean);

  const PolicyLossConfig c = parse(
      "clip_ratio: 0.3\nclip_ratio_high: 0.28\nclip_ratio_c: 10.0\nuse_kl_loss: true\n"
      "kl_loss_coef: 0.01\nkl_loss_type: mse\nentropy_coeff: 0.001\n"
      "loss_agg_mode: seq-mean-token-sum-norm\nloss_scale_factor: 4096\n");
  EXPECT_EQ(c.clip_ratio_low, 0.3);
  EXPECT_EQ(c.clip_ratio_high, 0.28);
  EXPECT_EQ(c.clip_ratio_c, 10.0);
  EXPECT_TRUE(c.use_kl_loss);
  EXPECT_EQ(c.kl_loss_coef, 0.01);
  EXPECT_EQ(c.kl_loss_type, KlEstimator::k2);
  EXPECT_EQ(c.entropy_coeff, 0.001);
  EXPECT_EQ(c.loss_agg_mode, LossAggMode::seq_mean_token_sum_norm);
  EXPECT_EQ(c.loss_scale_factor, 4096.0);
  EXPECT_EQ(parse("kl_loss_type: kl").kl_loss_type, KlEstimator::k1);
  EXPECT_EQ(parse("kl_loss_type: k3").kl_loss_type, KlEstimator::k3);
  EXPECT_EQ(parse("loss_agg_mode: seq-mean-token-mean").loss_agg_mode,
            LossAggMode::seq_mean_token_mean);
  EXPECT_EQ(parse("clip_ratio_c: 0").clip_ratio_c, 0.0);
}

TEST(PolicyLoss, ConfigErrorsNameTheKey) {
  EXPECT_THAT(config_error("loss_agg_mode: foo"), HasSubstr("loss_agg_mode"));
  EXPECT_THAT(config_error("loss_agg_mode: foo"), HasSubstr("foo"));
  EXPECT_THAT(config_error("clip_ratio_c: 0.5"), HasSubstr("clip_ratio_c: must be > 1"));
  EXPECT_THAT(config_error("kl_loss_type: abs"), HasSubstr("kl_loss_type"));
  EXPECT_THAT(config_error("clip_ratio_low: 1.5"), HasSubstr("clip_ratio_low"));
  EXPECT_THAT(config_error("kl_loss_coef: -1"), HasSubstr("kl_loss_coef"));
  EXPECT_THAT(config_error("clip_ratio_hgih: 0.3"), HasSubstr("clip_ratio_hgih"));
}

}  // namespace
}  // namespace fm
