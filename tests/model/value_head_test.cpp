// The value head (head: value, the PPO critic): whole-model gradients of the values and of
// the clipped value loss against finite differences (f64, routing replayed), the trunk shared
// with the LM, the loss and its clipping on hand-made numbers, checkpoints and config errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>

#include "engine/config.h"
#include "engine/error.h"
#include "model/checkpoint.h"
#include "model/optimizer.h"
#include "model/value_loss.h"
#include "support/model_fixtures.h"
#include "support/temp_dir.h"

namespace fm {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

ModelConfig micro_critic(const std::string& balance_yaml = "method: switch_aux\n    alpha: 0.1") {
  ModelConfig c = testing::micro_config(balance_yaml);
  c.name = "micro_critic";
  c.head = "value";
  return c;
}

using Objective = std::function<double(const ForwardResult&)>;

// Compares the accumulated gradients (of grad_scale * objective) with central differences of
// `objective` over a spread of entries of every parameter tensor, routing replayed.
void check_against_finite_differences(MoeTransformer& model, const Batch& batch,
                                      const RoutingTrace& routes, const Objective& objective,
                                      double grad_scale) {
  const ForwardOptions replay{.replay = &routes, .training = false};
  double* p = model.params().flat().data<double>();
  const double* g = model.grads().flat().data<double>();
  int64_t offset = 0, checked = 0;
  double router_grad_norm = 0.0, head_grad_norm = 0.0;
  for (const ParamSlot& s : model.params().slots()) {
    const int64_t n = shape_numel(s.shape);
    Rng pick(static_cast<uint64_t>(offset) + 1, 3);
    for (int probe = 0; probe < std::min<int64_t>(n, 6); ++probe) {
      const int64_t i = offset + static_cast<int64_t>(pick.next_below(static_cast<uint64_t>(n)));
      const double saved = p[i];
      // eps = 1e-5: truncation ~eps^2 * |J'''| ~ 1e-10, rounding ~1e-16 * |J| / eps ~ 1e-11.
      const double eps = 1e-5;
      p[i] = saved + eps;
      const double up = objective(model.forward(batch, replay));
      p[i] = saved - eps;
      const double down = objective(model.forward(batch, replay));
      p[i] = saved;
      const double fd = grad_scale * (up - down) / (2 * eps);
      // 1e-7 absolute + 1e-6 relative: far above the FD error, far below a wrong term.
      EXPECT_NEAR(g[i], fd, 1e-7 + 1e-6 * std::fabs(fd)) << s.name << " entry " << i - offset;
      ++checked;
    }
    for (int64_t i = offset; i < offset + n; ++i) {
      if (s.name.find("mlp.gate.weight") != std::string::npos) router_grad_norm += g[i] * g[i];
      if (s.name.rfind("value_head.", 0) == 0) head_grad_norm += g[i] * g[i];
    }
    offset += n;
  }
  EXPECT_GT(checked, 100);
  EXPECT_GT(std::sqrt(router_grad_norm), 1e-4) << "router gradient vanished";
  EXPECT_GT(std::sqrt(head_grad_norm), 1e-4) << "value head gradient vanished";
}

TEST(ValueHead, ValuesGradientMatchesFiniteDifferences) {
  const ModelConfig c = micro_critic();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend, DType::f64);
  model.init_weights(11);
  const Batch batch = testing::random_batch(c, {5, 1, 4}, 3);
  std::vector<double> cv(static_cast<size_t>(batch.size()));
  Rng rng(9, 5);
  rng.uniform(cv.data(), batch.size(), -1.0, 1.0);
  const double balance_scale = 0.7;
  const Objective objective = [&](const ForwardResult& r) {
    double j = balance_scale * r.balance_loss;
    for (size_t n = 0; n < cv.size(); ++n) j += cv[n] * r.values[n];
    return j;
  };

  const RoutingTrace routes = model.forward(batch, {.replay = nullptr, .training = false}).routes;
  model.zero_grad();
  model.backward_values(cv, balance_scale);
  check_against_finite_differences(model, batch, routes, objective, 1.0);
}

