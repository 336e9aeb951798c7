// AdamW, clipping, schedules and the non-finite step skip.
#include "model/optimizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "engine/config.h"
#include "engine/error.h"
#include "support/model_fixtures.h"

namespace fm {
namespace {

TEST(Optimizer, ScheduleValues) {
  OptimizerConfig c;
  c.lr = 1.0;
  c.min_lr = 0.1;
  c.schedule = LrSchedule::cosine;
  c.warmup_steps = 4;
  c.total_steps = 14;
  EXPECT_DOUBLE_EQ(lr_at(c, 0), 0.25);
  EXPECT_DOUBLE_EQ(lr_at(c, 3), 1.0);
  EXPECT_DOUBLE_EQ(lr_at(c, 4), 1.0);
  EXPECT_NEAR(lr_at(c, 9), 0.1 + 0.45 * (1 + std::cos(M_PI * 0.5)), 1e-12);
  EXPECT_NEAR(lr_at(c, 14), 0.1, 1e-12);
  EXPECT_NEAR(lr_at(c, 100), 0.1, 1e-12);
  c.schedule = LrSchedule::linear_warmup;
  EXPECT_DOUBLE_EQ(lr_at(c, 1), 0.5);
  EXPECT_DOUBLE_EQ(lr_at(c, 50), 1.0);
}

TEST(Optimizer, AdamWStepMatchesHandComputationAndClips) {
  const ModelConfig mc = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(mc, *backend);
  model.init_weights(3);
  OptimizerConfig c;
  c.lr = 0.01;
  c.weight_decay = 0.1;
  c.grad_clip = 1.0;
  AdamW opt(c, model.params(), *backend);
  const std::vector<float> before(
      model.params().flat().data<float>(),
      model.params().flat().data<float>() + model.params().flat().numel());
  backend->fill(model.grads().flat(), 0.5);  // norm = 0.5 * sqrt(P) > 1: clipped
  const StepReport r = opt.step(model.grads());
  const double P = static_cast<double>(before.size());
  EXPECT_NEAR(r.grad_norm, 0.5 * std::sqrt(P), 1e-3);
  const double g = 0.5 / r.grad_norm;  // every clipped gradient entry
  // Step 1: m_hat = g, v_hat = g^2 -> update = lr * (g / (|g| + eps) + wd * p).
  const float* after = model.params().flat().data<float>();
  const ParamSlot& emb = model.params().slot("model.embed_tokens.weight");  // decayed
  const ParamSlot& norm = model.params().slot("model.norm.weight");         // not decayed
  const int64_t ie = emb.slot->data<float>() - model.params().flat().data<float>();
  const int64_t in = norm.slot->data<float>() - model.params().flat().data<float>();
  const double step_e = c.lr * (g / (g + c.eps) + c.weight_decay * before[ie]);
  EXPECT_NEAR(after[ie], before[ie] - step_e, 1e-6);
  EXPECT_NEAR(after[in], before[in] - c.lr * g / (g + c.eps), 1e-6);
}

TEST(Optimizer, NonFiniteGradientSkipsTheStepAndIsCounted) {
  const ModelConfig mc = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(mc, *backend);
  model.init_weights(3);
  AdamW opt(OptimizerConfig{}, model.params(), *backend);
  const std::vector<float> before(
      model.params().flat().data<float>(),
      model.params().flat().data<float>() + model.params().flat().numel());
  backend->fill(model.grads().flat(), 0.1);
  model.grads().flat().data<float>()[5] = std::numeric_limits<float>::quiet_NaN();
  const StepReport r = opt.step(model.grads());
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(opt.steps_skipped(), 1);
  EXPECT_EQ(opt.steps_taken(), 0);
  const std::vector<float> after(
      model.params().flat().data<float>(),
      model.params().flat().data<float>() + model.params().flat().numel());
  EXPECT_EQ(before, after);
}

TEST(Optimizer, ConfigErrorsNameTheKey) {
  const auto load = [](const std::string& yaml) {
    const ConfigNode root = ConfigNode::parse(yaml, "opt.yaml");
    OptimizerConfig::from_yaml(root.child("optimizer"));
    root.finish();
  };
  EXPECT_THAT([&] { load("optimizer:\n  lr: -1\n"); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("optimizer.lr")));
  EXPECT_THAT([&] { load("optimizer:\n  schedule: cosine\n  total_steps: 0\n"); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("optimizer.total_steps")));
  EXPECT_THAT([&] { load("optimizer:\n  lr: 0.1\n  betas: [0.9, 0.9]\n"); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("optimizer.betas")));
}

}  // namespace
}  // namespace fm
