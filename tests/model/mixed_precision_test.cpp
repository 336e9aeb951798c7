// Mixed precision (MoeTransformer::set_compute_dtype(bf16)): f32 master weights, gradients
// and optimizer state; a bf16 compute copy refreshed whenever the master weights change;
// log-probs, entropies and gradients within bf16 error of the f32 model's.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "engine/error.h"
#include "model/generation.h"
#include "model/optimizer.h"
#include "support/model_fixtures.h"

namespace fm {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

struct Pass {
  std::vector<double> logp, entropy, grads;
  double loss = 0.0;
};

Pass forward_backward(MoeTransformer& model, const Batch& batch) {
  Pass p;
  model.zero_grad();
  p.loss = model.lm_loss_and_backward(batch, {});
  p.logp = model.forward_result().logp;
  p.entropy = model.forward_result().entropy;
  const Tensor& g = model.grads().flat();
  p.grads.assign(g.data<float>(), g.data<float>() + g.numel());
  return p;
}

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

TEST(MixedPrecision, Bf16ComputeStaysWithinBf16ErrorOfF32) {
  auto backend = make_cpu_backend();
  const ModelConfig c = testing::micro_config();
  const Batch batch = testing::random_batch(c, {12, 9, 20}, 4);
  MoeTransformer f32(c, *backend), bf16(c, *backend);
  f32.init_weights(3);
  bf16.init_weights(3);
  bf16.set_compute_dtype(DType::bf16);
  EXPECT_EQ(bf16.compute_dtype(), DType::bf16);
  EXPECT_EQ(bf16.dtype(), DType::f32);
  EXPECT_EQ(bf16.params().flat().dtype(), DType::f32);
  EXPECT_EQ(bf16.grads().flat().dtype(), DType::f32);
  const Pass want = forward_backward(f32, batch), got = forward_backward(bf16, batch);

  // bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.002). The micro model's large
  // init (std 0.3) gives logits of magnitude ~10, so rounding the activations of three
  // layers moves single log-probs by up to ~0.1 and their mean by far less.
  ASSERT_EQ(got.logp.size(), want.logp.size());
  double worst = 0.0, mean = 0.0, moved = 0.0;
  for (size_t n = 0; n < want.logp.size(); ++n) {
    worst = std::max(worst, std::fabs(got.logp[n] - want.logp[n]));
    mean += std::fabs(got.logp[n] - want.logp[n]) / static_cast<double>(want.logp.size());
    moved = std::max(moved, std::fabs(got.entropy[n] - want.entropy[n]));
  }
  EXPECT_LT(worst, 0.15);
  EXPECT_LT(mean, 0.03);
  EXPECT_LT(moved, 0.15);
  EXPECT_GT(worst, 0.0) << "the bf16 model computed in f32";
  EXPECT_NEAR(got.loss, want.loss, 0.02);
  // The gradient direction survives: relative L2 error and cosine against f32.
  double dot = 0.0, na = 0.0, nb = 0.0, diff = 0.0;
  for (size_t i = 0; i < want.grads.size(); ++i) {
    dot += want.grads[i] * got.grads[i];
    na += want.grads[i] * want.grads[i];
    nb += got.grads[i] * got.grads[i];
    diff += (want.grads[i] - got.grads[i]) * (want.grads[i] - got.grads[i]);
  }
  EXPECT_GT(dot / std::sqrt(na * nb), 0.999);
  EXPECT_LT(std::sqrt(diff / na), 0.1);
  EXPECT_GT(max_abs(got.grads), 0.0);
}

TEST(MixedPrecision, ComputeWeightsFollowTheMasterWeightsAfterEachChange) {
  auto backend = make_cpu_backend();
  const ModelConfig c = testing::micro_config();
  const Batch batch = testing::random_batch(c, {10, 14}, 8);
  MoeTransformer model(c, *backend);
  model.init_weights(5);
  model.set_compute_dtype(DType::bf16);
  forward_backward(model, batch);
  OptimizerConfig oc;
  oc.lr = 0.05;
  AdamW opt(oc, model.params(), *backend);
  opt.step(model.grads());
  const Pass after = forward_backward(model, batch);

  // A fresh bf16 model whose master weights are the stepped ones computes the same bits:
  // the step reached the compute copy.
  MoeTransformer fresh(c, *backend);
  backend->copy(fresh.params().flat(), model.params().flat());
  fresh.params().touch();
  fresh.set_compute_dtype(DType::bf16);
  const Pass want = forward_backward(fresh, batch);
  EXPECT_EQ(after.logp, want.logp);
  EXPECT_EQ(after.grads, want.grads);

  // Writing the master weights without touch() is not seen (documented), touch() is.
  MoeTransformer stale(c, *backend);
  stale.init_weights(5);
  stale.set_compute_dtype(DType::bf16);
  const Pass before = forward_backward(stale, batch);
  backend->copy(stale.params().flat(), model.params().flat());
  EXPECT_EQ(forward_backward(stale, batch).logp, before.logp);
  stale.params().touch();
  EXPECT_EQ(forward_backward(stale, batch).logp, want.logp);

  // Back to f32 compute: the master weights themselves.
  stale.set_compute_dtype(DType::f32);
  MoeTransformer f32(c, *backend);
  backend->copy(f32.params().flat(), model.params().flat());
  EXPECT_EQ(forward_backward(stale, batch).logp, forward_backward(f32, batch).logp);
}

TEST(MixedPrecision, GenerationUsesABf16CacheAndF32Logits) {
  auto backend = make_cpu_backend();
  const ModelConfig c = testing::micro_config();
  MoeTransformer model(c, *backend);
  model.init_weights(9);
  model.set_compute_dtype(DType::bf16);
  KvCache cache(c, *backend, model.compute_dtype(), 1, 16);
  CachedInput in{{3, 7, 1, 12}, {0, 0, 0, 0}, {0, 1, 2, 3}, {3}};
  CachedOutput out;
  model.forward_cached(in, cache, out);
  EXPECT_EQ(cache.keys(0).dtype(), DType::bf16);
  EXPECT_EQ(out.logits.dtype(), DType::f32);
  // The cached forward's logits give the training forward's log-prob of the next token.
  const Batch batch{{3, 7, 1, 12}, {-1, -1, -1, 5}, {0, 4}};
  const double logp = model.forward(batch, {.training = false}).logp[3];
  const std::vector<double> logits = backend->download_f64(out.logits);
  double mx = logits[0], sum = 0.0;
  for (double v : logits) mx = std::max(mx, v);
  for (double v : logits) sum += std::exp(v - mx);
  EXPECT_NEAR(logits[5] - mx - std::log(sum), logp, 5e-3);
}

TEST(MixedPrecision, UnsupportedCombinationsAreRejected) {
  auto backend = make_cpu_backend();
  const ModelConfig c = testing::micro_config();
  MoeTransformer f64(c, *backend, DType::f64);
  EXPECT_THAT([&] { f64.set_compute_dtype(DType::bf16); },
              ThrowsMessage<Error>(HasSubstr("bf16 needs f32 master weights")));
  MoeTransformer f32(c, *backend);
  EXPECT_THAT([&] { f32.set_compute_dtype(DType::f64); },
              ThrowsMessage<Error>(HasSubstr("f64 compute with f32 parameters")));
}

}  // namespace
}  // namespace fm
