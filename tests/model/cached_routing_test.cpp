// Where the KV-cached forward routes its tokens (MoeTransformer::CachedRouting): on the host
// (ids downloaded and permuted per MoE layer) or on the device (Backend::sort_assignments and
// grouped_matmul_device, one download of all layers' ids per call). Both must give the same
// logits and routes; the device path must not wait for the device once per layer.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "model/kv_cache.h"
#include "support/emulated_device.h"
#include "support/model_fixtures.h"

namespace fm {
namespace {

using Routing = MoeTransformer::CachedRouting;

struct CachedRun {
  std::vector<double> logits;    // every step's logit rows, concatenated
  std::vector<uint16_t> routes;  // every step's routes, concatenated
};

// Two sequences: a prefill of 6 and 4 tokens, then 4 decode steps of both.
std::vector<CachedInput> steps(const ModelConfig& c) {
  Rng rng(17, 3);
  auto token = [&] {
    return static_cast<int32_t>(rng.next_below(static_cast<uint64_t>(c.vocab_size)));
  };
  std::vector<CachedInput> out;
  CachedInput prefill;
  for (int32_t s = 0; s < 2; ++s)
    for (int32_t p = 0; p < (s == 0 ? 6 : 4); ++p) {
      prefill.tokens.push_back(token());
      prefill.slot.push_back(s);
      prefill.pos.push_back(p);
    }
  prefill.logit_rows = {5, 9};
  out.push_back(prefill);
  for (int32_t step = 0; step < 4; ++step)
    out.push_back({{token(), token()}, {0, 1}, {6 + step, 4 + step}, {0, 1}});
  return out;
}

CachedRun run(Backend& backend, const ModelConfig& c, DType compute, Routing routing) {
  MoeTransformer model(c, backend);
  model.init_weights(11);
  model.set_compute_dtype(compute);
  model.set_cached_routing(routing);
  KvCache cache(c, backend, compute, /*slots=*/2, /*max_len=*/16);
  CachedRun r;
  for (const CachedInput& in : steps(c)) {
    CachedOutput out;
    model.forward_cached(in, cache, out);
    const std::vector<double> l = backend.download_f64(out.logits);
    r.logits.insert(r.logits.end(), l.begin(), l.end());
    r.routes.insert(r.routes.end(), out.routes.begin(), out.routes.end());
  }
  return r;
}

class CachedRouting : public ::testing::TestWithParam<DType> {};

// On the CPU both paths run the same arithmetic (the Backend defaults sort on the host and
// call the same grouped GEMM): equal bit for bit, f32 and bf16 compute alike.
TEST_P(CachedRouting, DeviceAndHostRoutingGiveTheSameLogitsAndRoutes) {
  const ModelConfig c = testing::micro_config();
  auto cpu = make_cpu_backend();
  const CachedRun host = run(*cpu, c, GetParam(), Routing::host);
  const CachedRun device = run(*cpu, c, GetParam(), Routing::device);
  const CachedRun automatic = run(*cpu, c, GetParam(), Routing::automatic);
  ASSERT_FALSE(host.logits.empty());
  for (double v : host.logits) ASSERT_TRUE(std::isfinite(v));
  EXPECT_EQ(device.logits, host.logits);
  EXPECT_EQ(device.routes, host.routes);
  EXPECT_EQ(automatic.logits, host.logits);
  EXPECT_EQ(automatic.routes, host.routes);
  // The routes are real choices: more than one expert appears.
  EXPECT_NE(*std::min_element(host.routes.begin(), host.routes.end()),
            *std::max_element(host.routes.begin(), host.routes.end()));
}

INSTANTIATE_TEST_SUITE_P(Compute, CachedRouting, ::testing::Values(DType::f32, DType::bf16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// The emulated device counts device -> host copies (each one a wait for the stream on a GPU):
// a decode step routed on the device makes one (every layer's ids), routed on the host one per
// MoE layer. Its stale-memory fill (0xff) also shows any output the device ops leave unwritten.
TEST(CachedRouting, DeviceRoutedDecodeStepWaitsForTheDeviceOncePerCall) {
  const ModelConfig c = testing::micro_config();
  ASSERT_GE(c.n_moe_layers(), 2);
  auto cpu = make_cpu_backend();
  const CachedRun want = run(*cpu, c, DType::f32, Routing::host);
  for (const Routing routing : {Routing::host, Routing::device, Routing::automatic}) {
    testing::EmulatedDevice device;
    MoeTransformer model(c, device);
    model.init_weights(11);
    model.set_cached_routing(routing);
    KvCache cache(c, device, DType::f32, 2, 16);
    std::vector<uint16_t> routes;
    for (const CachedInput& in : steps(c)) {
      CachedOutput out;
      const int64_t before = device.downloads();
      model.forward_cached(in, cache, out);
      const int64_t waits = device.downloads() - before;
      const bool decode = in.tokens.size() == 2;
      // automatic: 10 prefill assignments (micro: top-2) are within 64 per expert too.
      const int64_t expected = routing == Routing::host ? c.n_moe_layers() : 1;
      EXPECT_EQ(waits, expected) << (decode ? "decode" : "prefill") << " routing "
                                 << static_cast<int>(routing);
      routes.insert(routes.end(), out.routes.begin(), out.routes.end());
    }
    EXPECT_EQ(routes, want.routes) << "routing " << static_cast<int>(routing);
  }
}

// defer_routes: forward_cached returns without a wait; finish_cached makes the one download.
TEST(CachedRouting, DeferredRoutesWaitOnlyInFinishCached) {
  const ModelConfig c = testing::micro_config();
  auto cpu = make_cpu_backend();
  const CachedRun want = run(*cpu, c, DType::f32, Routing::device);
  testing::EmulatedDevice device;
  MoeTransformer model(c, device);
  model.init_weights(11);
  KvCache cache(c, device, DType::f32, 2, 16);
  std::vector<uint16_t> routes;
  for (const CachedInput& in : steps(c)) {
    CachedOutput out;
    const int64_t before = device.downloads();
    model.forward_cached(in, cache, out, /*defer_routes=*/true);
    EXPECT_EQ(device.downloads(), before) << "forward_cached waited";
    ASSERT_TRUE(out.pending_ids.defined());
    model.finish_cached(out);
    EXPECT_EQ(device.downloads(), before + 1);
    EXPECT_FALSE(out.pending_ids.defined());
    routes.insert(routes.end(), out.routes.begin(), out.routes.end());
  }
  EXPECT_EQ(routes, want.routes);
}

// On the GPU the paths use different GEMMs (cuBLAS vs grouped_gemm.cu), so they agree to the
// GEMMs' tolerance: f32 logits within 1e-4 relative (two f32 GEMM orders, 3 layers), the
// same routes (a route flip needs two router probabilities within ~1e-6 of each other).
TEST(CudaCachedRouting, DeviceRoutingMatchesHostRoutingOnTheGpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible: device routing on CUDA not run";
  const ModelConfig c = testing::micro_config();
  auto gpu = make_cuda_backend(0);
  const CachedRun host = run(*gpu, c, DType::f32, Routing::host);
  const CachedRun device = run(*gpu, c, DType::f32, Routing::device);
  EXPECT_EQ(device.routes, host.routes);
  ASSERT_EQ(device.logits.size(), host.logits.size());
  for (size_t i = 0; i < host.logits.size(); ++i)
    EXPECT_NEAR(device.logits[i], host.logits[i], 1e-4 * (1 + std::abs(host.logits[i]))) << i;
  // bf16 compute: the tensor-core kernel against cuBLAS's bf16 grouped GEMM; logits (f32) within
  // a few bf16 roundings of activations of size ~1.
  const CachedRun host16 = run(*gpu, c, DType::bf16, Routing::host);
  const CachedRun device16 = run(*gpu, c, DType::bf16, Routing::device);
  ASSERT_EQ(device16.logits.size(), host16.logits.size());
  for (size_t i = 0; i < host16.logits.size(); ++i)
    EXPECT_NEAR(device16.logits[i], host16.logits[i], 5e-2 * (1 + std::abs(host16.logits[i]))) << i;
}

}  // namespace
}  // namespace fm