TEST(ValueHead, ClippedValueLossGradientMatchesFiniteDifferences) {
  const ModelConfig c = micro_critic();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend, DType::f64);
  model.init_weights(11);
  const Batch batch = testing::random_batch(c, {5, 1, 4}, 3);
  const RoutingTrace routes = model.forward(batch, {.replay = nullptr, .training = false}).routes;
  const std::vector<double> v0 = model.forward_result().values;

  // Four kinds of token, each far (>= 0.05) from a clip edge or a tie of the two terms, so a
  // finite-difference step cannot switch branches:
  //   0: inside the clip range;  1: clipped, unclipped term larger (gradient flows);
  //   2: clipped, clipped term larger (no gradient);  3: masked out.
  const double clip = 0.2;
  const size_t N = v0.size();
  std::vector<double> returns(N), old(N);
  std::vector<uint8_t> mask(N, 1);
  for (size_t n = 0; n < N; ++n) {
    switch (n % 4) {
      case 0:
        old[n] = v0[n] + 0.05, returns[n] = v0[n] + 0.7;
        break;
      case 1:
        old[n] = v0[n] + 0.6, returns[n] = v0[n] + 1.0;
        break;
      case 2:
        old[n] = v0[n] - 0.6, returns[n] = v0[n] + 0.5;
        break;
      default:
        old[n] = v0[n], returns[n] = v0[n] + 3.0, mask[n] = 0;
    }
  }
  const Objective objective = [&](const ForwardResult& r) {
    return clipped_value_loss(r.values, returns, mask, old, clip).loss + r.balance_loss;
  };
  const ForwardOptions replay{.replay = &routes, .training = false};
  model.zero_grad();
  const double scale = 0.5;
  const double loss =
      value_loss_and_backward(model, batch, replay, returns, mask, old, clip, scale);
  EXPECT_DOUBLE_EQ(loss, objective(model.forward(batch, replay)));
  const ValueLossTerms t = clipped_value_loss(v0, returns, mask, old, clip);
  // Tokens 2, 6 are kind 2 among the 8 masked-in tokens of 10.
  EXPECT_DOUBLE_EQ(t.clipfrac, 2.0 / 8.0);
  check_against_finite_differences(model, batch, routes, objective, scale);
}

TEST(ValueHead, TrunkEqualsTheLmTrunkAndHeadIsAffine) {
  // Same config but the head, same seed: the arena's slots below the head come first and in the
  // same order, so both models draw identical trunk weights.
  ModelConfig lm_config = testing::micro_config();
  const ModelConfig critic_config = micro_critic();
  auto backend = make_cpu_backend();
  MoeTransformer lm(lm_config, *backend, DType::f64), critic(critic_config, *backend, DType::f64);
  lm.init_weights(5);
  critic.init_weights(5);
  for (const ParamSlot& s : critic.params().slots()) {
    if (s.name.rfind("value_head.", 0) == 0) continue;
    const Tensor& other = *lm.params().slot(s.name).slot;
    EXPECT_EQ(std::memcmp(s.slot->raw(), other.raw(), s.slot->nbytes()), 0) << s.name;
  }
  EXPECT_EQ(critic.params().slot("value_head.bias").slot->data<double>()[0], 0.0);

  // Value head := row j of the LM head, bias 0.25: then v[n] = logits[n, j] + 0.25.
  const int64_t j = 3, H = critic_config.hidden, V = lm_config.vocab_size;
  const double* lm_head = lm.params().slot("lm_head.weight").slot->data<double>();
  double* w = critic.params().slot("value_head.weight").slot->data<double>();
  for (int64_t h = 0; h < H; ++h) w[h] = lm_head[j * H + h];
  critic.params().slot("value_head.bias").slot->data<double>()[0] = 0.25;

  const Batch batch = testing::random_batch(lm_config, {6, 3}, 4);
  const ForwardResult lr = lm.forward(batch, {.replay = nullptr, .training = false});
  const ForwardResult cr = critic.forward(batch, {.replay = nullptr, .training = false});
  EXPECT_TRUE(lr.values.empty());
  EXPECT_EQ(lr.routes.ids, cr.routes.ids);
  EXPECT_DOUBLE_EQ(lr.balance_loss, cr.balance_loss);
  ASSERT_EQ(static_cast<int64_t>(cr.values.size()), batch.size());
  const double* logits = lm.logits().data<double>();
  for (int64_t n = 0; n < batch.size(); ++n) {
    // Same f64 dot product in a different kernel shape: agree to rounding (~1e-15).
    EXPECT_NEAR(cr.values[n], logits[n * V + j] + 0.25, 1e-12) << "token " << n;
    EXPECT_EQ(cr.logp[n], 0.0);
    EXPECT_EQ(cr.entropy[n], 0.0);
  }
}

TEST(ValueHead, ReplayedCriticForwardUsesTheRolloutTrace) {
  // The critic replays the actor's routing: its recorded routes are the trace given.
  const ModelConfig c = micro_critic();
  auto backend = make_cpu_backend();
  MoeTransformer actor(testing::micro_config(), *backend), critic(c, *backend);
  actor.init_weights(1);
  critic.init_weights(2);
  const Batch batch = testing::random_batch(c, {7, 5}, 6);
  const RoutingTrace trace = actor.forward(batch, {.replay = nullptr, .training = false}).routes;
  const ForwardResult own = critic.forward(batch, {.replay = nullptr, .training = false});
  EXPECT_NE(own.routes.ids, trace.ids) << "different weights should route differently";
  EXPECT_EQ(critic.forward(batch, {.replay = &trace, .training = false}).routes.ids, trace.ids);
}

