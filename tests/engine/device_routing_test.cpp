// Routing kept on the device (the decode path): the expert permutation
// (engine/assignments.h, Backend::sort_assignments), the grouped GEMM with device-side
// offsets (Backend::grouped_matmul_device), the checks a device backend defers while its
// index checks are off (Backend::raise_deferred_errors), and the CUDA backend's one-launch
// grouped weight gradient (set_cuda_grouped_wgrad, the same kernel file), whose offsets the
// host uploads.
//
// The CPU tests pin the permutation's definition and check the Backend defaults (which the
// CPU backend uses) against the host forms. The CudaDeviceRouting tests run the CUDA kernels
// against the CPU and skip without a GPU. Tolerances:
// - the permutation and offsets: integers, equal.
// - bf16 GEMM (tensor cores, f32 accumulation, blocked differently from the CPU's BLAS):
//   rel 1e-2, scale sqrt(k) / 3 (the typical |y| for inputs in U(-1, 1)), as for the other
//   bf16 GEMMs (cuda_bf16_parity_test.cpp); plus one bf16 ulp for a bf16 output. A wrong
//   group, row or transpose errs by O(1).
// - f32 GEMM: the SIMT kernel sums k products in order; rel 1e-5 with scale sqrt(k) / 3
//   (k * 6e-8 of the terms' size, k <= 200). f64: rel 1e-12.
// - bf16 weight gradient dw[g] += dy_g^T x_g: rel 1e-2 as for the other bf16 GEMMs, scale
//   1 + sqrt(70) / 3 (dw's old value plus a sum of up to 70 products in U(-1, 1)); empty
//   groups unchanged bit for bit.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "engine/assignments.h"
#include "support/cuda_bf16.h"

