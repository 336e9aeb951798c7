// The CUDA backend's dense matmul on cuBLASLt (engine/cuda/gemm_lt.h) and on classic cuBLAS
// (set_cuda_dense_gemm): both against the CPU on the same values widened to f32, in f32 and
// in bf16 with a bf16 or f32 output, for every transpose pair, beta 0 and 1 (the residual add
// the layers fuse into the GEMM), odd and aligned shapes, and operands that are row views at
// 2- and 4-byte-aligned addresses (cuBLASLt's plans are built per alignment). The call
// counters show which API ran, so a silent fallback to classic cuBLAS fails the test; a
// shape's plan is built once and its repeats are bit-identical.
// Tolerances as in cuda_parity_test.cpp (f32 GEMMs: rel 1e-4, scale sqrt(K) / 3) and
// cuda_bf16_parity_test.cpp (bf16: rel 1e-2 plus one bf16 spacing).
// Skips without a GPU, except the check that the switch refuses a CPU backend.
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "support/cuda_bf16.h"

namespace {

using fm::CudaDenseGemm;
using fm::DType;
using fm::Shape;
using fm::Tensor;
using fm::testing::Backends;
using fm::testing::check_op;
using fm::testing::expect_bitwise_equal;
using fm::testing::random;
using fm::testing::to_bf16;

struct Types {
  DType ab, c;
};
const Types kTypes[] = {
    {DType::f32, DType::f32}, {DType::bf16, DType::bf16}, {DType::bf16, DType::f32}};

double rel_for(DType ab) {
  return ab == DType::bf16 ? 1e-2 : 1e-4;
}

Tensor random_of(DType dt, const Shape& shape, fm::Rng& rng) {
  const Tensor f = random(shape, DType::f32, rng, -1, 1);
  return dt == DType::bf16 ? to_bf16(f) : f;
}

std::string name(CudaDenseGemm api) {
  return api == CudaDenseGemm::lt ? "cuBLASLt" : "classic";
}

TEST(CudaGemmLt, TheSwitchNeedsACudaBackend) {
  auto cpu = fm::make_cpu_backend();
  EXPECT_THROW(fm::set_cuda_dense_gemm(*cpu, CudaDenseGemm::classic), fm::Error);
  EXPECT_THROW(fm::cuda_gemm_stats(*cpu), fm::Error);
}

// Every type, transpose pair, beta and API; for shapes whose rows are 16-byte multiples the
// cuBLASLt runs must not fall back.
TEST(CudaGemmLt, BothApisMatchTheCpuAcrossTypesAndLayouts) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  uint64_t seed = 700;
  struct Dims {
    int64_t m, n, k;
    bool aligned;
  };
  for (const Dims d : {Dims{37, 53, 129, false}, Dims{64, 96, 256, true}})
    for (const Types t : kTypes)
      for (const CudaDenseGemm api : {CudaDenseGemm::lt, CudaDenseGemm::classic})
        for (bool ta : {false, true})
          for (bool tb : {false, true})
            for (double beta : {0.0, 1.0}) {
              fm::set_cuda_dense_gemm(*b.gpu, api);
              fm::Rng rng(++seed);
              const Tensor a = random_of(t.ab, ta ? Shape{d.k, d.m} : Shape{d.m, d.k}, rng);
              const Tensor bm = random_of(t.ab, tb ? Shape{d.n, d.k} : Shape{d.k, d.n}, rng);
              const Tensor c0 = random_of(t.c, {d.m, d.n}, rng);
              const fm::CudaGemmStats before = fm::cuda_gemm_stats(*b.gpu);
              const std::string what =
                  fmt::format("{} {}x{}x{} {}->{} ta {} tb {} beta {}", name(api), d.m, d.n, d.k,
                              dtype_name(t.ab), dtype_name(t.c), ta, tb, beta);
              check_op(b, what, {c0, a, bm},
                       {{0, "c", rel_for(t.ab), std::sqrt(static_cast<double>(d.k)) / 3}},
                       [&](fm::Backend& be, std::vector<Tensor>& x) {
                         be.matmul(x[0], x[1], ta, x[2], tb, 0.75, beta);
                       });
              const fm::CudaGemmStats after = fm::cuda_gemm_stats(*b.gpu);
              if (api == CudaDenseGemm::classic) {
                EXPECT_EQ(after.classic_calls - before.classic_calls, 1) << what;
                EXPECT_EQ(after.lt_calls, before.lt_calls) << what;
              } else if (d.aligned) {
                EXPECT_EQ(after.lt_calls - before.lt_calls, 1) << what;
                EXPECT_EQ(after.lt_fallbacks, before.lt_fallbacks) << what;
              } else {  // odd strides: cuBLASLt or, where it has no algorithm, classic cuBLAS
                EXPECT_EQ(
                    after.lt_calls + after.lt_fallbacks - before.lt_calls - before.lt_fallbacks, 1)
                    << what;
              }
            }
}

