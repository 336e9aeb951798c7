// The router-balance study: every method measured by the same code (methods that cannot
// change routing give bit-identical metrics), the metrics recomputed from the held-out load
// and routes by hand, the EP interaction against a direct count, and the config errors.
#include "rl/router_study.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "engine/config.h"
#include "engine/files.h"
#include "model/router_balance.h"
#include "support/emulated_device.h"
#include "support/run_configs.h"
#include "support/temp_dir.h"

namespace fm {
namespace {

using ::testing::HasSubstr;

class RouterStudyTest : public testing::TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    write_file_atomic(file("text.txt"), synthetic_corpus(2000, 4));
    run_ = testing::text_run(6, "    method: none", file("text.txt"), file("run"));
    corpus_ = load_text_corpus(run_);
    backend_ = make_cpu_backend();
  }
  RouterStudyResult run(const std::string& name, const std::string& balance_yaml) {
    const RouterBalanceConfig b =
        RouterBalanceConfig::from_yaml(ConfigNode::parse(balance_yaml, "<method>"));
    return run_router_method(run_, {name, b}, corpus_, interaction_, *backend_);
  }
  LmRunConfig run_;
  std::shared_ptr<const TextCorpus> corpus_;
  std::unique_ptr<Backend> backend_;
  RouterStudyInteraction interaction_{
      .nodes = 2, .gpus_per_node = 4, .replica_slots = 1, .micro_batch = 2, .micro_steps = 2};
};

void expect_same_metrics(const RouterStudyResult& a, const RouterStudyResult& b) {
  EXPECT_EQ(a.step_max_vio, b.step_max_vio);
  EXPECT_EQ(a.step_lm_loss, b.step_lm_loss);
  EXPECT_EQ(a.final_eval.loss, b.final_eval.loss);
  EXPECT_EQ(a.final_eval.load, b.final_eval.load);
  EXPECT_EQ(a.final_eval.routes, b.final_eval.routes);
  EXPECT_EQ(a.max_vio_batch, b.max_vio_batch);
  EXPECT_EQ(a.max_vio_global, b.max_vio_global);
  EXPECT_EQ(a.gini, b.gini);
  EXPECT_EQ(a.ep_before.max_over_mean.mean, b.ep_before.max_over_mean.mean);
  EXPECT_EQ(a.ep_after.max_over_mean.mean, b.ep_after.max_over_mean.mean);
}

TEST_F(RouterStudyTest, MethodsThatLeaveTheRouterAloneMeasureIdentically) {
  // loss_free with u = 0 never moves its bias and phi with alpha = 0 adds a zero loss: both
  // train exactly like `none`, so any difference would come from how they are measured.
  const RouterStudyResult none = run("none", "method: none");
  expect_same_metrics(none, run("lf0", "method: loss_free\nbias_rate: 0"));
  expect_same_metrics(none, run("phi0", "method: phi\nalpha: 0\npotential: l2"));
  // And a method that does act is measured differently.
  const RouterStudyResult sw = run("sw", "method: switch_aux\nalpha: 0.5");
  EXPECT_NE(sw.final_eval.load, none.final_eval.load);
}