namespace {

using fm::AssignmentOrder;
using fm::CudaGroupedWgrad;
using fm::DType;
using fm::Shape;
using fm::Tensor;
using fm::testing::Backends;
using fm::testing::check_op;
using fm::testing::expect_bitwise_equal;
using fm::testing::expect_error;
using fm::testing::expect_near;
using fm::testing::random;
using fm::testing::random_bf16;
using fm::testing::to_bf16;

// Expert ids [N, K], distinct within a token, uniform over [0, E).
std::vector<int32_t> random_routes(int64_t n, int64_t k, int64_t e, fm::Rng& rng) {
  std::vector<int32_t> ids;
  for (int64_t t = 0; t < n; ++t) {
    std::vector<int32_t> chosen;
    while (static_cast<int64_t>(chosen.size()) < k) {
      const auto id = static_cast<int32_t>(rng.next_below(static_cast<uint64_t>(e)));
      if (std::find(chosen.begin(), chosen.end(), id) == chosen.end()) chosen.push_back(id);
    }
    ids.insert(ids.end(), chosen.begin(), chosen.end());
  }
  return ids;
}

std::vector<int32_t> narrowed(const std::vector<int64_t>& v) {
  return std::vector<int32_t>(v.begin(), v.end());
}

// Runs be.sort_assignments on `key` [N, K] over `groups` keys; returns the three outputs.
AssignmentOrder run_sort(fm::Backend& be, const std::vector<int32_t>& key, int64_t k,
                         int64_t groups) {
  const auto nk = static_cast<int64_t>(key.size());
  Tensor offsets = be.empty({groups + 1}, DType::i32);
  Tensor assign = be.empty({nk}, DType::i32), token = be.empty({nk}, DType::i32);
  be.sort_assignments(offsets, assign, token, be.upload(key, {nk / k, k}));
  AssignmentOrder o;
  const std::vector<int32_t> off = be.download_i32(offsets);
  o.offsets.assign(off.begin(), off.end());
  o.assign = be.download_i32(assign);
  o.token = be.download_i32(token);
  return o;
}

// --- the permutation's definition (host) ---------------------------------------------------

TEST(DeviceRouting, SortAssignmentsIsAStableCountingSortByExpert) {
  // 3 tokens x K = 2 over 4 experts: assignments j = 0..5 with experts 2 0 | 2 3 | 0 2.
  const AssignmentOrder o = fm::sort_assignments_host({2, 0, 2, 3, 0, 2}, 4, 2, "test");
  EXPECT_EQ(o.offsets, (std::vector<int64_t>{0, 2, 2, 5, 6}));  // expert 1 is empty
  EXPECT_EQ(o.assign, (std::vector<int32_t>{1, 4, 0, 2, 5, 3}));
  EXPECT_EQ(o.token, (std::vector<int32_t>{0, 2, 0, 1, 2, 1}));
}

TEST(DeviceRouting, SortAssignmentsRejectsKeysOutOfRangeAndRaggedSizes) {
  expect_error(
      [] {
        fm::sort_assignments_host({1, 0, 4, 1}, 4, 2, "my op");
      },
      {"my op", "key[2] = 4", "[0, 4)"});
  expect_error([] { fm::sort_assignments_host({1, 0, -1, 1}, 4, 2, "my op"); }, {"key[2] = -1"});
  expect_error(
      [] {
        fm::sort_assignments_host({1, 0, 2}, 4, 2, "my op");
      },
      {"my op", "3 assignments"});
}

// --- the Backend defaults, which the CPU backend runs ----------------------------------------

TEST(DeviceRouting, CpuBackendSortsLikeTheHostForm) {
  auto cpu = fm::make_cpu_backend();
  fm::Rng rng(5);
  for (const auto& [n, k, e] : {std::tuple{37, 4, 16}, std::tuple{3, 8, 64}, std::tuple{0, 2, 8}}) {
    const std::vector<int32_t> key = random_routes(n, k, e, rng);
    const AssignmentOrder want = fm::sort_assignments_host(key, e, k, "want");
    const AssignmentOrder got = run_sort(*cpu, key, k, e);
    EXPECT_EQ(got.offsets, want.offsets) << n << " tokens";
    EXPECT_EQ(got.assign, want.assign) << n << " tokens";
    EXPECT_EQ(got.token, want.token) << n << " tokens";
  }
  Tensor off = cpu->empty({5}, DType::i32), a = cpu->empty({4}, DType::i32);
  Tensor t = cpu->empty({4}, DType::i32);
  expect_error(
      [&] {
        cpu->sort_assignments(off, a, t, cpu->upload({0, 1, 7, 2}, {2, 2}));
      },
      {"sort_assignments", "key[2] = 7"});
  expect_error(
      [&] {
        cpu->sort_assignments(off, a, t, cpu->upload({0, 1, 3}, {3, 1}));
      },
      {"sort_assignments", "i32 [3]"});
}

TEST(DeviceRouting, CpuGroupedMatmulWithDeviceOffsetsEqualsHostOffsets) {
  auto cpu = fm::make_cpu_backend();
  fm::Rng rng(6);
  const std::vector<int64_t> off = {0, 3, 3, 10, 11};
  const int64_t groups = 4, rows = off.back(), r = 6, s = 5;
  for (bool trans_w : {false, true}) {
    const int64_t k = trans_w ? s : r, n = trans_w ? r : s;
    const Tensor x = random({rows, k}, DType::f32, rng, -1, 1);
    const Tensor w = random({groups, r, s}, DType::f32, rng, -1, 1);
    Tensor want = Tensor::empty({rows, n}, DType::f32), got = Tensor::empty({rows, n}, DType::f32);
    cpu->grouped_matmul(want, x, w, trans_w, off);
    cpu->grouped_matmul_device(got, x, w, trans_w, cpu->upload(narrowed(off), {groups + 1}));
    fm::testing::expect_bitwise_equal(got, want, "trans_w " + std::to_string(trans_w));
  }
  Tensor y = Tensor::empty({rows, s}, DType::f32);
  expect_error(
      [&] {
        cpu->grouped_matmul_device(y, random({rows, r}, DType::f32, rng, -1, 1),
                                   random({groups, r, s}, DType::f32, rng, -1, 1), false,
                                   cpu->upload({0, 3, 2, 10, 11}, {groups + 1}));
      },
      {"grouped_matmul", "off"});
}

// --- CUDA kernels against the CPU ----------------------------------------------------------

TEST(CudaDeviceRouting, SortAssignmentsMatchesTheCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(7);
  // Decode batches (1, 64, 256 tokens x top-8 of 64), more experts than assignments (empty
  // groups), a prefill-sized batch (32768 x 8 over 128), no tokens, K = 1.
  for (const auto& [n, k, e] :
       {std::tuple{1, 8, 64}, std::tuple{64, 8, 64}, std::tuple{256, 8, 64}, std::tuple{5, 2, 200},
        std::tuple{32768, 8, 128}, std::tuple{0, 4, 16}, std::tuple{100, 1, 3}}) {
    const std::vector<int32_t> key = random_routes(n, k, e, rng);
    const AssignmentOrder want = fm::sort_assignments_host(key, e, k, "want");
    const AssignmentOrder got = run_sort(*b.gpu, key, k, e);
    const std::string what =
        std::to_string(n) + " x " + std::to_string(k) + " over " + std::to_string(e);
    EXPECT_EQ(got.offsets, want.offsets) << what;
    EXPECT_EQ(got.assign, want.assign) << what;
    EXPECT_EQ(got.token, want.token) << what;
  }
}

TEST(CudaDeviceRouting, BadKeysThrowWithChecksOnAndAreRaisedLaterWithChecksOff) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Backend& gpu = *b.gpu;
  const std::vector<int32_t> key = {0, 1, 2, 3, 9, 1};  // key[4] = 9 >= 4
  Tensor off = gpu.empty({5}, DType::i32), a = gpu.empty({6}, DType::i32);
  Tensor t = gpu.empty({6}, DType::i32);
  const Tensor k_dev = gpu.upload(key, {3, 2});
  expect_error([&] { gpu.sort_assignments(off, a, t, k_dev); },
               {"sort_assignments", "key[4] = 9", "[0, 4)"});
  {
    const fm::IndexChecksOff off_checks(gpu);
    gpu.sort_assignments(off, a, t, k_dev);  // no throw, no sync: the bad key sorts as 0
    const std::vector<int32_t> o = gpu.download_i32(off);
    EXPECT_EQ(o, (std::vector<int32_t>{0, 2, 4, 5, 6})) << "key 9 counted as 0";
    expect_error([&] { gpu.raise_deferred_errors(); }, {"sort_assignments", "key[4]"});
    gpu.raise_deferred_errors();  // reported once: the status is reset
  }
}