// Operands and output that start 2 or 4 bytes past a 256-byte boundary (row views of a
// larger matrix with an odd row length), as the LM head's row chunks and sliced activations
// are: a plan for the weaker alignment, results as the CPU's.
TEST(CudaGemmLt, RowViewsAtOddAddressesMatchTheCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  const int64_t m = 33, n = 45, k = 77;
  for (const Types t : kTypes) {
    fm::Rng rng(800 + static_cast<int>(t.ab) * 3 + static_cast<int>(t.c));
    const Tensor a_host = random_of(t.ab, {m + 1, k}, rng);
    const Tensor b_host = random_of(t.ab, {n + 1, k}, rng);
    const Tensor c_host = random_of(t.c, {m + 1, n}, rng);
    Tensor a_dev = b.up(a_host), b_dev = b.up(b_host), c_dev = b.up(c_host);
    const Tensor a_view = a_dev.slice(1, m + 1), b_view = b_dev.slice(1, n + 1);
    Tensor c_view = c_dev.slice(1, m + 1);
    const fm::CudaGemmStats before = fm::cuda_gemm_stats(*b.gpu);
    b.gpu->matmul(c_view, a_view, false, b_view, true, 1.0, 1.0);
    const fm::CudaGemmStats after = fm::cuda_gemm_stats(*b.gpu);
    EXPECT_EQ(after.lt_calls + after.lt_fallbacks - before.lt_calls - before.lt_fallbacks, 1);

    Tensor a_cpu = fm::testing::widened(a_host).slice(1, m + 1);
    Tensor b_cpu = fm::testing::widened(b_host).slice(1, n + 1);
    Tensor c_cpu = fm::testing::widened(c_host);
    Tensor c_cpu_view = c_cpu.slice(1, m + 1);
    b.cpu->matmul(c_cpu_view, a_cpu, false, b_cpu, true, 1.0, 1.0);
    const std::string what = fmt::format("row views {}->{}", dtype_name(t.ab), dtype_name(t.c));
    fm::testing::expect_near(b.down(c_dev), fm::testing::reference(c_cpu, t.c), rel_for(t.ab),
                             std::sqrt(static_cast<double>(k)) / 3, what);
  }
}

// beta = 0 writes c without reading it (BLAS semantics): a NaN-filled c, as a fresh
// allocation may hold, must not leak into the result.
TEST(CudaGemmLt, BetaZeroNeverReadsC) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(950);
  for (const Types t : kTypes) {
    const Tensor a = b.up(random_of(t.ab, {64, 128}, rng));
    const Tensor w = b.up(random_of(t.ab, {96, 128}, rng));
    Tensor c = b.gpu->empty({64, 96}, t.c);
    b.gpu->fill(c, std::numeric_limits<double>::quiet_NaN());
    b.gpu->matmul(c, a, false, w, true, 1.0, 0.0);
    const Tensor host = fm::testing::widened(b.down(c));
    int64_t nan = 0;
    for (int64_t i = 0; i < host.numel(); ++i) nan += std::isnan(host.data<float>()[i]);
    EXPECT_EQ(nan, 0) << dtype_name(t.ab) << "->" << dtype_name(t.c);
  }
}

// A shape's second call reuses its plan and gives the first call's bits.
TEST(CudaGemmLt, PlansAreBuiltOnceAndRepeatBitExactly) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(900);
  for (const Types t : kTypes) {
    const Tensor a = b.up(random_of(t.ab, {128, 512}, rng));
    const Tensor w = b.up(random_of(t.ab, {384, 512}, rng));
    Tensor c1 = b.gpu->empty({128, 384}, t.c), c2 = b.gpu->empty({128, 384}, t.c);
    b.gpu->matmul(c1, a, false, w, true);
    const fm::CudaGemmStats first = fm::cuda_gemm_stats(*b.gpu);
    b.gpu->matmul(c2, a, false, w, true);
    const fm::CudaGemmStats second = fm::cuda_gemm_stats(*b.gpu);
    EXPECT_EQ(second.lt_calls - first.lt_calls, 1);
    EXPECT_EQ(second.lt_plans, first.lt_plans) << "the second call built a new plan";
    expect_bitwise_equal(b.down(c2), b.down(c1),
                         fmt::format("repeat {}->{}", dtype_name(t.ab), dtype_name(t.c)));
  }
}

}  // namespace
