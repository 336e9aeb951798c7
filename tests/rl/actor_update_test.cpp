// The actor update under routing replay: on the first mini-batch the policy has
// not moved, so the recomputed old log-probs equal the current ones exactly
// (ratio 1, no clipping); an update then moves the policy towards the
// advantage-weighted responses.
#include "rl/actor_update.h"

#include <gtest/gtest.h>

#include "model/config.h"
#include "rl/advantages.h"
#include "rl/tasks/task_config.h"

namespace fm {
namespace {

ModelConfig with_balance(BalanceMethod m) {
  ModelConfig c = ModelConfig::load("tiny");
  c.balance.method = m;
  return c;
}

struct UpdateFixture {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  ModelConfig config;
  MoeTransformer model{config, *backend};
  Tokenizer tokenizer = Tokenizer::embedded("tasks");
  std::unique_ptr<Task> task = make_task(TaskConfig::defaults("add"));
  std::vector<RolloutSample> samples;
  explicit UpdateFixture(BalanceMethod balance = BalanceMethod::switch_aux)
      : config(with_balance(balance)) {
    model.init_weights(3);
    GenerationConfig g;
    g.max_new_tokens = 5;
    g.seed = 8;
    samples = rollout(model, tokenizer, PromptTemplate::named("plain"), *task, {0, 4, 4}, g);
  }
  // Micro-batches of `per` samples with old log-probs recomputed under replay and
  // advantages that are not all zero (rewards of an untrained model are all 0, so
  // samples get alternating made-up scores).
  std::vector<ActorMicroBatch> micro_batches(size_t per) {
    std::vector<double> scores;
    std::vector<int64_t> groups;
    for (size_t i = 0; i < samples.size(); ++i) {
      scores.push_back(static_cast<double>((i + i / 4) % 2));
      groups.push_back(samples[i].group);
    }
    const std::vector<double> adv = group_advantages(AdvantageConfig{}, scores, groups);
    std::vector<ActorMicroBatch> out;
    for (size_t b = 0; b < samples.size(); b += per) {
      ActorMicroBatch mb;
      mb.packed = pack_samples(samples, b, b + per);
      mb.old_logp = recompute(model, mb.packed).logp;
      mb.advantages.assign(mb.old_logp.size(), 0.0);
      for (size_t s = 0; s < per; ++s)
        for (int64_t t = mb.packed.batch.seq_offsets[s]; t < mb.packed.batch.seq_offsets[s + 1];
             ++t)
          if (mb.packed.response_mask[t]) mb.advantages[t] = adv[b + s];
      out.push_back(std::move(mb));
    }
    return out;
  }
  // sum over response positions of A * logp under the current model.
  double objective(const std::vector<ActorMicroBatch>& mbs) {
    double j = 0;
    for (const ActorMicroBatch& mb : mbs) {
      const ForwardResult& r = recompute(model, mb.packed);
      for (size_t t = 0; t < r.logp.size(); ++t) j += mb.advantages[t] * r.logp[t];
    }
    return j;
  }
};

TEST(ActorUpdate, FirstMiniBatchRatioIsExactlyOneUnderReplay) {
  UpdateFixture f;
  OptimizerConfig oc;
  oc.lr = 1e-3;
  AdamW opt(oc, f.model.params(), *f.backend);
  const auto mbs = f.micro_batches(4);
  const double before = f.objective(mbs);
  const ActorUpdateMetrics m = update_actor(f.model, opt, PolicyLossConfig{}, mbs);
  ASSERT_FALSE(m.skipped);
  EXPECT_EQ(m.ratio_max, 1.0);
  EXPECT_EQ(m.ratio_mean, 1.0);
  EXPECT_EQ(m.pg_clipfrac, 0.0);
  EXPECT_EQ(m.ppo_kl, 0.0);
  EXPECT_GT(m.tokens, 0);
  EXPECT_GT(m.grad_norm, 0.0);
  // The step raises the advantage-weighted log-likelihood.
  const double after = f.objective(mbs);
  std::printf("sum A logp: %.4f -> %.4f\n", before, after);
  EXPECT_GT(after, before);
  // A second mini-batch against the same old log-probs now sees the moved policy.
  const ActorUpdateMetrics m2 = update_actor(f.model, opt, PolicyLossConfig{}, mbs);
  EXPECT_NE(m2.ratio_mean, 1.0);
  EXPECT_GT(std::abs(m2.ppo_kl), 0.0);
}

// Gradient accumulation: one mini-batch as 4 micro-batches or as 1 gives the same
// loss and gradient (up to fp32 summation order). Router balancing is off: the
// switch loss is per micro-batch by definition, so it does depend on the split.
TEST(ActorUpdate, MicroBatchSplitDoesNotChangeTheGradient) {
  UpdateFixture a(BalanceMethod::none), b(BalanceMethod::none);
  OptimizerConfig oc;
  oc.lr = 1e-3;
  AdamW opt_a(oc, a.model.params(), *a.backend), opt_b(oc, b.model.params(), *b.backend);
  const ActorUpdateMetrics ma =
      update_actor(a.model, opt_a, PolicyLossConfig{}, a.micro_batches(4));
  const ActorUpdateMetrics mb =
      update_actor(b.model, opt_b, PolicyLossConfig{}, b.micro_batches(16));
  EXPECT_NEAR(ma.loss, mb.loss, 1e-6);
  EXPECT_NEAR(ma.grad_norm, mb.grad_norm, 1e-4 * mb.grad_norm);
  const auto pa = a.backend->download_f64(a.model.params().flat());
  const auto pb = b.backend->download_f64(b.model.params().flat());
  double max_diff = 0;
  for (size_t i = 0; i < pa.size(); ++i) max_diff = std::max(max_diff, std::abs(pa[i] - pb[i]));
  EXPECT_LT(max_diff, 1e-5);
}

}  // namespace
}  // namespace fm
