// The RL loop: replay makes the first update's ratio exactly 1, a short GRPO run
// raises the reward on a learnable task, a resumed run repeats the uninterrupted
// one, and bad configs are named.
#include "rl/rl_trainer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <csignal>

#include "engine/error.h"
#include "model/checkpoint.h"
#include "support/run_configs.h"
#include "support/temp_dir.h"

namespace fm {
namespace {

// GRPO on the count task from random weights (support/run_configs.h).
std::string rl_yaml(int64_t steps, const std::string& actor_extra = "") {
  return testing::count_rl_yaml(steps, "  adv_estimator: grpo\n", actor_extra);
}

// Metrics minus the wall-clock fields.
nlohmann::json comparable(const RlStepMetrics& m) {
  nlohmann::json j = rl_metrics_json(m);
  j.erase("timing_s");
  j.erase("tokens_per_second");
  return j;
}

TEST(RlTrainer, FirstUpdateRatioIsExactlyOneAndRewardRises) {
  auto backend = make_cpu_backend();
  RlTrainer t(RlRunConfig::parse(rl_yaml(100), "<rl>"), *backend);
  double early = 0, late = 0;
  for (int s = 0; s < 100; ++s) {
    const RlStepMetrics m = t.step();
    // Old log-probs were recomputed with replay by the same weights: exactly ratio 1.
    ASSERT_EQ(m.first_ratio_max_dev, 0.0) << "step " << m.step;
    EXPECT_LT(m.logprob_gap, 1e-4);  // sampler vs trainer, fp32
    EXPECT_EQ(m.skipped, 0);
    if (s < 5) early += m.reward_mean / 5;
    if (s >= 95) late += m.reward_mean / 5;
  }
  std::printf("count task reward: first 5 steps %.3f, last 5 steps %.3f\n", early, late);
  EXPECT_GT(late, early + 0.2);
}

// Mixed precision (trainer.precision: bf16): recompute and update replay the same bf16
// weights, so the first ratio is still exactly 1; the sampler (KV-cached) and the trainer
// (full forward) both compute in bf16, so their log-probs agree to bf16 rounding.
TEST(RlTrainer, Bf16MixedPrecisionKeepsTheExactFirstRatio) {
  auto backend = make_cpu_backend();
  std::string y = rl_yaml(3);
  y.replace(y.find("trainer:\n"), 9, "trainer:\n  precision: bf16\n");
  RlTrainer t(RlRunConfig::parse(y, "<rl bf16>"), *backend);
  EXPECT_EQ(t.policy().compute_dtype(), DType::bf16);
  for (int s = 0; s < 3; ++s) {
    const RlStepMetrics m = t.step();
    ASSERT_EQ(m.first_ratio_max_dev, 0.0) << "step " << m.step;
    EXPECT_LT(m.logprob_gap, 0.1) << "step " << m.step;
    EXPECT_GT(m.logprob_gap, 0.0) << "the sampler and trainer computed in f32";
    EXPECT_EQ(m.skipped, 0);
    EXPECT_TRUE(std::isfinite(m.pg_loss));
  }
}

class RlFiles : public testing::TempDirTest {};

TEST_F(RlFiles, ResumeRepeatsTheUninterruptedRun) {
  auto backend = make_cpu_backend();
  // A KL loss so the reference policy (restored from init weights) matters too.
  const RlRunConfig cfg =
      RlRunConfig::parse(rl_yaml(4, "  use_kl_loss: true\n  kl_loss_coef: 0.01\n"), "<rl>");
  RlTrainer init(cfg, *backend);
  init.policy().init_weights(11);
  save_weights(file("init"), init.policy());

  RlTrainer straight(cfg, *backend);
  straight.load_initial_weights(file("init"));
  std::vector<nlohmann::json> want;
  for (int s = 0; s < 4; ++s) want.push_back(comparable(straight.step()));

  RlTrainer first(cfg, *backend);
  first.load_initial_weights(file("init"));
  for (int s = 0; s < 2; ++s) EXPECT_EQ(comparable(first.step()), want[s]);
  first.save(file("ckpt"));
  RlTrainer resumed(cfg, *backend);
  resumed.resume(file("ckpt"));
  EXPECT_EQ(resumed.steps_done(), 2);
  for (int s = 2; s < 4; ++s) EXPECT_EQ(comparable(resumed.step()), want[s]);
  EXPECT_GT(want[3]["kl"].get<double>(), 0.0);
}

TEST(RlTrainer, ConfigErrorsNameTheKey) {
  using ::testing::HasSubstr;
  auto parse = [](const std::string& y) { return RlRunConfig::parse(y, "rl.yaml"); };
  EXPECT_THAT([&] { parse(rl_yaml(1, "  ppo_mini_batch_size: 3\n")); },
              ::testing::ThrowsMessage<Error>(HasSubstr("actor.ppo_mini_batch_size")));
  EXPECT_THAT([&] { parse(rl_yaml(1, "  loss_agg_mode: tokenmean\n")); },
              ::testing::ThrowsMessage<Error>(HasSubstr("loss_agg_mode")));
  EXPECT_THAT([&] { parse(rl_yaml(1, "  ppo_epochz: 2\n")); },
              ::testing::ThrowsMessage<Error>(HasSubstr("unknown key")));
  std::string y = rl_yaml(1);
  y.replace(y.find("n: 8"), 4, "n: 0");
  EXPECT_THAT([&] { parse(y); }, ::testing::ThrowsMessage<Error>(HasSubstr("rollout.n")));
  y = rl_yaml(1);
  y.replace(y.find("adv_estimator: grpo"), 19, "adv_estimator: ppo");
  EXPECT_THAT([&] { parse(y); },
              ::testing::ThrowsMessage<Error>(HasSubstr("algorithm.adv_estimator")));
  // The balancer section: every bad value names its key.
  for (const auto& [section, key] :
       {std::pair{"balancer:\n  planner: foresite\n", "balancer.planner"},
        {"balancer:\n  replica_slots: -1\n", "balancer.replica_slots"},
        {"balancer:\n  nodes: 0\n", "balancer.nodes"},
        {"balancer:\n  ema_decay: 1.5\n", "balancer.ema_decay"},
        {"balancer:\n  transfer: nvlink\n", "balancer.transfer"},
        {"balancer:\n  planer: foresight\n", "unknown key"}}) {
    EXPECT_THAT([&] { parse(rl_yaml(1) + section); },
                ::testing::ThrowsMessage<Error>(HasSubstr(key)))
        << section;
  }
  std::string bad = rl_yaml(1);
  bad.replace(bad.find("trainer:\n"), 9, "trainer:\n  precision: fp8\n");
  EXPECT_THAT([&] { parse(bad); }, ::testing::ThrowsMessage<Error>(HasSubstr("precision")));
  std::string good = rl_yaml(1);
  good.replace(good.find("trainer:\n"), 9, "trainer:\n  precision: bf16\n  ranks: 2\n");
  good += "balancer:\n  planner: step_oracle\n  replica_slots: 1\n";
  EXPECT_NO_THROW(parse(good)) << "bf16 on 2 ranks with replica slots";
  const RlRunConfig ok =
      parse(rl_yaml(1) + "balancer:\n  planner: step_ema\n  replica_slots: 2\n  nodes: 1\n");
  EXPECT_EQ(ok.balancer.planner, "step_ema");
  EXPECT_EQ(ok.balancer.replica_slots, 2);
  EXPECT_EQ(ok.rank_count_problem(4), "");
  RlRunConfig two_nodes = ok;
  two_nodes.balancer.nodes = 3;
  EXPECT_THAT(two_nodes.rank_count_problem(4), HasSubstr("balancer.nodes 3 must divide the 4"));
}

TEST(RlTrainer, StopRequestIsSeenByTheLoop) {
  EXPECT_FALSE(stop_requested());
  install_stop_on_sigint();
  std::raise(SIGINT);  // the handler only sets the flag
  EXPECT_TRUE(stop_requested());
}

}  // namespace
}  // namespace fm
