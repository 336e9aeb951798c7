// The model on a device backend: parameters, activations, KV cache and optimizer state live
// in device memory and every step goes through Backend ops and copies. One helper,
// run_model(), trains one step and generates on a backend; its results on a device backend
// are compared with the CPU backend's:
// - on the emulated device (support/emulated_device.h: device tensors in host memory, ops by
//   the CPU reference) bit for bit, which proves the model reads and writes no device memory
//   from the host and misses no copy;
// - on the real CUDA backend within f32 tolerances (skipped without a GPU).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "engine/error.h"
#include "model/generation.h"
#include "model/optimizer.h"
#include "support/emulated_device.h"
#include "support/model_fixtures.h"

namespace fm {
namespace {

using ::testing::HasSubstr;

// What run_model() observed, all on the host.
struct ModelRun {
  double loss = 0.0;
  std::vector<double> logp;                // [N] of the training forward
  std::vector<std::vector<double>> grads;  // per parameter slot, after one backward
  std::vector<double> params_after_step;   // the flat arena after one AdamW step
  std::vector<double> exp_avg_sq;          // AdamW's second moment after that step
  std::vector<GeneratedSequence> generated;
};

ModelConfig config_named(const std::string& name) {
  return name == "micro" ? testing::micro_config() : ModelConfig::load(name);
}

// One training step and greedy generation of `c` on backend `b` (seeded, so every backend
// starts from the same numbers): the token-mean LM loss with its gradients, an AdamW step
// (clipping on: it reads the gradient norm through the backend), then greedy generation with
// the KV cache from the updated weights.
ModelRun run_model(Backend& b, const ModelConfig& c) {
  ModelRun r;
  MoeTransformer model(c, b);
  model.init_weights(11);
  model.zero_grad();
  const Batch batch = testing::random_batch(c, {13, 7, 20}, 12);
  // The LM head in chunks of 16 rows (the last one partial): the forward keeps no logits and
  // the backward recomputes them on the device.
  r.loss = model.lm_loss_and_backward(batch, {.lm_head_rows = 16});
  r.logp = model.forward_result().logp;
  for (const ParamSlot& p : model.grads().slots()) r.grads.push_back(b.download_f64(*p.slot));

  OptimizerConfig oc;
  oc.lr = 1e-2;
  oc.grad_clip = 0.5;
  AdamW opt(oc, model.params(), b);
  const StepReport step = opt.step(model.grads());
  EXPECT_FALSE(step.skipped);
  r.params_after_step = b.download_f64(model.params().flat());
  r.exp_avg_sq = b.download_f64(opt.exp_avg_sq());

  GenerationConfig g;
  g.sampling.temperature = 0.0;  // greedy
  g.max_new_tokens = 9;
  g.batch_slots = 2;  // 3 prompts in 2 slots: a slot is reused mid-run
  Rng rng(13, 1);
  std::vector<std::vector<int32_t>> prompts;
  for (int64_t len : {5, 1, 8}) {
    std::vector<int32_t>& p = prompts.emplace_back();
    for (int64_t i = 0; i < len; ++i)
      p.push_back(static_cast<int32_t>(rng.next_below(static_cast<uint64_t>(c.vocab_size))));
  }
  r.generated = generate(model, prompts, g);
  return r;
}

// Max |got - want| over max(max |want|, floor), 0 for empty vectors; infinity on NaN.
double rel_to_max(const std::vector<double>& got, const std::vector<double>& want,
                  double floor = 1e-30) {
  EXPECT_EQ(got.size(), want.size());
  double err = 0.0, scale = floor;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double d = std::abs(got[i] - want[i]);
    if (std::isnan(d)) return INFINITY;
    err = std::max(err, d);
    scale = std::max(scale, std::abs(want[i]));
  }
  return err / scale;
}

// --- the emulated device: bit for bit ----------------------------------------------------

class EmulatedDeviceModel : public ::testing::TestWithParam<std::string> {
 protected:
  // The CPU reference run and the emulated-device run of the same model.
  void SetUp() override {
    const ModelConfig c = config_named(GetParam());
    auto cpu = make_cpu_backend();
    testing::EmulatedDevice device;
    want = run_model(*cpu, c);
    got = run_model(device, c);
  }
  ModelRun want, got;
};

// Same ops on the same numbers: the loss, every log-prob and every gradient entry are equal.
TEST_P(EmulatedDeviceModel, LossAndEveryGradientEqualTheCpuRunBitForBit) {
  EXPECT_TRUE(std::isfinite(want.loss));
  EXPECT_EQ(got.loss, want.loss);
  EXPECT_EQ(got.logp, want.logp);
  ASSERT_EQ(got.grads.size(), want.grads.size());
  const ModelConfig c = config_named(GetParam());
  ModelWeights names;
  const std::vector<ParamSlot> slots = param_slots(c, names);
  double any_nonzero = 0.0;
  for (size_t i = 0; i < want.grads.size(); ++i) {
    EXPECT_EQ(got.grads[i], want.grads[i]) << slots[i].name;
    for (double v : want.grads[i]) any_nonzero = std::max(any_nonzero, std::abs(v));
  }
  EXPECT_GT(any_nonzero, 0.0);
}

TEST_P(EmulatedDeviceModel, AdamWStepEqualsTheCpuStepBitForBit) {
  EXPECT_EQ(got.params_after_step, want.params_after_step);
  EXPECT_EQ(got.exp_avg_sq, want.exp_avg_sq);
}

TEST_P(EmulatedDeviceModel, GreedyGenerationWithKvCacheEqualsTheCpuRun) {
  ASSERT_EQ(got.generated.size(), want.generated.size());
  for (size_t i = 0; i < want.generated.size(); ++i) {
    const GeneratedSequence &g = got.generated[i], &w = want.generated[i];
    EXPECT_EQ(w.response.size(), 9u) << "sequence " << i;
    EXPECT_EQ(g.response, w.response) << "sequence " << i;
    EXPECT_EQ(g.logp, w.logp) << "sequence " << i;
    EXPECT_EQ(g.model_logp, w.model_logp) << "sequence " << i;
    EXPECT_EQ(g.routes.ids, w.routes.ids) << "sequence " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Models, EmulatedDeviceModel, ::testing::Values("micro", "tiny"),
                         [](const auto& info) { return info.param; });

// The emulated device enforces what the CUDA backend does: host code cannot read its
// tensors, its ops take no host tensors, and copy() is the way between the two.
TEST(EmulatedDevice, RejectsHostAccessToDeviceTensorsAndHostTensorsInOps) {
  testing::EmulatedDevice device;
  Tensor d = device.upload(std::vector<double>{1.0, 2.0, 3.0}, {3}, DType::f32);
  EXPECT_EQ(d.device(), Device::cuda(0));
  EXPECT_THAT([&] { (void)d.data<float>(); },
              ThrowsMessage<Error>(AllOf(HasSubstr("Tensor::data"), HasSubstr("f32[3] on cuda"))));
  Tensor h = Tensor::zeros({3}, DType::f32);
  EXPECT_THAT([&] { device.axpy(d, 1.0, h); },
              ThrowsMessage<Error>(AllOf(HasSubstr("axpy"), HasSubstr("f32[3] on cpu"))));
  auto cpu = make_cpu_backend();
  EXPECT_THROW(cpu->axpy(h, 1.0, d), Error);  // the CPU backend cannot reach device memory
  device.copy(h, d);
  EXPECT_EQ(std::vector<float>(h.data<float>(), h.data<float>() + 3),
            (std::vector<float>{1.f, 2.f, 3.f}));
  EXPECT_EQ(device.sum_squares(d), 14.0);
}

// --- the real CUDA backend: f32 tolerances ------------------------------------------------

// cuBLAS and the CUDA kernels sum in other orders than the CPU reference, all in f32, and the
// differences compound over 3 layers. Tolerances (f32, no bf16 anywhere):
// - loss: 1e-4 relative;
// - log-probs: 1e-4 absolute (|logp| ~ log V, errors ~1e-6 expected);
// - each gradient tensor: 1e-3 of its largest |entry| (near-zero entries of a tensor
//   carry the cancellation error of its large ones);
// - AdamW's second moment (clipped g^2 scaled): 2e-3 of its largest entry;
// - parameters after the step: 1e-5 absolute wherever the gradient entry exceeds 1e-2 of its
//   tensor's largest |entry| (10x the gradient tolerance, so both runs agree on its sign) and
//   its clipped value exceeds 1e-6 (100 eps). Adam's first step is lr * g / (|g| + eps)
//   ~ lr * sign(g) there: the gradient error moves it by < lr * eps * 0.1 / |g| ~ 1e-6, plus
//   f32 rounding of parameters of size <= ~1. Entries with gradients at noise level may step
//   the other way and are not compared.
// Greedy generation takes argmaxes: a near-tie could flip a token and everything after it,
// so the first sequence's first token must match and the model log-probs of tokens the two
// runs agree on within 1e-3; fully diverging runs fail.
class CudaModel : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaModel, TrainingStepAndGenerationMatchTheCpuWithinF32Tolerances) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible: the model on CUDA not run";
  const ModelConfig c = config_named(GetParam());
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend(0);
  const ModelRun want = run_model(*cpu, c);
  const ModelRun got = run_model(*gpu, c);

