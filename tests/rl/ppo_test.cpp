// PPO with a critic (adv_estimator gae): token rewards and GAE targets checked by hand,
// the critic update learning its returns, a short PPO run that learns, a resumed PPO run
// repeating the uninterrupted one, and config errors naming the critic keys.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>

#include "engine/error.h"
#include "model/checkpoint.h"
#include "model/value_loss.h"
#include "rl/critic_update.h"
#include "rl/rl_trainer.h"
#include "support/run_configs.h"
#include "support/temp_dir.h"

namespace fm {
namespace {

using ::testing::HasSubstr;
using testing::ppo_count_run;
using testing::ppo_count_yaml;

// ---- token rewards and GAE targets ----

TEST(PpoTargets, TokenRewardsPutTheScoreLastAndTheKlOnEveryToken) {
  EXPECT_EQ(token_rewards(1.0, {}, 0.5, 3), (std::vector<double>{0.0, 0.0, 1.0}));
  const std::vector<double> r = token_rewards(1.0, {0.1, 0.2, 0.3}, 0.5, 3);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_DOUBLE_EQ(r[0], -0.05);
  EXPECT_DOUBLE_EQ(r[1], -0.1);
  EXPECT_DOUBLE_EQ(r[2], 1.0 - 0.15);
  EXPECT_THROW(token_rewards(1.0, {0.1}, 0.5, 3), Error);
}

// Two responses, gamma 0.9, lam 0.8 (gamma * lam = 0.72), kl_coef 0.5; worked by hand:
//   A: score 1, V = [0.5, 0.2, -0.1], kl = [0.1, 0.2, 0.3] -> r = [-0.05, -0.1, 0.85]
//      t2: delta = 0.85 - (-0.1) = 0.95                    A = 0.95       R = 0.85
//      t1: delta = -0.1 + 0.9 (-0.1) - 0.2 = -0.39         A = -0.39 + 0.72 * 0.95 = 0.294
//                                                                          R = 0.494
//      t0: delta = -0.05 + 0.9 * 0.2 - 0.5 = -0.37         A = -0.37 + 0.72 * 0.294 = -0.15832
//                                                                          R = 0.34168
//   B: score 0, V = [0.3, 0.1], kl = [-0.2, 0.4] -> r = [0.1, -0.2]
//      t1: delta = -0.2 - 0.1 = -0.3                       A = -0.3       R = -0.2
//      t0: delta = 0.1 + 0.9 * 0.1 - 0.3 = -0.11           A = -0.11 + 0.72 (-0.3) = -0.326
//                                                                          R = -0.026
// Advantages are then whitened over all five tokens (population std, as masked_whiten);
// returns are not.
TEST(PpoTargets, GaeWithPerTokenKlPenaltyMatchesAHandComputation) {
  AdvantageConfig cfg;
  cfg.estimator = AdvantageEstimator::gae;
  cfg.gamma = 0.9;
  cfg.lam = 0.8;
  const GaeTargets g = gae_targets(cfg, {1.0, 0.0}, {{0.5, 0.2, -0.1}, {0.3, 0.1}},
                                   {{0.1, 0.2, 0.3}, {-0.2, 0.4}}, 0.5);
  const std::vector<double> raw = {-0.15832, 0.294, 0.95, -0.326, -0.3};
  const std::vector<std::vector<double>> returns = {{0.34168, 0.494, 0.85}, {-0.026, -0.2}};
  double mean = 0, var = 0;
  for (double a : raw) mean += a / 5;
  for (double a : raw) var += (a - mean) * (a - mean) / 5;
  const double std = std::sqrt(var);
  ASSERT_EQ(g.advantages.size(), 2u);
  ASSERT_EQ(g.advantages[0].size(), 3u);
  ASSERT_EQ(g.advantages[1].size(), 2u);
  // Hand values are exact to the digits written; the arithmetic is fp64: 1e-12.
  size_t k = 0;
  for (size_t i = 0; i < 2; ++i)
    for (size_t t = 0; t < g.advantages[i].size(); ++t, ++k) {
      EXPECT_NEAR(g.advantages[i][t], (raw[k] - mean) / (std + 1e-8), 1e-12) << i << "," << t;
      EXPECT_NEAR(g.returns[i][t], returns[i][t], 1e-12) << i << "," << t;
    }
  // Without a KL penalty only the last token is rewarded: with gamma = lam = 1 every
  // return is the score.
  cfg.gamma = cfg.lam = 1.0;
  const GaeTargets plain = gae_targets(cfg, {1.0, 0.0}, {{0.5, 0.2, -0.1}, {0.3, 0.1}}, {}, 0.5);
  for (size_t i = 0; i < 2; ++i)
    for (double r : plain.returns[i]) EXPECT_NEAR(r, i == 0 ? 1.0 : 0.0, 1e-12);
}

// ---- the critic update ----

// A tiny actor's rollout (with routing traces) and a tiny_critic value model replaying it.
struct CriticFixture {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  MoeTransformer actor{ModelConfig::load("tiny"), *backend};
  MoeTransformer critic{ModelConfig::load("tiny_critic"), *backend};
  Tokenizer tokenizer = Tokenizer::embedded("tasks");
  std::unique_ptr<Task> task = make_task(TaskConfig::defaults("count"));
  std::vector<RolloutSample> samples;
  CriticFixture() {
    actor.init_weights(3);
    critic.init_weights(4);
    GenerationConfig g;
    g.max_new_tokens = 4;
    g.seed = 8;
    samples = rollout(actor, tokenizer, PromptTemplate::named("plain"), *task, {0, 4, 4}, g);
  }
  // Micro-batches of `per` samples: the values stage's V as old values, and returns that
  // are the sample's made-up score (alternating 1 and 0) on every response token.
  std::vector<CriticMicroBatch> micro_batches(size_t per) {
    std::vector<CriticMicroBatch> out;
    for (size_t b = 0; b < samples.size(); b += per) {
      CriticMicroBatch mb;
      mb.packed = pack_samples(samples, b, b + per);
      mb.old_values = critic_values(critic, mb.packed, true).values;
      mb.returns.assign(mb.old_values.size(), 0.0);
      for (size_t s = 0; s < per; ++s)
        for (int64_t t = mb.packed.batch.seq_offsets[s]; t < mb.packed.batch.seq_offsets[s + 1];
             ++t)
          if (mb.packed.response_mask[t]) mb.returns[t] = static_cast<double>((b + s) % 2);
      out.push_back(std::move(mb));
    }
    return out;
  }
};

TEST(CriticUpdate, FirstMiniBatchValuesAreTheOldOnesAndTheLossIsTheMiniBatchTokenMean) {
  CriticFixture f;
  OptimizerConfig oc;
  oc.lr = 1e-3;
  AdamW opt(oc, f.critic.params(), *f.backend);
  const std::vector<CriticMicroBatch> mbs = f.micro_batches(4);
  // The token-mean over the whole mini-batch, from the old values (= the current ones).
  std::vector<double> v, r, old;
  std::vector<uint8_t> mask;
  for (const CriticMicroBatch& mb : mbs) {
    v.insert(v.end(), mb.old_values.begin(), mb.old_values.end());
    r.insert(r.end(), mb.returns.begin(), mb.returns.end());
    mask.insert(mask.end(), mb.packed.response_mask.begin(), mb.packed.response_mask.end());
  }
  const ValueLossTerms want = clipped_value_loss(v, r, mask, v, 0.2);
  const CriticUpdateMetrics m = update_critic(f.critic, opt, 0.2, true, mbs);
  EXPECT_FALSE(m.skipped);
  // Same weights, same packing, replayed routing: bit-identical values, so nothing is clipped.
  EXPECT_EQ(m.values_max_dev, 0.0);
  EXPECT_EQ(m.vf_clipfrac, 0.0);
  EXPECT_NEAR(m.vf_loss, want.loss, 1e-12 * (1.0 + want.loss));  // sums in another order
  EXPECT_GT(m.grad_norm, 0.0);
  // A second epoch on the same old values sees the moved critic.
  const CriticUpdateMetrics m2 = update_critic(f.critic, opt, 0.2, true, mbs);
  EXPECT_GT(m2.values_max_dev, 0.0);
}

TEST(CriticUpdate, RepeatedUpdatesLearnTheReturns) {
  CriticFixture f;
  OptimizerConfig oc;
  oc.lr = 3e-3;
  oc.weight_decay = 0.0;
  AdamW opt(oc, f.critic.params(), *f.backend);
  double first = 0, last = 0;
  for (int step = 0; step < 40; ++step) {
    // Each step is a PPO step's critic work: the values stage, then one update.
    const CriticUpdateMetrics m = update_critic(f.critic, opt, 0.5, true, f.micro_batches(8));
    ASSERT_FALSE(m.skipped);
    ASSERT_EQ(m.values_max_dev, 0.0) << "step " << step;
    ASSERT_EQ(m.vf_clipfrac, 0.0) << "step " << step;
    if (step == 0) first = m.vf_loss;
    last = m.vf_loss;
  }
  std::printf("critic value loss on a fixed batch: %.4f -> %.4f over 40 updates\n", first, last);
  // Returns are 0 or 1 (half each): a constant 0.5 already scores 0.125; learning the
  // per-sample returns must go well below that.
  EXPECT_LT(last, 0.25 * first);
  EXPECT_LT(last, 0.05);
}

// ---- the PPO loop ----

// Metrics minus the wall-clock fields.
nlohmann::json comparable(const RlStepMetrics& m) {
  nlohmann::json j = rl_metrics_json(m);
  j.erase("timing_s");
  j.erase("tokens_per_second");
  return j;
}

bool all_finite(const nlohmann::json& j) {
  for (const auto& [key, value] : j.items())
    if ((value.is_number_float() && !std::isfinite(value.get<double>())) ||
        (value.is_structured() && !all_finite(value)))
      return false;
  return true;
}

TEST(PpoRun, CountTaskRewardRisesAndTheCriticFollows) {
  auto backend = make_cpu_backend();
  constexpr int kSteps = 60;
  RlTrainer t(ppo_count_run(kSteps), *backend);
  ASSERT_NE(t.critic(), nullptr);
  double reward_early = 0, reward_late = 0, vf_early = 0, vf_late = 0;
  for (int s = 0; s < kSteps; ++s) {
    const RlStepMetrics m = t.step();
    ASSERT_TRUE(all_finite(rl_metrics_json(m))) << rl_metrics_json(m).dump();
    // Recomputes under replay with unchanged weights: exactly the old log-probs and values.
    ASSERT_EQ(m.first_ratio_max_dev, 0.0) << "step " << m.step;
    ASSERT_EQ(m.first_value_max_dev, 0.0) << "step " << m.step;
    EXPECT_EQ(m.skipped, 0);
    EXPECT_GT(m.timing.values, 0.0);
    EXPECT_GT(m.timing.update_critic, 0.0);
    EXPECT_GT(m.vf_loss, 0.0);
    EXPECT_GT(m.critic_grad_norm, 0.0);
    // gamma = lam = 1 and no KL: every return is its sequence's score.
    double score_tokens = 0, tokens = 0;
    for (const RolloutSample& r : t.last_rollout()) {
      const double len = static_cast<double>(r.sequence.response.size());
      score_tokens += r.reward.reward * len;
      tokens += len;
    }
    EXPECT_NEAR(m.returns_mean, score_tokens / tokens, 1e-12);
    if (s < 5) reward_early += m.reward_mean / 5, vf_early += m.vf_loss / 5;
    if (s >= kSteps - 5) reward_late += m.reward_mean / 5, vf_late += m.vf_loss / 5;
  }
  std::printf("PPO on count: reward %.3f -> %.3f, vf_loss %.4f -> %.4f (first / last 5 steps)\n",
              reward_early, reward_late, vf_early, vf_late);
  // Measured with seeds 3-7: reward +0.44 to +0.56, vf_loss down 3x to 150x.
  EXPECT_GT(reward_late, reward_early + 0.25);
  EXPECT_LT(vf_late, 0.5 * vf_early);
}

// A critic with another MoE layout cannot replay the actor's routing: it routes itself, and
// its first update still sees exactly the values stage's values (here with micro-batches of
// its own, so the values stage packs its own sequences).
TEST(PpoRun, CriticWithItsOwnRoutingWhenTheLayoutsDiffer) {
  auto backend = make_cpu_backend();
  std::string y = ppo_count_yaml(2, "", "", "  ppo_micro_batch_size: 8\n");
  y.replace(y.find("model: tiny_critic"), 18, R"(model:
    name: tiny_critic_4x1
    vocab_size: 512
    hidden: 32
    n_layers: 2
    n_heads: 2
    n_kv_heads: 1
    head_dim: 16
    n_experts: 4
    top_k: 1
    moe_ffn: 32
    first_k_dense: 0
    head: value
    max_seq_len: 256)");
  const RlRunConfig cfg = RlRunConfig::parse(y, "<ppo>");
  EXPECT_FALSE(cfg.critic_replays_routing());
  EXPECT_TRUE(ppo_count_run(1).critic_replays_routing());
  RlTrainer t(cfg, *backend);
  for (int s = 0; s < 2; ++s) {
    const RlStepMetrics m = t.step();
    EXPECT_TRUE(all_finite(rl_metrics_json(m)));
    EXPECT_EQ(m.first_value_max_dev, 0.0);
    EXPECT_GT(m.vf_loss, 0.0);
  }
}

TEST(PpoRun, DenseCriticWithoutExperts) {
  // A dense value model (first_k_dense = n_layers): nothing to replay, and it learns.
  auto backend = make_cpu_backend();
  std::string y = ppo_count_yaml(2, "", "", "  ppo_micro_batch_size: 8\n");
  y.replace(y.find("model: tiny_critic"), 18, R"(model:
    name: dense_critic
    vocab_size: 512
    hidden: 32
    n_layers: 2
    n_heads: 2
    n_kv_heads: 1
    head_dim: 16
    n_experts: 4
    top_k: 1
    moe_ffn: 32
    first_k_dense: 2
    dense_ffn: 64
    head: value
    max_seq_len: 256)");
  const RlRunConfig cfg = RlRunConfig::parse(y, "<ppo>");
  EXPECT_EQ(cfg.critic.model.n_moe_layers(), 0);
  EXPECT_FALSE(cfg.critic_replays_routing());
  RlTrainer t(cfg, *backend);
  double first = 0, last = 0;
  for (int s = 0; s < 6; ++s) {
    const RlStepMetrics m = t.step();
    EXPECT_TRUE(all_finite(rl_metrics_json(m)));
    EXPECT_EQ(m.first_value_max_dev, 0.0);
    (s == 0 ? first : last) = m.vf_loss;
  }
  EXPECT_LT(last, first) << "the dense critic's value loss did not fall";
}

class PpoFiles : public testing::TempDirTest {};

TEST_F(PpoFiles, ResumeRepeatsTheUninterruptedRun) {
  auto backend = make_cpu_backend();
  // KL in the reward (per token) so the reference restored from the init weights matters,
  // two critic epochs so its AdamW state does too.
  const RlRunConfig cfg = ppo_count_run(
      4, "  use_kl_in_reward: true\n  kl_coef: 0.05\n  kl_penalty: low_var_kl\n  lam: 0.95\n", "",
      "  ppo_epochs: 2\n");
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
  EXPECT_TRUE(std::filesystem::exists(file("ckpt") + "/critic/model.safetensors"));
  RlTrainer resumed(cfg, *backend);
  resumed.resume(file("ckpt"));
  EXPECT_EQ(resumed.steps_done(), 2);
  for (int s = 2; s < 4; ++s) EXPECT_EQ(comparable(resumed.step()), want[s]);
  EXPECT_GT(want[3]["kl"].get<double>(), 0.0);
  EXPECT_GT(want[3]["vf_loss"].get<double>(), 0.0);

  // Without its critic the checkpoint cannot resume a PPO run.
  std::filesystem::remove_all(file("ckpt") + "/critic");
  RlTrainer broken(cfg, *backend);
  EXPECT_THAT([&] { broken.resume(file("ckpt")); },
              ::testing::ThrowsMessage<Error>(HasSubstr("critic")));
}

TEST_F(PpoFiles, CriticInitActorCopiesTheTrunkAndKeepsItsValueHead) {
  auto backend = make_cpu_backend();
  const RlRunConfig cfg = ppo_count_run(1, "", "", "  init: actor\n");
  RlTrainer init(cfg, *backend);
  init.policy().init_weights(11);
  save_weights(file("init"), init.policy());
  RlTrainer t(cfg, *backend);
  t.load_initial_weights(file("init"));
  const ParamArena& actor = t.policy().params();
  const ParamArena& critic = t.critic()->params();
  int copied = 0;
  for (const ParamSlot& p : critic.slots()) {
    if (p.name.rfind("value_head.", 0) == 0) continue;
    const ParamSlot& a = actor.slot(p.name);
    EXPECT_EQ(backend->download_f64(*p.slot), backend->download_f64(*a.slot)) << p.name;
    ++copied;
  }
  EXPECT_GT(copied, 10);
  // The value head is the critic's own (seeded) init, not zeros.
  double head = 0;
  for (double w : backend->download_f64(critic.weights().value_head)) head += std::abs(w);
  EXPECT_GT(head, 0.0);
}

// ---- config errors ----

TEST(PpoConfig, ErrorsNameTheCriticKeys) {
  auto parse = [](const std::string& y) { return RlRunConfig::parse(y, "ppo.yaml"); };
  // gae without a critic section.
  EXPECT_THAT([&] { parse(testing::count_rl_yaml(1, "  adv_estimator: gae\n")); },
              ::testing::ThrowsMessage<Error>(HasSubstr("ppo.yaml: critic:")));
  // A critic whose model has the LM head.
  std::string y = ppo_count_yaml(1);
  y.replace(y.find("model: tiny_critic"), 18, "model: tiny");
  EXPECT_THAT([&] { parse(y); }, ::testing::ThrowsMessage<Error>(HasSubstr("critic.model")));
  EXPECT_THAT([&] { parse(y); }, ::testing::ThrowsMessage<Error>(HasSubstr("head: value")));
  // A critic section with another estimator.
  y = ppo_count_yaml(1);
  y.replace(y.find("adv_estimator: gae"), 18, "adv_estimator: grpo");
  EXPECT_THAT([&] { parse(y); }, ::testing::ThrowsMessage<Error>(HasSubstr("critic")));
  EXPECT_THAT([&] { parse(ppo_count_yaml(1, "", "", "  ppo_mini_batch_size: 3\n")); },
              ::testing::ThrowsMessage<Error>(HasSubstr("critic.ppo_mini_batch_size")));
  EXPECT_THAT([&] { parse(ppo_count_yaml(1, "", "", "  init: no/such/dir\n")); },
              ::testing::ThrowsMessage<Error>(HasSubstr("critic.init")));
  EXPECT_THAT([&] { parse(ppo_count_yaml(1, "", "", "  ppo_epochz: 2\n")); },
              ::testing::ThrowsMessage<Error>(HasSubstr("critic.ppo_epochz: unknown key")));
  // critic.init: actor with another trunk is refused when the trainer is built.
  y = ppo_count_yaml(1, "", "", "  init: actor\n");
  y.replace(y.find("model: tiny_critic"), 18, R"(model:
    name: small_critic
    vocab_size: 512
    hidden: 32
    n_layers: 1
    n_heads: 2
    n_kv_heads: 1
    head_dim: 16
    n_experts: 4
    top_k: 1
    moe_ffn: 32
    head: value
    max_seq_len: 256)");
  auto backend = make_cpu_backend();
  EXPECT_THAT([&] { RlTrainer t(parse(y), *backend); },
              ::testing::ThrowsMessage<Error>(HasSubstr("critic.init: actor")));
}

}  // namespace
}  // namespace fm
