// Router-level balancing: the formulas against hand-computed values, and the
// loss-free bias's promise never to touch gate weights.
#include "model/router_balance.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "support/model_fixtures.h"

namespace fm {
namespace {

RouterBalanceConfig cfg(BalanceMethod m) {
  RouterBalanceConfig c;
  c.method = m;
  return c;
}

TEST(RouterBalance, SwitchAuxMatchesHandComputation) {
  // E = 2, K = 1, N = 4 tokens: loads (3, 1), probability sums (2.4, 1.6).
  RouterBalanceConfig c = cfg(BalanceMethod::switch_aux);
  c.alpha = 0.5;
  const LayerBalanceState s(2);
  const BalanceTerm t = balance_term(c, s, {2.4, 1.6}, {3, 1}, 4, 1);
  // f = (3/4, 1/4), P = (0.6, 0.4): L = 0.5 * 2 * (0.75 * 0.6 + 0.25 * 0.4) = 0.55
  EXPECT_NEAR(t.loss, 0.55, 1e-12);
  // dL/dprobs[t, e] = alpha * E * f_e / N
  EXPECT_NEAR(t.dprobs[0], 0.5 * 2 * 0.75 / 4, 1e-12);
  EXPECT_NEAR(t.dprobs[1], 0.5 * 2 * 0.25 / 4, 1e-12);
}

TEST(RouterBalance, GlobalAuxUsesTheWholeStepsLoad) {
  RouterBalanceConfig c = cfg(BalanceMethod::global_aux);
  c.alpha = 1.0;
  LayerBalanceState s(2);
  accumulate_step_stats(s, {1.0, 1.0}, {0, 2}, 2);  // an earlier micro-batch: all to expert 1
  const BalanceTerm t = balance_term(c, s, {1.5, 0.5}, {2, 0}, 2, 1);
  // Over the step so far f = (2/4, 2/4) although this micro-batch alone is (1, 0).
  EXPECT_NEAR(t.dprobs[0], 1.0 * 2 * 0.5 / 2, 1e-12);
  EXPECT_NEAR(t.dprobs[1], 1.0 * 2 * 0.5 / 2, 1e-12);
  EXPECT_NEAR(t.loss, 2 * (0.5 * 0.75 + 0.5 * 0.25), 1e-12);
}

TEST(RouterBalance, PhiUpdateMatchesHandComputation) {
  // E = 2, m = (0.5, 0.5), batch mean p = (0.8, 0.2), eta = 0.6 weighting the new value:
  // m' = 0.4 * m + 0.6 * p = (0.68, 0.32); q = log m' + 1; L = alpha * sum q p.
  RouterBalanceConfig c = cfg(BalanceMethod::phi);
  c.alpha = 0.1;
  c.eta = 0.6;
  LayerBalanceState s(2);
  const BalanceTerm t = balance_term(c, s, {1.6, 0.4}, {2, 0}, 2, 1);
  const double q0 = std::log(0.68) + 1, q1 = std::log(0.32) + 1;
  EXPECT_NEAR(t.loss, 0.1 * (q0 * 0.8 + q1 * 0.2), 1e-12);
  EXPECT_NEAR(t.dprobs[0], 0.1 * q0 / 2, 1e-12);
  EXPECT_NEAR(t.dprobs[1], 0.1 * q1 / 2, 1e-12);
  // The step update commits the same EMA.
  accumulate_step_stats(s, {1.6, 0.4}, {2, 0}, 2);
  end_balance_step(c, s);
  EXPECT_NEAR(s.ema[0], 0.68, 1e-12);
  EXPECT_NEAR(s.ema[1], 0.32, 1e-12);
  EXPECT_EQ(s.step_tokens, 0);
  // The "old" convention weights the old value by eta: m' = 0.6 * m + 0.4 * p.
  c.eta_weights_new = false;
  EXPECT_NEAR(phi_ema(c, {0.5, 0.5}, {0.8, 0.2})[0], 0.6 * 0.5 + 0.4 * 0.8, 1e-12);
  // l2 potential: q = m.
  EXPECT_NEAR(phi_price(PhiPotential::l2, {0.3, 0.7})[1], 0.7, 1e-15);
}

TEST(RouterBalance, PhiL2AndTheEmaOverSeveralSteps) {
  // l2 potential phi(m) = |m|^2 / 2, q = m. E = 2, eta = 0.6 (new value), alpha = 0.1.
  RouterBalanceConfig c = cfg(BalanceMethod::phi);
  c.alpha = 0.1;
  c.eta = 0.6;
  c.potential = PhiPotential::l2;
  LayerBalanceState s(2);
  // Step 1: p = (0.8, 0.2): m' = (0.68, 0.32), L = 0.1 * (0.68 * 0.8 + 0.32 * 0.2) = 0.0608.
  const BalanceTerm t1 = balance_term(c, s, {1.6, 0.4}, {2, 0}, 2, 1);
  EXPECT_NEAR(t1.loss, 0.0608, 1e-12);
  EXPECT_NEAR(t1.dprobs[0], 0.1 * 0.68 / 2, 1e-12);
  accumulate_step_stats(s, {1.6, 0.4}, {2, 0}, 2);
  end_balance_step(c, s);
  // Step 2, two micro-batches whose step mean is p = (0.3, 0.7): the EMA moves from
  // (0.68, 0.32) to 0.4 * (0.68, 0.32) + 0.6 * (0.3, 0.7) = (0.452, 0.548).
  accumulate_step_stats(s, {0.4, 1.6}, {0, 2}, 2);
  accumulate_step_stats(s, {1.1, 1.9}, {1, 2}, 3);
  end_balance_step(c, s);
  EXPECT_NEAR(s.ema[0], 0.452, 1e-12);
  EXPECT_NEAR(s.ema[1], 0.548, 1e-12);
  // Negative entropy at that m: q = (log 0.452 + 1, log 0.548 + 1).
  const std::vector<double> q = phi_price(PhiPotential::neg_entropy, s.ema);
  EXPECT_NEAR(q[0], std::log(0.452) + 1, 1e-12);
  EXPECT_NEAR(q[1], std::log(0.548) + 1, 1e-12);
}

TEST(RouterBalance, LossFreeBiasMovesAgainstTheLoad) {
  RouterBalanceConfig c = cfg(BalanceMethod::loss_free);
  c.bias_rate = 0.01;
  LayerBalanceState s(3);
  accumulate_step_stats(s, {0, 0, 0}, {6, 3, 0}, 3);  // mean 3
  end_balance_step(c, s);
  EXPECT_DOUBLE_EQ(s.bias[0], -0.01);
  EXPECT_DOUBLE_EQ(s.bias[1], 0.0);
  EXPECT_DOUBLE_EQ(s.bias[2], 0.01);
  EXPECT_TRUE(balance_term(c, s, {1, 1, 1}, {1, 1, 1}, 3, 1).dprobs.empty());  // no loss term
}

TEST(RouterBalance, GiniAndMaxVio) {
  EXPECT_NEAR(gini({5, 5, 5, 5}), 0.0, 1e-12);
  EXPECT_NEAR(gini({0, 0, 0, 8}), 0.75, 1e-12);
  EXPECT_NEAR(max_violation({6, 2, 2, 2}), 1.0, 1e-12);
}

TEST(RouterBalance, LossFreeBiasNeverChangesGateWeights) {
  const ModelConfig biased_cfg = testing::micro_config("method: loss_free\n    bias_rate: 0.01");
  const ModelConfig plain_cfg = testing::micro_config("method: none");
  auto backend = make_cpu_backend();
  MoeTransformer biased(biased_cfg, *backend), plain(plain_cfg, *backend);
  biased.init_weights(5);
  plain.init_weights(5);
  for (LayerBalanceState& s : biased.balance_state())
    s.bias = {0.0, 0.0, 0.0, 5.0};  // force expert 3
  const Batch batch = testing::random_batch(plain_cfg, {10, 6}, 4);
  const ForwardResult with_bias = biased.forward(batch, {.replay = nullptr, .training = false});
  const ForwardResult no_bias = plain.forward(batch, {.replay = nullptr, .training = false});
  // The bias changed the selection...
  for (const LayerRouterStats& s : with_bias.router) EXPECT_EQ(s.load[3], batch.size());
  EXPECT_NE(with_bias.routes, no_bias.routes);
  // ...but the gates are the router's own probabilities at those experts: the unbiased model
  // replaying the same choices computes exactly the same outputs.
  const ForwardResult replayed =
      plain.forward(batch, {.replay = &with_bias.routes, .training = false});
  EXPECT_EQ(replayed.logp, with_bias.logp);
}

}  // namespace
}  // namespace fm
