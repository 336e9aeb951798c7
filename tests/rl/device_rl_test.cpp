// RL steps with the models on a device backend: the emulated device
// (support/emulated_device.h) holds policy, reference, critic and optimizer state in device
// memory and runs the CPU reference ops, so a step that reads or writes no device memory
// from the host (rollout, log-prob recompute, advantages, actor and critic updates,
// evaluation) reports exactly the CPU run's metrics.
#include <gtest/gtest.h>

#include <vector>

#include "rl/rl_trainer.h"
#include "rl/sft_trainer.h"
#include "support/emulated_device.h"
#include "support/run_configs.h"

namespace fm {
namespace {

// The metrics of `steps` RL steps and a held-out evaluation on backend `b`, without the
// wall-clock fields.
std::vector<nlohmann::json> run_steps(Backend& b, const RlRunConfig& cfg, int steps) {
  RlTrainer t(cfg, b);
  std::vector<nlohmann::json> out;
  for (int s = 0; s < steps; ++s) {
    nlohmann::json j = rl_metrics_json(t.step());
    j.erase("timing_s");
    j.erase("tokens_per_second");
    out.push_back(std::move(j));
  }
  const TaskEvalResult e = t.evaluate();
  out.push_back({{"eval_accuracy", e.accuracy},
                 {"eval_reward", e.mean_reward},
                 {"eval_tokens", e.mean_response_tokens}});
  return out;
}

void expect_device_equals_cpu(const RlRunConfig& cfg) {
  auto cpu = make_cpu_backend();
  testing::EmulatedDevice device;
  const std::vector<nlohmann::json> want = run_steps(*cpu, cfg, 2);
  const std::vector<nlohmann::json> got = run_steps(device, cfg, 2);
  ASSERT_EQ(got.size(), want.size());
  for (size_t s = 0; s < want.size(); ++s) EXPECT_EQ(got[s], want[s]) << "entry " << s;
  EXPECT_GT(want[1]["grad_norm"].get<double>(), 0.0);
}

// GRPO with a KL loss, so the reference model runs too.
TEST(DeviceRl, GrpoStepsOnADeviceEqualTheCpuRun) {
  expect_device_equals_cpu(
      RlRunConfig::parse(testing::count_rl_yaml(2, "  adv_estimator: grpo\n",
                                                "  use_kl_loss: true\n  kl_loss_coef: 0.01\n"),
                         "<grpo count>"));
}

// PPO: the critic (value head) trains on the device too.
TEST(DeviceRl, PpoStepsWithACriticOnADeviceEqualTheCpuRun) {
  expect_device_equals_cpu(testing::ppo_count_run(2));
}

// The SFT warm start (what `foremoe sft --device cuda` and the RL job's warm start run) on a
// device: the same losses, gradient norms and held-out results as on the CPU.
TEST(DeviceRl, SftStepsOnADeviceEqualTheCpuRun) {
  const SftRunConfig cfg = SftRunConfig::parse(testing::sft_add_yaml(2), "<sft>");
  auto run = [&](Backend& b) {
    SftTrainer t(cfg, b);
    std::vector<double> out;
    for (int s = 0; s < 2; ++s) {
      const SftStepMetrics m = t.step();
      out.insert(out.end(), {m.loss, m.lm_loss, m.grad_norm});
    }
    const TaskEvalResult e = t.evaluate();
    out.insert(out.end(), {e.accuracy, e.mean_reward, e.mean_response_tokens});
    return out;
  };
  auto cpu = make_cpu_backend();
  testing::EmulatedDevice device;
  const std::vector<double> want = run(*cpu);
  EXPECT_EQ(run(device), want);
  EXPECT_GT(want[2], 0.0);
}

}  // namespace
}  // namespace fm
