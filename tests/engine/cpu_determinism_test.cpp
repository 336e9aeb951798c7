// CPU ops give bit-identical results with 1, 2 and 3 OpenMP threads. Sizes are
// chosen so the work really splits: several GEMM tiles, several reduction chunks,
// many rows per scatter destination.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <functional>

#include "engine/backend.h"
#include "engine/rng.h"
#include "tests/engine/cpu_test_support.h"

namespace fm {
namespace {

using test::Tensors;

std::unique_ptr<Backend> g_cpu = make_cpu_backend();
Backend& cpu() {
  return *g_cpu;
}

// Runs `op` with 1, 2 and 3 threads; every output must match the 1-thread run bit for bit.
void expect_same_bits_for_any_thread_count(const std::function<Tensors()>& op) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const Tensors reference = op();
  for (int threads : {2, 3}) {
    omp_set_num_threads(threads);
    const Tensors outs = op();
    ASSERT_EQ(outs.size(), reference.size());
    for (size_t i = 0; i < outs.size(); ++i)
      EXPECT_TRUE(test::bitwise_equal(outs[i], reference[i]))
          << "output " << i << " differs with " << threads << " threads";
  }
  omp_set_num_threads(saved);
}

// 300 x 260 output with K = 70: 3 x 3 tiles of 128 x 128.
TEST(CpuDeterminism, MatmulIsBitIdenticalForAnyThreadCount) {
  Rng rng(31);
  const Tensor a = test::random_normal({70, 300}, rng, DType::f32);
  const Tensor b = test::random_normal({70, 260}, rng, DType::f32);
  const Tensor c0 = test::random_normal({300, 260}, rng, DType::f32);
  expect_same_bits_for_any_thread_count([&] {
    Tensor c = test::clone(c0);
    cpu().matmul(c, a, true, b, false, 1.0, 1.0);
    return Tensors{c};
  });
}

TEST(CpuDeterminism, GroupedWeightGradIsBitIdenticalForAnyThreadCount) {
  Rng rng(32);
  const std::vector<int64_t> off = {0, 100, 100, 400};
  const Tensor dy = test::random_normal({400, 150}, rng, DType::f32);
  const Tensor x = test::random_normal({400, 140}, rng, DType::f32);
  expect_same_bits_for_any_thread_count([&] {
    Tensor dw = Tensor::zeros({3, 150, 140}, DType::f32);
    cpu().grouped_weight_grad(dw, dy, x, off);
    return Tensors{dw};
  });
}

// Sequences of lengths 40, 1, 23 with grouped-query heads.
TEST(CpuDeterminism, AttentionBackwardIsBitIdenticalForAnyThreadCount) {
  Rng rng(33);
  const int64_t N = 64, Hq = 4, Hkv = 2, D = 16;
  const Tensor seq_off = test::int_tensor({4}, {0, 40, 41, 64});
  const Tensor q = test::random_normal({N, Hq, D}, rng, DType::f32);
  const Tensor k = test::random_normal({N, Hkv, D}, rng, DType::f32);
  const Tensor v = test::random_normal({N, Hkv, D}, rng, DType::f32);
  const Tensor dout = test::random_normal({N, Hq, D}, rng, DType::f32);
  expect_same_bits_for_any_thread_count([&] {
    Tensor out = Tensor::empty({N, Hq, D}, DType::f32), lse = Tensor::empty({N, Hq}, DType::f32);
    cpu().attention_forward(out, lse, q, k, v, seq_off, 0.25);
    Tensor dq = Tensor::empty(q.shape(), DType::f32), dk = Tensor::empty(k.shape(), DType::f32),
           dv = Tensor::empty(v.shape(), DType::f32);
    cpu().attention_backward(dq, dk, dv, dout, q, k, v, out, lse, seq_off, 0.25);
    return Tensors{out, lse, dq, dk, dv};
  });
}

// 600 source rows into 37 destinations: ~16 additions per destination row.
TEST(CpuDeterminism, ScatterAddRowsAndEmbeddingBackwardAreBitIdenticalForAnyThreadCount) {
  Rng rng(34);
  const Tensor src = test::random_normal({600, 48}, rng, DType::f32);
  const Tensor w = test::random_normal({600}, rng, DType::f32);
  const Tensor idx = test::random_ids({600}, rng, 37);
  expect_same_bits_for_any_thread_count([&] {
    Tensor dst = Tensor::zeros({37, 48}, DType::f32), dtable = Tensor::zeros({37, 48}, DType::f32);
    cpu().scatter_add_rows(dst, src, idx, w);
    cpu().embedding_backward(dtable, src, idx);
    return Tensors{dst, dtable};
  });
}

// 50000 elements: 13 chunks of the flat reduction; 200 columns: 4 column blocks.
TEST(CpuDeterminism, ReductionsAreBitIdenticalForAnyThreadCount) {
  Rng rng(35);
  const Tensor flat = test::random_normal({50000}, rng, DType::f32);
  const Tensor x = test::random_normal({250, 200}, rng, DType::f32);
  const Tensor w = test::random_normal({200}, rng, DType::f32);
  const Tensor dy = test::random_normal({250, 200}, rng, DType::f32);
  expect_same_bits_for_any_thread_count([&] {
    Tensor ss = Tensor::empty({1}, DType::f64);
    ss.data<double>()[0] = cpu().sum_squares(flat);
    Tensor colsum = Tensor::empty({200}, DType::f32);
    cpu().column_sum(colsum, x);
    Tensor y = Tensor::empty({250, 200}, DType::f32), rstd = Tensor::empty({250}, DType::f32);
    cpu().rmsnorm_forward(y, rstd, x, w, 1e-5);
    Tensor dx = Tensor::empty({250, 200}, DType::f32), dw = Tensor::zeros({200}, DType::f32);
    cpu().rmsnorm_backward(dx, dw, dy, x, w, rstd);
    return Tensors{ss, colsum, dx, dw};
  });
}

}  // namespace
}  // namespace fm
