// cuDNN's fused attention on the CUDA backend (engine/cuda/cudnn_sdpa.h, the bf16 default in
// builds with cuDNN): attention_forward and attention_backward with bf16 q, k, v against the
// CPU's f32 attention on the same values widened to f32, over packed batches with an empty
// sequence, grouped-query heads, a sequence longer than one S bound, and head dims 64 and 128;
// the call counts prove cuDNN ran each call (no silent fallback to foremoe's kernel). Skips
// without a GPU, or in builds without cuDNN.
//
// Tolerances, |cuda - cpu| <= ulp + rel * max|cpu| per output (one bf16 spacing for bf16):
// - out, rel 1e-2: flash attention rounds the probabilities to bf16 before P V (relative
//   error 2^-9 each, so at most 2^-9 of sum |P| |v| <= 1 for v in [-1, 1]), then rounds out.
// - lse (f32), rel 1e-4 of max(|lse|, 1): the scores are exact bf16 products summed in f32
//   in another order (~1e-6); a log2-based or unscaled statistic would be off by O(1).
// - dq, dk, dv, rel 3e-2 of the largest entry: dS = P (dP - delta) and P are rounded to bf16
//   before the three backward matmuls (2^-9 relative each, summed over up to 300 keys and 4
//   query heads per key head) -- a wrong mask, head mapping or scale errs by O(1).
#include <dlfcn.h>
#include <fmt/format.h>
#include <gmock/gmock.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "engine/cuda/cudnn_sdpa.h"
#include "engine/cuda/sdpa_layout.h"
#include "support/cuda_bf16.h"