TEST(ValueLoss, HandComputedClipping) {
  const double clip = 0.2;
  const std::vector<double> v{1.0, 2.0, 0.0, 0.5}, old{0.9, 1.0, 0.5, 0.5}, ret{1.5, 3.0, 1.0, 0.0};
  const std::vector<uint8_t> mask{1, 1, 1, 0};
  // token 0: range [0.7, 1.1], vc = v = 1.0: both terms (1 - 1.5)^2 = 0.25; gradient flows.
  // token 1: range [0.8, 1.2], vc = 1.2: (2 - 3)^2 = 1 < (1.2 - 3)^2 = 3.24: clipped, no gradient.
  // token 2: range [0.3, 0.7], vc = 0.3: (0 - 1)^2 = 1 > (0.3 - 1)^2 = 0.49: unclipped wins.
  // token 3: masked.
  const ValueLossTerms t = clipped_value_loss(v, ret, mask, old, clip);
  EXPECT_NEAR(t.loss, 0.5 * (0.25 + 3.24 + 1.0) / 3.0, 1e-15);
  ASSERT_EQ(t.dvalues.size(), 4u);
  EXPECT_NEAR(t.dvalues[0], (1.0 - 1.5) / 3.0, 1e-15);
  EXPECT_EQ(t.dvalues[1], 0.0);
  EXPECT_NEAR(t.dvalues[2], (0.0 - 1.0) / 3.0, 1e-15);
  EXPECT_EQ(t.dvalues[3], 0.0);
  EXPECT_NEAR(t.clipfrac, 1.0 / 3.0, 1e-15);

  // cliprange 0 pins vc to old: token 0 gives max((1-1.5)^2, (0.9-1.5)^2) = 0.36, clipped.
  const ValueLossTerms z = clipped_value_loss({1.0}, {1.5}, {1}, {0.9}, 0.0);
  EXPECT_NEAR(z.loss, 0.5 * 0.36, 1e-15);
  EXPECT_EQ(z.dvalues[0], 0.0);
}

TEST(ValueLoss, BadInputIsRefused) {
  EXPECT_THAT(
      [] {
        clipped_value_loss({1.0, 2.0}, {1.0}, {1, 1}, {1.0, 2.0}, 0.2);
      },
      ThrowsMessage<Error>(HasSubstr("2 values but 1 returns")));
  EXPECT_THAT([] { clipped_value_loss({1.0}, {1.0}, {0}, {1.0}, 0.2); },
              ThrowsMessage<Error>(HasSubstr("mask selects no tokens")));
  EXPECT_THAT([] { clipped_value_loss({1.0}, {1.0}, {1}, {1.0}, -0.1); },
              ThrowsMessage<Error>(HasSubstr("cliprange_value")));
}

TEST(ValueHead, HeadMismatchedCallsAreRefused) {
  auto backend = make_cpu_backend();
  MoeTransformer lm(testing::micro_config(), *backend), critic(micro_critic(), *backend);
  lm.init_weights(1);
  critic.init_weights(1);
  const Batch batch = testing::random_batch(lm.config(), {4}, 1);
  const std::vector<double> zeros(static_cast<size_t>(batch.size()), 0.0);
  critic.forward(batch);
  EXPECT_THAT([&] { critic.backward(zeros, {}, 1.0); },
              ThrowsMessage<Error>(HasSubstr("backward_values")));
  EXPECT_THAT([&] { critic.logits(); }, ThrowsMessage<Error>(HasSubstr("head: value")));
  EXPECT_THAT([&] { critic.backward_values({1.0}, 1.0); },
              ThrowsMessage<Error>(HasSubstr("1 gradients for 4 tokens")));
  lm.forward(batch);
  EXPECT_THAT([&] { lm.backward_values(zeros, 1.0); }, ThrowsMessage<Error>(HasSubstr("head: lm")));
  const std::vector<uint8_t> mask(zeros.size(), 1);
  EXPECT_THAT([&] { value_loss_and_backward(lm, batch, {}, zeros, mask, zeros, 0.2, 1.0); },
              ThrowsMessage<Error>(HasSubstr("needs head: value")));
}

class ValueHeadCheckpoint : public testing::TempDirTest {};