TEST(CudaDeviceRouting, TopkNanRowsAreRaisedLaterWithChecksOffAndGetIdsInRange) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Backend& gpu = *b.gpu;
  fm::Rng rng(8);
  Tensor scores = random({4, 16}, DType::f32, rng, 0, 1);
  scores.data<float>()[2 * 16 + 5] = std::nanf("");
  const Tensor s_dev = b.up(scores);
  Tensor ids = gpu.empty({4, 3}, DType::i32);
  expect_error([&] { gpu.topk(ids, s_dev, Tensor()); }, {"topk", "row 2", "NaN"});
  {
    const fm::IndexChecksOff off_checks(gpu);
    gpu.topk(ids, s_dev, Tensor());
    const std::vector<int32_t> got = gpu.download_i32(ids);
    EXPECT_EQ(std::vector<int32_t>(got.begin() + 6, got.begin() + 9),
              (std::vector<int32_t>{0, 1, 2}));
    Tensor want = Tensor::empty({1, 3}, DType::i32);
    b.cpu->topk(want, scores.slice(3, 4), Tensor());
    EXPECT_EQ(std::vector<int32_t>(got.begin() + 9, got.end()),
              std::vector<int32_t>(want.data<int32_t>(), want.data<int32_t>() + 3))
        << "the rows after the NaN row are still selected";
    expect_error([&] { gpu.raise_deferred_errors(); }, {"topk", "row 2", "NaN"});
    gpu.raise_deferred_errors();
  }
}

// Group sizes: empty groups, one row, a partial 16-row tile, several tiles (> the mean, so a
// block walks more than one), and the rest.
const std::vector<int64_t> kRows = {0, 1, 17, 40, 0, 5, 70, 2};

std::vector<int64_t> offsets_of(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> off = {0};
  for (int64_t m : sizes) off.push_back(off.back() + m);
  return off;
}

