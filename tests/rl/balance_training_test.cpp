// Each router-balancing method, trained with the LM loss on the synthetic task,
// drives a deliberately skewed router towards uniform load.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include "support/run_configs.h"

namespace fm {
namespace {

// Skews every MoE router towards expert 0: all embeddings share a direction u and
// router row 0 points along it, so expert 0 tops every token (MaxVio_batch = 3 for top-2 of 8).
void skew_router(MoeTransformer& model) {
  const ModelConfig& c = model.config();
  Rng rng(99, 1);
  std::vector<float> u(static_cast<size_t>(c.hidden));
  rng.normal(u.data(), c.hidden);
  double norm = 0;
  for (float x : u) norm += x * x;
  for (float& x : u) x = static_cast<float>(x / std::sqrt(norm));
  ModelWeights& w = model.params().weights();
  float* embed = w.embed.data<float>();
  for (int64_t v = 0; v < c.vocab_size; ++v)
    for (int64_t h = 0; h < c.hidden; ++h) embed[v * c.hidden + h] += u[h];
  for (int64_t l = c.first_k_dense; l < c.n_layers; ++l) {
    float* router = w.layers[l].router.data<float>();
    for (int64_t h = 0; h < c.hidden; ++h) router[h] += 0.4f * u[h];
  }
}

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

struct BalanceRun {
  double initial_vio = 0, final_vio = 0;
};

BalanceRun train_skewed(const std::string& balance_yaml, int steps) {
  auto backend = make_cpu_backend();
  LmTrainer t(testing::tiny_run(steps, balance_yaml, "unused", 1), *backend);
  skew_router(t.model());
  BalanceRun r;
  for (int i = 0; i < steps; ++i) {
    const double vio = mean(t.step().max_vio);
    if (i < 5) r.initial_vio += vio / 5;
    if (i >= steps - 20) r.final_vio += vio / 20;
  }
  std::printf("[ balance ] %s: MaxVio_batch %.3f -> %.3f\n",
              balance_method_name(t.config().model.balance.method), r.initial_vio, r.final_vio);
  return r;
}

// Target: MaxVio_batch falls by at least 2x (from ~3, every token's top-1 on expert 0) within
// 300 steps. The coefficients are larger than production defaults so the test stays short.
constexpr int kSteps = 300;
constexpr double kFactor = 2.0;

TEST(BalanceTraining, SwitchAuxBalancesASkewedRouter) {
  const BalanceRun r = train_skewed("    method: switch_aux\n    alpha: 0.1", kSteps);
  EXPECT_GT(r.initial_vio, 2.5);
  EXPECT_LT(r.final_vio, r.initial_vio / kFactor) << "initial " << r.initial_vio;
}

TEST(BalanceTraining, GlobalAuxBalancesASkewedRouter) {
  const BalanceRun r = train_skewed("    method: global_aux\n    alpha: 0.1", kSteps);
  EXPECT_GT(r.initial_vio, 2.5);
  EXPECT_LT(r.final_vio, r.initial_vio / kFactor) << "initial " << r.initial_vio;
}

TEST(BalanceTraining, LossFreeBiasBalancesASkewedRouter) {
  const BalanceRun r = train_skewed("    method: loss_free\n    bias_rate: 0.01", kSteps);
  EXPECT_GT(r.initial_vio, 2.5);
  EXPECT_LT(r.final_vio, r.initial_vio / kFactor) << "initial " << r.initial_vio;
}

TEST(BalanceTraining, PhiBalancesASkewedRouter) {
  const BalanceRun r = train_skewed(
      "    method: phi\n    alpha: 0.1\n    eta: 0.65\n    potential: neg_entropy", kSteps);
  EXPECT_GT(r.initial_vio, 2.5);
  EXPECT_LT(r.final_vio, r.initial_vio / kFactor) << "initial " << r.initial_vio;
}

TEST(BalanceTraining, WithoutBalancingTheSkewPersists) {
  // The control: the LM loss alone does not undo the skew in the same budget, so the methods
  // above are what balanced the load.
  const BalanceRun r = train_skewed("    method: none", kSteps);
  EXPECT_GT(r.final_vio, r.initial_vio / kFactor) << "initial " << r.initial_vio;
}

}  // namespace
}  // namespace fm