TEST_F(ValueHeadCheckpoint, RoundTripKeepsTheValueHead) {
  const ModelConfig c = micro_critic();
  auto backend = make_cpu_backend();
  MoeTransformer a(c, *backend);
  a.init_weights(1);
  AdamW opt_a(OptimizerConfig{}, a.params(), *backend);
  const Batch batch = testing::random_batch(c, {7, 5}, 2);
  const std::vector<double> ret(static_cast<size_t>(batch.size()), 1.0);
  const std::vector<uint8_t> mask(ret.size(), 1);
  a.forward(batch);
  const std::vector<double> old = a.forward_result().values;
  a.zero_grad();
  value_loss_and_backward(a, batch, {}, ret, mask, old, 0.2, 1.0);
  opt_a.step(a.grads());
  a.end_balance_step();
  CheckpointInfo info;
  info.step = 1;
  save_checkpoint(file("ck"), a, opt_a, info);

  EXPECT_EQ(load_checkpoint_config(file("ck")).head, "value");
  EXPECT_EQ(model_config_from_json(model_config_json(c), "<json>").head, "value");

  MoeTransformer b(c, *backend);
  b.init_weights(99);
  AdamW opt_b(OptimizerConfig{}, b.params(), *backend);
  load_checkpoint(file("ck"), b, opt_b);
  const Tensor& fa = a.params().flat();
  const Tensor& fb = b.params().flat();
  ASSERT_EQ(fa.nbytes(), fb.nbytes());
  EXPECT_EQ(std::memcmp(fa.raw(), fb.raw(), fa.nbytes()), 0);
  const ForwardOptions eval{.replay = nullptr, .training = false};
  EXPECT_EQ(a.forward(batch, eval).values, b.forward(batch, eval).values);

  // An LM model cannot take a critic's checkpoint, nor its weights.
  MoeTransformer lm(testing::micro_config(), *backend);
  AdamW opt_lm(OptimizerConfig{}, lm.params(), *backend);
  EXPECT_THAT([&] { load_checkpoint(file("ck"), lm, opt_lm); },
              ThrowsMessage<Error>(HasSubstr("model.head")));
  EXPECT_THAT([&] { load_weights(file("ck"), lm); }, ThrowsMessage<Error>(HasSubstr("model.head")));
}

ModelConfig parse_model(const std::string& body) {
  const ConfigNode root = ConfigNode::parse("model:\n" + body, "critic.yaml");
  ModelConfig c = ModelConfig::from_yaml(root.child("model"));
  root.finish();
  return c;
}

const std::string kValid =
    "  vocab_size: 32\n  hidden: 16\n  n_layers: 2\n  n_heads: 2\n  n_kv_heads: 1\n"
    "  head_dim: 8\n  n_experts: 4\n  top_k: 2\n  moe_ffn: 8\n  max_seq_len: 16\n";

TEST(ValueHeadConfig, HeadKeyIsValidated) {
  EXPECT_EQ(parse_model(kValid).head, "lm");
  EXPECT_EQ(parse_model(kValid + "  head: value\n").head, "value");
  EXPECT_THAT([] { parse_model(kValid + "  head: foo\n"); },
              ThrowsMessage<Error>(AllOf(HasSubstr("critic.yaml"), HasSubstr("model.head"))));
  EXPECT_THAT([] { parse_model(kValid + "  head: value\n  tie_embeddings: true\n"); },
              ThrowsMessage<Error>(HasSubstr("model.tie_embeddings")));
  EXPECT_NO_THROW(parse_model(kValid + "  head: lm\n  tie_embeddings: true\n"));
}

TEST(ValueHeadConfig, TinyCriticPresetAndCosts) {
  const ModelConfig lm = ModelConfig::load("tiny");
  const ModelConfig critic = ModelConfig::load("tiny_critic");
  EXPECT_EQ(critic.name, "tiny_critic");
  EXPECT_EQ(critic.head, "value");
  auto backend = make_cpu_backend();
  const ParamArena lm_arena(lm, *backend, DType::f32), critic_arena(critic, *backend, DType::f32);
  EXPECT_EQ(critic_arena.slot("value_head.weight").shape, (Shape{1, critic.hidden}));
  EXPECT_EQ(critic_arena.slot("value_head.bias").shape, (Shape{1}));
  EXPECT_THROW(critic_arena.slot("lm_head.weight"), Error);
  // model_costs counts exactly the arena's parameters.
  EXPECT_EQ(model_costs(lm, 128).total_params, lm_arena.flat().numel());
  EXPECT_EQ(model_costs(critic, 128).total_params, critic_arena.flat().numel());
  EXPECT_EQ(model_costs(critic, 128).embedding_params, critic.vocab_size * critic.hidden);
  // The head matmul per token: V * H for the LM, H for the critic.
  EXPECT_DOUBLE_EQ(model_costs(lm, 128).forward_flops_per_token -
                       model_costs(critic, 128).forward_flops_per_token,
                   2.0 * static_cast<double>((lm.vocab_size - 1) * lm.hidden));
}

}  // namespace
}  // namespace fm