  EXPECT_NEAR(got.loss, want.loss, 1e-4 * std::abs(want.loss));
  ASSERT_EQ(got.logp.size(), want.logp.size());
  for (size_t n = 0; n < want.logp.size(); ++n)
    EXPECT_NEAR(got.logp[n], want.logp[n], 1e-4) << "token " << n;

  ModelWeights names;
  const std::vector<ParamSlot> slots = param_slots(c, names);
  ASSERT_EQ(got.grads.size(), want.grads.size());
  for (size_t i = 0; i < want.grads.size(); ++i)
    EXPECT_LE(rel_to_max(got.grads[i], want.grads[i]), 1e-3) << slots[i].name;

  EXPECT_LE(rel_to_max(got.exp_avg_sq, want.exp_avg_sq), 2e-3);
  ASSERT_EQ(got.params_after_step.size(), want.params_after_step.size());
  double norm2 = 0.0;
  for (const std::vector<double>& g : want.grads)
    for (double v : g) norm2 += v * v;
  const double clip = std::min(1.0, 0.5 / std::sqrt(norm2));  // run_model's grad_clip 0.5
  int64_t compared = 0, off = 0;
  size_t flat = 0;  // the arena holds the slots in order
  for (const std::vector<double>& g : want.grads) {
    double g_max = 0.0;
    for (double v : g) g_max = std::max(g_max, std::abs(v));
    for (size_t j = 0; j < g.size(); ++j, ++flat) {
      const double a = std::abs(g[j]);
      if (!(a > 1e-2 * g_max && a * clip > 1e-6)) continue;
      ++compared;
      off += !(std::abs(got.params_after_step[flat] - want.params_after_step[flat]) <= 1e-5);
    }
  }
  EXPECT_GT(compared, 0);
  EXPECT_EQ(off, 0) << "of " << compared << " parameters with clear gradients differ after AdamW";

  ASSERT_EQ(got.generated.size(), want.generated.size());
  ASSERT_FALSE(want.generated[0].response.empty());
  EXPECT_EQ(got.generated[0].response[0], want.generated[0].response[0]);
  int64_t same = 0, total = 0;
  for (size_t i = 0; i < want.generated.size(); ++i) {
    const GeneratedSequence &g = got.generated[i], &w = want.generated[i];
    for (size_t t = 0; t < w.response.size() && t < g.response.size(); ++t) {
      ++total;
      if (g.response[t] != w.response[t]) break;  // a flipped near-tie: the rest diverges
      ++same;
      EXPECT_NEAR(g.model_logp[t], w.model_logp[t], 1e-3) << "sequence " << i << " token " << t;
    }
  }
  EXPECT_GT(same, total / 2) << "greedy generation on CUDA diverges from the CPU early";
}

INSTANTIATE_TEST_SUITE_P(Models, CudaModel, ::testing::Values("micro", "tiny"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace fm