namespace {

using fm::DType;
using fm::Tensor;
using fm::testing::Backends;
using fm::testing::i32_tensor;
using fm::testing::random_bf16;
using fm::testing::to_bf16;
using fm::testing::value;
using fm::testing::widened;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

#define FM_SKIP_WITHOUT_CUDNN()                                                           \
  FM_SKIP_WITHOUT_GPU();                                                                  \
  if (!fm::cuda_has_cudnn())                                                              \
  GTEST_SKIP() << "this build has no cuDNN (configured without it): cuDNN attention not " \
                  "run"

// max |got - want| <= ulp(want) + rel * max(max |want|, floor), over every element.
void expect_within(const Tensor& got, const Tensor& want, double rel, double floor,
                   const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  double largest = floor;
  for (int64_t i = 0; i < want.numel(); ++i) largest = std::max(largest, std::abs(value(want, i)));
  const bool bf16 = got.dtype() == DType::bf16;
  int64_t bad = 0, first = -1;
  for (int64_t i = 0; i < want.numel(); ++i) {
    const double w = value(want, i), g = value(got, i);
    const double allowed = (bf16 ? fm::testing::bf16_ulp(w) : 0.0) + rel * largest;
    if (!(std::abs(g - w) <= allowed) && bad++ == 0) first = i;
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.numel()
                    << " outside tolerance; first at " << first << " (cuda "
                    << (first >= 0 ? value(got, first) : 0.0) << ", cpu "
                    << (first >= 0 ? value(want, first) : 0.0) << ", largest |cpu| " << largest
                    << ")";
}

struct Case {
  const char* name;
  std::vector<int32_t> seq_off;
  int64_t hq, hkv, dim;
};

class CudaCudnnAttention : public ::testing::TestWithParam<Case> {};

TEST_P(CudaCudnnAttention, ForwardAndBackwardMatchTheCpuAndRunOnCudnn) {
  FM_SKIP_WITHOUT_CUDNN();
  const Case& c = GetParam();
  Backends b;
  fm::set_cuda_attention(*b.gpu, fm::CudaAttention::cudnn);
  fm::Rng rng(4100 + c.dim + c.hq);
  const int64_t n = c.seq_off.back();
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  const Tensor seq_off = i32_tensor(c.seq_off);
  const Tensor q = random_bf16({n, c.hq, c.dim}, rng, -1, 1);
  const Tensor k = random_bf16({n, c.hkv, c.dim}, rng, -1, 1);
  const Tensor v = random_bf16({n, c.hkv, c.dim}, rng, -1, 1);
  const Tensor dout = random_bf16({n, c.hq, c.dim}, rng, -1, 1);

  // The CPU reference in f32 on the widened values.
  Tensor out_cpu = Tensor::empty({n, c.hq, c.dim}, DType::f32);
  Tensor lse_cpu = Tensor::empty({n, c.hq}, DType::f32);
  b.cpu->attention_forward(out_cpu, lse_cpu, widened(q), widened(k), widened(v), seq_off, scale);
  const Tensor out16 = to_bf16(out_cpu);  // what the backward reads, as the model keeps it
  Tensor dq_cpu = Tensor::empty({n, c.hq, c.dim}, DType::f32);
  Tensor dk_cpu = Tensor::empty({n, c.hkv, c.dim}, DType::f32);
  Tensor dv_cpu = Tensor::empty({n, c.hkv, c.dim}, DType::f32);
  b.cpu->attention_backward(dq_cpu, dk_cpu, dv_cpu, widened(dout), widened(q), widened(k),
                            widened(v), widened(out16), lse_cpu, seq_off, scale);

  const Tensor q_d = b.up(q), k_d = b.up(k), v_d = b.up(v), off_d = b.up(seq_off);
  Tensor out = b.gpu->empty({n, c.hq, c.dim}, DType::bf16);
  Tensor lse = b.gpu->empty({n, c.hq}, DType::f32);
  b.gpu->attention_forward(out, lse, q_d, k_d, v_d, off_d, scale);
  expect_within(b.down(out), to_bf16(out_cpu), 1e-2, 0.0, std::string(c.name) + " out");
  expect_within(b.down(lse), lse_cpu, 1e-4, 1.0, std::string(c.name) + " lse");

  Tensor dq = b.gpu->empty({n, c.hq, c.dim}, DType::bf16);
  Tensor dk = b.gpu->empty({n, c.hkv, c.dim}, DType::bf16);
  Tensor dv = b.gpu->empty({n, c.hkv, c.dim}, DType::bf16);
  b.gpu->attention_backward(dq, dk, dv, b.up(dout), q_d, k_d, v_d, b.up(out16), b.up(lse_cpu),
                            off_d, scale);
  expect_within(b.down(dq), to_bf16(dq_cpu), 3e-2, 0.0, std::string(c.name) + " dq");
  expect_within(b.down(dk), to_bf16(dk_cpu), 3e-2, 0.0, std::string(c.name) + " dk");
  expect_within(b.down(dv), to_bf16(dv_cpu), 3e-2, 0.0, std::string(c.name) + " dv");

  const fm::CudaAttentionStats s = fm::cuda_attention_stats(*b.gpu);
  EXPECT_EQ(s.cudnn_forward, 1) << s.last_fallback;
  EXPECT_EQ(s.cudnn_backward, 1) << s.last_fallback;
  EXPECT_EQ(s.kernel_forward + s.kernel_backward + s.cudnn_fallbacks, 0) << s.last_fallback;
  EXPECT_EQ(s.cudnn_plans, 2);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaCudnnAttention,
    ::testing::Values(
        // an empty sequence between two; 4 query heads per key head
        Case{"gqa_d64", {0, 17, 17, 40, 97}, 8, 2, 64},
        // one sequence past the first S bound (300 -> 512), one of a single token
        Case{"long_d128", {0, 300, 301}, 4, 4, 128},
        // one sequence, multi-query
        Case{"mqa_d64", {0, 130}, 4, 1, 64}),
    [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

// Batches with the same sequence count and S bound share a plan; a new bound builds one more.
TEST(CudaCudnnAttentionPlans, OnePlanPerBatchSizeAndLengthBound) {
  FM_SKIP_WITHOUT_CUDNN();
  Backends b;
  fm::Rng rng(4200);
  const int64_t hq = 4, hkv = 2, d = 64;
  const auto forward = [&](const std::vector<int32_t>& offsets) {
    const int64_t n = offsets.back();
    Tensor out = b.gpu->empty({n, hq, d}, DType::bf16);
    Tensor lse = b.gpu->empty({n, hq}, DType::f32);
    b.gpu->attention_forward(out, lse, b.up(random_bf16({n, hq, d}, rng, -1, 1)),
                             b.up(random_bf16({n, hkv, d}, rng, -1, 1)),
                             b.up(random_bf16({n, hkv, d}, rng, -1, 1)), b.up(i32_tensor(offsets)),
                             0.125);
  };
  forward({0, 10, 50});  // 2 sequences, bound 64
  forward({0, 60, 64});  // same
  EXPECT_EQ(fm::cuda_attention_stats(*b.gpu).cudnn_plans, 1);
  forward({0, 10, 110});  // bound 128
  const fm::CudaAttentionStats s = fm::cuda_attention_stats(*b.gpu);
  EXPECT_EQ(s.cudnn_plans, 2);
  EXPECT_EQ(s.cudnn_forward, 3) << s.last_fallback;
}

// A head dim cuDNN does not take runs on foremoe's kernel, counted with its reason, and still
// matches the kernel path's bits (it is that path).
TEST(CudaCudnnAttentionPlans, HeadDimNotAMultipleOf8FallsBackToTheKernel) {
  FM_SKIP_WITHOUT_CUDNN();
  Backends b;
  fm::Rng rng(4300);
  const int64_t n = 20, hq = 2, d = 20;
  const Tensor q = b.up(random_bf16({n, hq, d}, rng, -1, 1));
  const Tensor kv = b.up(random_bf16({n, hq, d}, rng, -1, 1));
  const Tensor off = b.up(i32_tensor({0, 7, 20}));
  Tensor out = b.gpu->empty({n, hq, d}, DType::bf16), lse = b.gpu->empty({n, hq}, DType::f32);
  b.gpu->attention_forward(out, lse, q, kv, kv, off, 0.2);
  const fm::CudaAttentionStats s = fm::cuda_attention_stats(*b.gpu);
  EXPECT_EQ(s.cudnn_fallbacks, 1);
  EXPECT_EQ(s.kernel_forward, 1);
  EXPECT_THAT(s.last_fallback, HasSubstr("multiple of 8"));

  fm::set_cuda_attention(*b.gpu, fm::CudaAttention::kernel);
  Tensor out2 = b.gpu->empty({n, hq, d}, DType::bf16), lse2 = b.gpu->empty({n, hq}, DType::f32);
  b.gpu->attention_forward(out2, lse2, q, kv, kv, off, 0.2);
  fm::testing::expect_bitwise_equal(b.down(out), b.down(out2), "fallback out is the kernel's");
  EXPECT_EQ(fm::cuda_attention_stats(*b.gpu).cudnn_fallbacks, 1);  // the kernel path: no try
}

// Runs everywhere: the host side of the ragged layout. Empty sequences are dropped (they hold
// no rows), offsets count elements of each tensor family, and the length bound is the next
// power of two from 64.
TEST(CudnnSdpaLayout, DropsEmptySequencesAndCountsOffsetsInElements) {
  using fm::cuda::sdpa_layout;
  const fm::cuda::SdpaLayout l = sdpa_layout({0, 17, 17, 40, 97}, 8, 2, 64);
  EXPECT_EQ(l.batch, 3);
  EXPECT_EQ(l.max_len, 64);
  EXPECT_EQ(l.seq_len, (std::vector<int32_t>{17, 23, 57}));
  EXPECT_EQ(l.offsets, (std::vector<int64_t>{0, 17 * 512, 40 * 512, 97 * 512,  // q, out
                                             0, 17 * 128, 40 * 128, 97 * 128,  // k, v
                                             0, 17 * 8, 40 * 8, 97 * 8}));     // lse
  // B + 1 = 3 is odd: each segment is padded to 4 entries, so kv and stats start 16-byte
  // aligned in the one buffer.
  const fm::cuda::SdpaLayout odd = sdpa_layout({0, 300, 301}, 4, 4, 128);
  EXPECT_EQ(odd.max_len, 512);
  EXPECT_EQ(odd.segment, 4);
  EXPECT_EQ(odd.offsets, (std::vector<int64_t>{0, 300 * 512, 301 * 512, 0,  // q, out
                                               0, 300 * 512, 301 * 512, 0,  // k, v
                                               0, 300 * 4, 301 * 4, 0}));   // lse
  EXPECT_EQ(sdpa_layout({0, 0, 0}, 4, 4, 128).batch, 0);
  for (auto [longest, bound] :
       {std::pair<int64_t, int64_t>{1, 64}, {64, 64}, {65, 128}, {4096, 4096}, {4097, 8192}})
    EXPECT_EQ(fm::cuda::sdpa_length_bound(longest), bound) << longest;
}

// The problems the graph checks cover: the GPU tests' shapes and the presets' (small: Hq 12,
// Hkv 4, D 64; mid: Hq 10, Hkv 2, D 128) at the benchmark's batches.
struct GraphCase {
  int64_t batch, max_len, hq, hkv, dim;
};
const GraphCase kGraphCases[] = {{3, 64, 8, 2, 64},
                                 {2, 512, 4, 4, 128},
                                 {1, 256, 4, 1, 64},
                                 {16, 1024, 12, 4, 64},
                                 {4, 4096, 10, 2, 128}};

std::string describe(const fm::cuda::SdpaProblem& p, bool deterministic) {
  return fmt::format("{} B={} S={} Hq={} Hkv={} D={}{}", p.backward ? "backward" : "forward",
                     p.batch, p.max_len, p.hq, p.hkv, p.dim,
                     deterministic ? "" : " (f32 dQ buffer)");
}

// Runs without a GPU wherever cuDNN is built (CI too): cuDNN finalises every tensor and
// operation descriptor of both graphs, and the operation graphs themselves -- which checks
// each matmul's, pointwise op's, reduction's and reshape's shapes, types and broadcasts, and
// the ragged offsets' links (a V in place of K^T in the forward's second matmul, say, is
// refused with the dimension check that failed).
TEST(CudnnSdpaGraph, EveryOperationFinalisesWithoutADevice) {
  if (!fm::cuda::CudnnSdpa::available())
    GTEST_SKIP() << "this build has no cuDNN: its graphs not checked";
  for (const GraphCase& c : kGraphCases)
    for (bool backward : {false, true})
      for (bool deterministic : {true, false}) {
        if (!backward && !deterministic) continue;
        const fm::cuda::SdpaProblem p{backward, c.batch, c.max_len, c.hq, c.hkv, c.dim};
        const fm::cuda::SdpaCheck check = fm::cuda::CudnnSdpa::check_graph(p, deterministic);
        EXPECT_EQ(check.refusal, "") << describe(p, deterministic);
        // forward: 20 operations; backward: 27 (+1 converting the f32 dQ buffer), +2
        // reductions over head groups when Hq > Hkv.
        const size_t want = !backward ? 20 : 27 + (deterministic ? 0 : 1) + (c.hq > c.hkv ? 2 : 0);
        EXPECT_EQ(check.operations, want) << describe(p, deterministic);
      }
}

// An H100 SXM (80 GB HBM3) described the way cuDNN's device-properties descriptor reads it
// (its fields are cudaDeviceGetAttribute's values on that GPU: 132 SMs, 227 KiB of opt-in
// shared memory per block, 50 MiB of L2, compute capability 9.0), so cuDNN can choose an
// engine and compile a plan for it on a machine without one ("deviceless" compilation).
constexpr const char* kH100Properties = R"({
  "deviceName": "NVIDIA H100 80GB HBM3", "deviceVer": 900, "driverVer": 13000,
  "cudaDeviceId": 0, "pciDeviceId": 9008, "isTccDriver": 0, "supportCoopLaunch": 1,
  "multiProcessorCount": 132, "warpSize": 32, "maxGridSize": [2147483647, 65535, 65535],
  "maxBlockSize": [1024, 1024, 64], "maxThreadsPerBlock": 1024, "maxThreadsPerSM": 2048,
  "maxCtasPerSM": 32, "regsPerBlock": 65536, "maxRegistersPerSM": 65536,
  "maxSharedMemoryPerBlock": 49152, "maxSharedMemoryPerBlockOptin": 232448,
  "reservedSharedMemoryPerBlock": 1024, "l2CacheSize": 52428800,
  "totalGlobalMem": 85017624576, "smClockRateKHz": 1980000, "memClockRateKHz": 2619000
})";

// cuDNN compiles its fused kernels through the CUDA driver library: the real one where a GPU
// driver is installed, else the toolkit's stub (which can compile but not load a kernel),
// loaded here before cuDNN looks for it. "" when neither is found.
std::string load_cuda_driver() {
  if (dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL) != nullptr) return "libcuda.so.1";
  for (const char* stub : {"/usr/local/cuda/lib64/stubs/libcuda.so",
                           "/usr/local/cuda/targets/x86_64-linux/lib/stubs/libcuda.so"})
    if (dlopen(stub, RTLD_NOW | RTLD_GLOBAL) != nullptr) return stub;
  return "";
}

// Runs without a GPU wherever cuDNN and a CUDA driver library (or the toolkit's stub) are
// present, CI included: for an H100, cuDNN's heuristics offer an engine for each graph, that
// engine accepts the graph as its pattern and its kernel compiles for sm_90 (loaded too where
// the driver is real). A graph the fused engines do not recognise gets no engine, or one that
// fails to compile. This is the build machine's cuDNN; the GPU tests above check the GPU's.
TEST(CudnnSdpaGraph, FusedEnginesCompileThePlansForAnH100WithoutTheDevice) {
  if (!fm::cuda::CudnnSdpa::available())
    GTEST_SKIP() << "this build has no cuDNN: its plans not checked";
  const std::string driver = load_cuda_driver();
  if (driver.empty())
    GTEST_SKIP() << "no CUDA driver library nor the toolkit's stub: cuDNN cannot compile here";
  std::set<int64_t> forward_engines, backward_engines;
  for (const GraphCase& c : kGraphCases)
    for (bool backward : {false, true})
      for (bool deterministic : {true, false}) {
        if (!backward && !deterministic) continue;
        const fm::cuda::SdpaProblem p{backward, c.batch, c.max_len, c.hq, c.hkv, c.dim};
        const fm::cuda::SdpaCheck check =
            fm::cuda::CudnnSdpa::check_graph(p, deterministic, kH100Properties);
        EXPECT_EQ(check.refusal, "") << describe(p, deterministic) << " (driver " << driver << ")";
        EXPECT_GE(check.engine, 0) << describe(p, deterministic);
        (backward ? backward_engines : forward_engines).insert(check.engine);
      }
  // The forward and the backward are different fused kernels: no engine serves both.
  for (int64_t e : forward_engines) EXPECT_EQ(backward_engines.count(e), 0u) << "engine " << e;
}

// Runs everywhere: the switch is for CUDA backends only, and cuDNN only where built.
TEST(CudaCudnnAttentionSwitch, RefusesOtherBackendsAndMissingCudnn) {
  const auto cpu = fm::make_cpu_backend();
  EXPECT_THAT([&] { fm::set_cuda_attention(*cpu, fm::CudaAttention::kernel); },
              ThrowsMessage<fm::Error>(HasSubstr("set_cuda_attention")));
  EXPECT_THAT([&] { (void)fm::cuda_attention_stats(*cpu); },
              ThrowsMessage<fm::Error>(HasSubstr("cuda_attention_stats")));
  EXPECT_THAT([&] { fm::set_cuda_attention(*cpu, fm::CudaAttention::cudnn); },
              ThrowsMessage<fm::Error>(HasSubstr("set_cuda_attention")));
}

}  // namespace