TEST_F(RouterStudyTest, MetricsFollowFromTheHeldOutLoadAndRoutes) {
  const RouterStudyResult r = run("phi", "method: phi\nalpha: 0.05");
  const ModelConfig& mc = run_.model;
  ASSERT_EQ(r.step_max_vio.size(), 6u);
  double mean_step = 0;
  for (double v : r.step_max_vio) mean_step += v / 6;
  EXPECT_DOUBLE_EQ(r.max_vio_batch, mean_step);
  EXPECT_EQ(r.final_eval.tokens, 1024);
  EXPECT_EQ(r.final_eval.routes.tokens(), 1024);
  ASSERT_EQ(r.final_eval.load.size(), static_cast<size_t>(mc.n_moe_layers()));
  double vio = 0, g = 0;
  for (int64_t l = 0; l < mc.n_moe_layers(); ++l) {
    const auto& load = r.final_eval.load[static_cast<size_t>(l)];
    EXPECT_EQ(load, expert_load(r.final_eval.routes, l, 0, 1024));
    int64_t total = 0;
    for (int64_t x : load) total += x;
    EXPECT_EQ(total, 1024 * mc.top_k);
    vio += max_violation(load) / static_cast<double>(mc.n_moe_layers());
    g += gini(load) / static_cast<double>(mc.n_moe_layers());
  }
  EXPECT_NEAR(r.max_vio_global, vio, 1e-12);
  EXPECT_NEAR(r.gini, g, 1e-12);
  ASSERT_EQ(r.evals.size(), 1u);  // eval_every 0: the final evaluation only
  EXPECT_EQ(r.evals.back().loss, r.final_eval.loss);

  // The interaction: 64 held-out sequences of 16 tokens, micro-steps of W x mb = 16
  // sequences, 2 per step: 4 micro-steps x 2 layers = 8 plans. With one expert per rank,
  // static EP's max/mean is 1 + MaxVio of the micro-step's expert load.
  EXPECT_EQ(r.ep_before.max_over_mean.count, 8);
  EXPECT_EQ(r.ep_after.max_over_mean.count, 8);
  double worst = 0, mean = 0;
  for (int64_t m = 0; m < 4; ++m)
    for (int64_t l = 0; l < mc.n_moe_layers(); ++l) {
      const double x =
          1 + max_violation(expert_load(r.final_eval.routes, l, m * 256, (m + 1) * 256));
      worst = std::max(worst, x);
      mean += x / 8;
    }
  EXPECT_NEAR(r.ep_before.max_over_mean.max, worst, 1e-12);
  EXPECT_NEAR(r.ep_before.max_over_mean.mean, mean, 1e-12);
  EXPECT_LE(r.ep_after.max_over_mean.mean, r.ep_before.max_over_mean.mean);
  EXPECT_GE(r.ep_after.ratio_to_bound.mean, 1.0 - 1e-12);
}

TEST_F(RouterStudyTest, ADeviceBackendMeasuresTheSameBits) {
  // The GPU-sized study runs on `--backend cuda`: on a device backend that computes exactly
  // like the CPU (tests/support/emulated_device.h) every metric must repeat bit for bit, so
  // training, evaluation and the interaction keep nothing on the host by mistake.
  const RouterBalanceConfig phi =
      RouterBalanceConfig::from_yaml(ConfigNode::parse("method: phi\nalpha: 0.05", "<method>"));
  testing::EmulatedDevice device;
  const RouterStudyResult on_device =
      run_router_method(run_, {"phi", phi}, corpus_, interaction_, device);
  expect_same_metrics(run("phi", "method: phi\nalpha: 0.05"), on_device);
}

TEST_F(RouterStudyTest, ConfigErrorsNameTheKey) {
  write_file_atomic(file("run.yaml"),
                    testing::text_run_yaml(4, "    method: none", file("text.txt"), file("r")));
  auto parse = [&](const std::string& extra) {
    return RouterStudyConfig::parse("run: " + file("run.yaml") +
                                        "\nsteps: 3\nmethods:\n  none: {method: none}\n"
                                        "  phi: {method: phi, eta: 0.7}\n" +
                                        extra,
                                    "study.yaml");
  };
  const RouterStudyConfig ok = parse("interaction: {gpus_per_node: 4, micro_steps: 2}");
  ASSERT_EQ(ok.methods.size(), 2u);
  EXPECT_EQ(ok.methods[1].name, "phi");
  EXPECT_EQ(ok.methods[1].balance.method, BalanceMethod::phi);
  EXPECT_EQ(ok.methods[1].balance.eta, 0.7);
  EXPECT_EQ(ok.run.train.steps, 3);
  EXPECT_EQ(ok.run.optimizer.total_steps, 3);
  auto fails = [&](const std::string& extra, const std::string& what) {
    EXPECT_THAT([&] { parse(extra); }, ::testing::ThrowsMessage<std::exception>(HasSubstr(what)))
        << extra;
  };
  fails("interaction: {gpus_per_node: 3}", "study.yaml: interaction.gpus_per_node: W = 3");
  fails("interaction: {gpus_per_node: 8, micro_batch: 4, micro_steps: 4}",
        "interaction.micro_steps: one simulated RL step needs");
  fails("interaction: {nodes: 0}", "interaction.nodes");
  fails("extra: 1", "study.yaml: extra: unknown key");
  EXPECT_THAT(
      [&] {
        RouterStudyConfig::parse("run: " + file("run.yaml") + "\nmethods:\n  x: {method: phy}\n",
                                 "s.yaml");
      },
      ::testing::ThrowsMessage<std::exception>(HasSubstr("s.yaml: methods.x.method")));
  EXPECT_THAT(
      [&] { RouterStudyConfig::parse("run: train/synthetic_tiny\nmethods: {}\n", "s.yaml"); },
      ::testing::ThrowsMessage<std::exception>(HasSubstr("s.yaml: run: ")));
}

}  // namespace
}  // namespace fm
