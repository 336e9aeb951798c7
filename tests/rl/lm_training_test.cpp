// Training on the synthetic task: the loss falls, and a resumed run continues
// bit-identically to an uninterrupted one.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "support/run_configs.h"

namespace fm {
namespace {

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