TEST(CudaDeviceRouting, GroupedMatmulBf16MatchesTheCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  const std::vector<int64_t> off = offsets_of(kRows);
  const auto groups = static_cast<int64_t>(kRows.size());
  const int64_t rows = off.back();
  uint64_t seed = 900;
  // (r, s): multiples of 8 (wide loads; k = 200 spans four k tiles, n = 96 two n tiles) and odd
  // sizes (element loads, zero padding in every tile).
  for (const auto& [r, s] : {std::pair{96, 200}, std::pair{37, 21}})
    for (DType y_type : {DType::bf16, DType::f32})
      for (bool trans_w : {false, true}) {
        fm::Rng rng(++seed);
        const int64_t k = trans_w ? s : r, n = trans_w ? r : s;
        const Tensor x = random_bf16({rows, k}, rng, -1, 1);
        const Tensor w = random_bf16({groups, r, s}, rng, -1, 1);
        const Tensor y0 = y_type == DType::bf16 ? to_bf16(Tensor::zeros({rows, n}, DType::f32))
                                                : Tensor::zeros({rows, n}, DType::f32);
        check_op(b,
                 "grouped_matmul_device " + std::to_string(r) + "x" + std::to_string(s) + " y " +
                     fm::dtype_name(y_type) + " trans_w " + std::to_string(trans_w),
                 {y0, x, w}, {{0, "y", 1e-2, std::sqrt(double(k)) / 3}},
                 [&](fm::Backend& be, std::vector<Tensor>& t) {
                   be.grouped_matmul_device(t[0], t[1], t[2], trans_w,
                                            be.upload(narrowed(off), {groups + 1}));
                 });
        // Checks off (the decode path): the same kernel, the offsets unread by the host.
        Tensor y = b.up(y0), y_trusted = b.up(y0);
        const Tensor xd = b.up(x), wd = b.up(w), od = b.gpu->upload(narrowed(off), {groups + 1});
        b.gpu->grouped_matmul_device(y, xd, wd, trans_w, od);
        {
          const fm::IndexChecksOff off_checks(*b.gpu);
          b.gpu->grouped_matmul_device(y_trusted, xd, wd, trans_w, od);
        }
        fm::testing::expect_bitwise_equal(b.down(y_trusted), b.down(y), "checks off");
      }
}

TEST(CudaDeviceRouting, GroupedMatmulF32AndF64MatchTheCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  const std::vector<int64_t> off = offsets_of(kRows);
  const auto groups = static_cast<int64_t>(kRows.size());
  const int64_t rows = off.back(), r = 24, s = 200;
  for (DType dt : {DType::f32, DType::f64})
    for (bool trans_w : {false, true}) {
      fm::Rng rng(950);
      const int64_t k = trans_w ? s : r, n = trans_w ? r : s;
      const Tensor x = random({rows, k}, dt, rng, -1, 1);
      const Tensor w = random({groups, r, s}, dt, rng, -1, 1);
      Tensor want = Tensor::empty({rows, n}, dt);
      b.cpu->grouped_matmul(want, x, w, trans_w, off);
      Tensor y = b.gpu->empty({rows, n}, dt);
      b.gpu->grouped_matmul_device(y, b.up(x), b.up(w), trans_w,
                                   b.gpu->upload(narrowed(off), {groups + 1}));
      fm::testing::expect_close(
          b.down(y), want, dt == DType::f32 ? 1e-5 : 1e-12, std::sqrt(double(k)) / 3,
          std::string(fm::dtype_name(dt)) + " trans_w " + std::to_string(trans_w));
    }
}

TEST(CudaDeviceRouting, GroupedMatmulChecksTheOffsetsWhileChecksAreOn) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(960);
  Tensor y = b.gpu->empty({10, 8}, DType::bf16);
  const Tensor x = b.up(random_bf16({10, 4}, rng, -1, 1));
  const Tensor w = b.up(random_bf16({2, 4, 8}, rng, -1, 1));
  expect_error(
      [&] {
        b.gpu->grouped_matmul_device(y, x, w, false, b.gpu->upload({0, 7, 9}, {3}));
      },
      {"grouped_matmul_device", "off", "rows = 10"});
  expect_error(
      [&] {
        b.gpu->grouped_matmul_device(y, x, w, false, b.gpu->upload({0, 7}, {2}));
      },
      {"grouped_matmul_device", "off"});
}

// --- the grouped weight gradient on our kernel (set_cuda_grouped_wgrad) -------------------

TEST(CudaGroupedWgrad, TheSwitchNeedsACudaBackend) {
  auto cpu = fm::make_cpu_backend();
  expect_error([&] { fm::set_cuda_grouped_wgrad(*cpu, CudaGroupedWgrad::kernel); },
               {"set_cuda_grouped_wgrad", "CUDA backend"});
}

