// Training on the synthetic task: the loss falls, and a resumed run continues
// bit-identically to an uninterrupted one.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <vector>

#include "support/emulated_device.h"
#include "support/run_configs.h"

namespace fm {
namespace {

// `foremoe train` / `pretrain --device cuda`: the same steps on a device (the emulated one,
// support/emulated_device.h) give the CPU run's losses and gradient norms bit for bit.
TEST(LmTraining, StepsOnADeviceEqualTheCpuRun) {
  const LmRunConfig cfg = testing::tiny_run(3, "    method: switch_aux\n    alpha: 0.01");
  auto run = [&](Backend& b) {
    LmTrainer t(cfg, b);
    std::vector<double> out;
    for (int i = 0; i < 3; ++i) {
      const LmStepMetrics m = t.step();
      out.insert(out.end(), {m.loss, m.lm_loss, m.grad_norm});
    }
    out.push_back(t.evaluate().loss);
    return out;
  };
  auto cpu = make_cpu_backend();
  testing::EmulatedDevice device;
  const std::vector<double> want = run(*cpu);
  EXPECT_EQ(run(device), want);
  EXPECT_GT(want[2], 0.0);
}

TEST(LmTraining, LossFallsOnTheSyntheticTask) {
  auto backend = make_cpu_backend();
  LmTrainer trainer(testing::tiny_run(120, "    method: switch_aux\n    alpha: 0.01"), *backend);
  double first = 0, last = 0;
  for (int i = 0; i < 120; ++i) {
    const LmStepMetrics m = trainer.step();
    if (i < 5) first += m.lm_loss / 5;
    if (i >= 115) last += m.lm_loss / 5;
    ASSERT_TRUE(std::isfinite(m.loss));
  }
  // Starts near ln(64) = 4.16; a model that learns the maps gets well below ln(16) = 2.77
  // (the loss of knowing only which 16 symbols occur).
  EXPECT_GT(first, 3.8);
  EXPECT_LT(last, 2.0);
}

// Mixed precision (train.precision: bf16): the same run learns as well as f32 within noise.
TEST(LmTraining, Bf16MixedPrecisionLearnsLikeF32) {
  auto backend = make_cpu_backend();
  LmRunConfig f32 = testing::tiny_run(120, "    method: switch_aux\n    alpha: 0.01");
  LmRunConfig bf16 = f32;
  bf16.train.precision = "bf16";
  LmTrainer a(f32, *backend), b(bf16, *backend);
  EXPECT_EQ(b.model().compute_dtype(), DType::bf16);
  double last_a = 0, last_b = 0;
  for (int i = 0; i < 120; ++i) {
    const double la = a.step().lm_loss, lb = b.step().lm_loss;
    ASSERT_TRUE(std::isfinite(lb)) << "step " << i + 1;
    if (i >= 115) {
      last_a += la / 5;
      last_b += lb / 5;
    }
  }
  EXPECT_LT(last_b, 2.0);
  EXPECT_NEAR(last_b, last_a, 0.15);
  EXPECT_EQ(b.model().params().flat().dtype(), DType::f32);
}

std::vector<double> flat_params(LmTrainer& t) {
  const Tensor& p = t.model().params().flat();
  return std::vector<double>(p.data<float>(), p.data<float>() + p.numel());
}

TEST(LmTraining, ResumeContinuesExactlyLikeAnUninterruptedRun) {
  const std::string dir = ::testing::TempDir() + "/foremoe_resume_test";
  std::filesystem::remove_all(dir);
  const std::string balance = "    method: loss_free\n    bias_rate: 0.01";
  auto backend = make_cpu_backend();

  LmTrainer straight(testing::tiny_run(6, balance), *backend);
  std::vector<double> straight_loss;
  for (int i = 0; i < 6; ++i) straight_loss.push_back(straight.step().loss);

  LmTrainer first_half(testing::tiny_run(6, balance), *backend);
  for (int i = 0; i < 3; ++i) first_half.step();
  first_half.save(dir + "/step_3");

  LmTrainer resumed(testing::tiny_run(6, balance), *backend);
  resumed.resume(dir + "/step_3");
  EXPECT_EQ(resumed.steps_done(), 3);
  for (int i = 3; i < 6; ++i) EXPECT_EQ(resumed.step().loss, straight_loss[i]) << "step " << i + 1;
  EXPECT_EQ(flat_params(resumed), flat_params(straight));
  EXPECT_EQ(resumed.model().balance_state()[0].bias, straight.model().balance_state()[0].bias);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace fm