// The kernel against the CPU (the reference) and against the cuBLAS path on the GPU, for an
// f32 and a bf16 dw. kRows has empty groups (left bit-unchanged) and groups of one to three
// 32-row chunks, some partial; (96, 200) takes the 16-byte loads and spans several 64 x 64
// tiles, (37, 21) the element loads with padding in every tile. The call counters show which
// path ran.
TEST(CudaGroupedWgrad, KernelMatchesTheCpuAndCublas) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;  // a fresh backend: its switch starts on the default, cuBLAS
  fm::Backend& gpu = *b.gpu;
  const std::vector<int64_t> off = offsets_of(kRows);
  const auto groups = static_cast<int64_t>(kRows.size());
  const int64_t rows = off.back();
  const double scale = 1.0 + std::sqrt(70.0) / 3;
  const fm::testing::Op wgrad = [&](fm::Backend& be, std::vector<Tensor>& t) {
    be.grouped_weight_grad(t[0], t[1], t[2], off);
  };
  uint64_t seed = 980;
  for (const auto& [r, s] : {std::pair{96, 200}, std::pair{37, 21}})
    for (DType dw_type : {DType::f32, DType::bf16}) {
      fm::Rng rng(++seed);
      const Tensor dy = random_bf16({rows, r}, rng, -1, 1);
      const Tensor x = random_bf16({rows, s}, rng, -1, 1);
      const Tensor dw0f = random({groups, r, s}, DType::f32, rng, -1, 1);
      const Tensor dw0 = dw_type == DType::bf16 ? to_bf16(dw0f) : dw0f;
      const std::string what =
          fmt::format("grouped_weight_grad {}x{} dw {}", r, s, fm::dtype_name(dw_type));

      fm::set_cuda_grouped_wgrad(gpu, CudaGroupedWgrad::kernel);
      const fm::CudaGemmStats before = fm::cuda_gemm_stats(gpu);
      check_op(b, what + " kernel vs CPU", {dw0, dy, x}, {{0, "dw", 1e-2, scale}}, wgrad);
      const fm::CudaGemmStats after = fm::cuda_gemm_stats(gpu);
      EXPECT_EQ(after.grouped_wgrad_kernel_calls - before.grouped_wgrad_kernel_calls, 1) << what;
      EXPECT_EQ(after.grouped_wgrad_cublas_calls, before.grouped_wgrad_cublas_calls) << what;

      // The kernel twice (deterministic: bit-identical) and cuBLAS, from the same dw0.
      const Tensor dyd = b.up(dy), xd = b.up(x);
      Tensor dw_kernel = b.up(dw0), dw_again = b.up(dw0), dw_cublas = b.up(dw0);
      gpu.grouped_weight_grad(dw_kernel, dyd, xd, off);
      gpu.grouped_weight_grad(dw_again, dyd, xd, off);
      fm::set_cuda_grouped_wgrad(gpu, CudaGroupedWgrad::cublas);
      gpu.grouped_weight_grad(dw_cublas, dyd, xd, off);
      EXPECT_EQ(fm::cuda_gemm_stats(gpu).grouped_wgrad_cublas_calls,
                after.grouped_wgrad_cublas_calls + 1)
          << what;
      const Tensor got = b.down(dw_kernel);
      expect_bitwise_equal(b.down(dw_again), got, what + ": the kernel run twice");
      expect_near(got, b.down(dw_cublas), 1e-2, scale, what + " kernel vs cuBLAS");
      for (int64_t g = 0; g < groups; ++g)
        if (kRows[static_cast<size_t>(g)] == 0)
          expect_bitwise_equal(got.row(g), dw0.row(g), what + fmt::format(": empty group {}", g));
    }

  // No rows at all: every group is empty and dw keeps its bits.
  fm::set_cuda_grouped_wgrad(gpu, CudaGroupedWgrad::kernel);
  fm::Rng rng(990);
  const Tensor dw0 = random({3, 5, 7}, DType::f32, rng, -1, 1);
  Tensor dw = b.up(dw0);
  gpu.grouped_weight_grad(dw, gpu.empty({0, 5}, DType::bf16), gpu.empty({0, 7}, DType::bf16),
                          {0, 0, 0, 0});
  expect_bitwise_equal(b.down(dw), dw0, "no rows");
  fm::set_cuda_grouped_wgrad(gpu, CudaGroupedWgrad::cublas);  // the default again
}

}  // namespace
