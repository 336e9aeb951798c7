// CUDA backend parity: every op the CUDA backend implements runs on the CPU
// reference backend and on the CUDA backend from the same random inputs
// (fm::Rng, fixed seeds); the CUDA result, copied back, must match the CPU one
// within a stated tolerance. Without a visible GPU every test skips, so this
// file builds and runs in CPU-only builds too (it uses only backend.h).
//
// Tolerances. The comparison is |cuda - cpu| <= rel * (|cpu| + scale), where
// `scale` is the typical magnitude of the terms that were rounded, so values
// that cancel to near zero are judged against the error their terms carry.
// - f32 elementwise ops: rel 1e-5. Both sides round each operation once, but
//   nvcc contracts a * b + c into one FMA where the CPU build does not, and
//   CUDA's expf may differ from glibc's by an ulp or two; that is a few 1e-7.
// - f32 reductions (rowwise_dot, column_sum, softmax, rmsnorm): rel 1e-5 with
//   scale = the typical magnitude of the sum: both orders are fp32 sums of
//   L <= ~300 terms, error ~ sqrt(L) * 6e-8 relative to that magnitude.
// - f32 GEMMs with K <= 512: rel 1e-4, scale = sqrt(K) / 3 (the typical |c|
//   for inputs in U(-1, 1)): cuBLAS blocks and orders the K sum differently
//   from the CPU's BLAS; the worst-case bound K * eps is 3e-5 at K = 512.
// - f64 everything: rel 1e-12.
// A wrong index, transpose or formula gives errors of order 1, far outside.
#include "support/cuda_parity.h"

namespace {

using fm::DType;
using fm::Shape;
using fm::Tensor;
using fm::testing::Backends;
using fm::testing::clone;
using fm::testing::group_offsets;
using fm::testing::expect_bitwise_equal;
using fm::testing::expect_close;
using fm::testing::random;
using fm::testing::rel_for;

// --- memory ------------------------------------------------------------------------

TEST(CudaParity, CopyRoundTripIsExact) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(101);
  for (DType dt : {DType::f32, DType::f64}) {
    const Tensor h = random({37, 19}, dt, rng, -3, 3);
    Tensor d1 = b.up(h);                      // host -> device
    Tensor d2 = b.gpu->empty(h.shape(), dt);  // device -> device
    b.gpu->copy(d2, d1);
    expect_bitwise_equal(b.down(d2), h, "H2D, D2D, D2H round trip");  // device -> host
  }
}

TEST(CudaParity, CopyRejectsShapeOrDtypeMismatch) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  Tensor d = b.gpu->empty({4, 5}, DType::f32);
  EXPECT_THROW(b.gpu->copy(d, Tensor::zeros({5, 4}, DType::f32)), fm::Error);
  EXPECT_THROW(b.gpu->copy(d, Tensor::zeros({4, 5}, DType::f64)), fm::Error);
}

TEST(CudaParity, FillMatchesCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  for (DType dt : {DType::f32, DType::f64}) {
    Tensor c = Tensor::empty({33, 65}, dt);
    b.cpu->fill(c, -1.25);
    Tensor g = b.gpu->empty({33, 65}, dt);
    b.gpu->fill(g, -1.25);
    expect_bitwise_equal(b.down(g), c, "fill");  // a constant is exact
  }
}

// --- GEMM ----------------------------------------------------------------------------

// c = alpha op(a) op(b) + beta c for one transpose combination.
void check_matmul(Backends& b, DType dt, int64_t m, int64_t n, int64_t k, bool ta, bool tb,
                  double alpha, double beta, uint64_t seed) {
  fm::Rng rng(seed);
  const Tensor a = random(ta ? Shape{k, m} : Shape{m, k}, dt, rng, -1, 1);
  const Tensor bm = random(tb ? Shape{n, k} : Shape{k, n}, dt, rng, -1, 1);
  const Tensor c0 = random({m, n}, dt, rng, -1, 1);
  Tensor c_cpu = clone(c0);
  b.cpu->matmul(c_cpu, a, ta, bm, tb, alpha, beta);
  Tensor c_gpu = b.up(c0);
  b.gpu->matmul(c_gpu, b.up(a), ta, b.up(bm), tb, alpha, beta);
  const std::string what = "matmul " + std::string(fm::dtype_name(dt)) + " M=" + std::to_string(m) +
                           " N=" + std::to_string(n) + " K=" + std::to_string(k) +
                           " trans_a=" + std::to_string(ta) + " trans_b=" + std::to_string(tb);
  expect_close(b.down(c_gpu), c_cpu, rel_for(dt, 1e-4),
               std::max(1.0, std::sqrt(static_cast<double>(k)) / 3), what);
}

TEST(CudaParity, MatmulAllTransposeCombos) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  uint64_t seed = 200;
  for (DType dt : {DType::f32, DType::f64})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        // Non-square, odd sizes so a swapped M/N/K or leading dimension cannot pass.
        check_matmul(b, dt, 37, 53, 129, ta, tb, 1.0, 0.0, ++seed);
        check_matmul(b, dt, 37, 53, 129, ta, tb, 0.75, 0.5, ++seed);
        check_matmul(b, dt, 64, 48, 512, ta, tb, 1.0, 1.0, ++seed);
      }
}

TEST(CudaParity, MatmulWithEmptyInnerDimensionScalesC) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  check_matmul(b, DType::f32, 5, 7, 0, false, false, 1.0, 0.5, 300);
  check_matmul(b, DType::f32, 5, 7, 0, true, true, 1.0, 0.0, 301);
}

TEST(CudaParity, GroupedMatmulMatchesCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  const std::vector<int64_t> off = group_offsets();
  const int64_t groups = 5, rows = off.back(), r = 24, s = 40;
  uint64_t seed = 400;
  for (DType dt : {DType::f32, DType::f64})
    for (bool trans_w : {false, true}) {
      fm::Rng rng(++seed);
      const int64_t k = trans_w ? s : r, n = trans_w ? r : s;
      const Tensor x = random({rows, k}, dt, rng, -1, 1);
      const Tensor w = random({groups, r, s}, dt, rng, -1, 1);
      Tensor y_cpu = Tensor::empty({rows, n}, dt);
      b.cpu->grouped_matmul(y_cpu, x, w, trans_w, off);
      Tensor y_gpu = b.gpu->empty({rows, n}, dt);
      b.gpu->grouped_matmul(y_gpu, b.up(x), b.up(w), trans_w, off);
      expect_close(b.down(y_gpu), y_cpu, rel_for(dt, 1e-4), std::sqrt(double(k)) / 3,
                   "grouped_matmul trans_w=" + std::to_string(trans_w));
    }
}

TEST(CudaParity, GroupedWeightGradAccumulatesAndSkipsEmptyGroups) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  const std::vector<int64_t> off = group_offsets();
  const int64_t groups = 5, rows = off.back(), r = 24, s = 40;
  for (DType dt : {DType::f32, DType::f64}) {
    fm::Rng rng(500);
    const Tensor dy = random({rows, r}, dt, rng, -1, 1);
    const Tensor x = random({rows, s}, dt, rng, -1, 1);
    const Tensor dw0 = random({groups, r, s}, dt, rng, -1, 1);  // accumulated into
    Tensor dw_cpu = clone(dw0);
    b.cpu->grouped_weight_grad(dw_cpu, dy, x, off);
    Tensor dw_gpu = b.up(dw0);
    b.gpu->grouped_weight_grad(dw_gpu, b.up(dy), b.up(x), off);
    const Tensor got = b.down(dw_gpu);
    expect_close(got, dw_cpu, rel_for(dt, 1e-4), 2.0, "grouped_weight_grad");
    // Empty groups 1 and 4 keep their old gradient exactly.
    for (int64_t g : {1, 4})
      expect_bitwise_equal(got.row(g), dw0.row(g), "empty group " + std::to_string(g));
  }
}

// --- elementwise and reductions ---------------------------------------------------------

TEST(CudaParity, AxpyScaleAddRowVectorMatchCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  for (DType dt : {DType::f32, DType::f64}) {
    fm::Rng rng(600);
    const Tensor y0 = random({41, 77}, dt, rng, -2, 2);
    const Tensor x = random({41, 77}, dt, rng, -2, 2);
    const Tensor v = random({77}, dt, rng, -2, 2);
    Tensor y_cpu = clone(y0);
    b.cpu->axpy(y_cpu, -0.3, x);
    b.cpu->scale(y_cpu, 1.7);
    b.cpu->add_row_vector(y_cpu, v, 0.6);
    Tensor y_gpu = b.up(y0);
    b.gpu->axpy(y_gpu, -0.3, b.up(x));
    b.gpu->scale(y_gpu, 1.7);
    b.gpu->add_row_vector(y_gpu, b.up(v), 0.6);
    expect_close(b.down(y_gpu), y_cpu, rel_for(dt, 1e-5), 1.0, "axpy, scale, add_row_vector");
  }
}

TEST(CudaParity, SumSquaresMatchesCpuAndIsDeterministic) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(700);
  // Sizes below, at and well past the fixed 256 x 256 grid, and not multiples of it.
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{1000}, int64_t{65536}, int64_t{1000003}}) {
    for (DType dt : {DType::f32, DType::f64}) {
      const Tensor x = random({n}, dt, rng, -2, 2);
      const double want = b.cpu->sum_squares(x);
      const Tensor xd = b.up(x);
      const double got = b.gpu->sum_squares(xd);
      // Both sum n positive terms in f64 (f32 inputs may be squared in f32 on the CPU,
      // 6e-8 relative per term): 1e-6 relative covers either.
      EXPECT_NEAR(got, want, 1e-6 * want) << "sum_squares n=" << n;
      EXPECT_EQ(b.gpu->sum_squares(xd), got) << "sum_squares must repeat bit for bit, n=" << n;
    }
  }
}

TEST(CudaParity, RowwiseDotAndColumnSumMatchCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  for (DType dt : {DType::f32, DType::f64}) {
    fm::Rng rng(800);
    const int64_t n = 300, c = 45;  // c not a multiple of 32, n not a multiple of 8
    const Tensor a = random({n, c}, dt, rng, -1, 1);
    const Tensor bb = random({n, c}, dt, rng, -1, 1);
    Tensor dot_cpu = Tensor::empty({n}, dt);
    b.cpu->rowwise_dot(dot_cpu, a, bb);
    Tensor dot_gpu = b.gpu->empty({n}, dt);
    b.gpu->rowwise_dot(dot_gpu, b.up(a), b.up(bb));
    expect_close(b.down(dot_gpu), dot_cpu, rel_for(dt, 1e-5), std::sqrt(double(c)) / 3,
                 "rowwise_dot");

    Tensor sum_cpu = Tensor::empty({c}, dt);
    b.cpu->column_sum(sum_cpu, a);
    Tensor sum_gpu = b.gpu->empty({c}, dt);
    const Tensor ad = b.up(a);
    b.gpu->column_sum(sum_gpu, ad);
    const Tensor got = b.down(sum_gpu);
    expect_close(got, sum_cpu, rel_for(dt, 1e-5), std::sqrt(double(n) / 3), "column_sum");
    b.gpu->column_sum(sum_gpu, ad);
    expect_bitwise_equal(b.down(sum_gpu), got, "column_sum repeats bit for bit");
  }
}

// --- SwiGLU, softmax, RMSNorm -------------------------------------------------------------

TEST(CudaParity, SwigluForwardBackwardMatchCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  for (DType dt : {DType::f32, DType::f64}) {
    fm::Rng rng(900);
    const Shape shape{29, 130};
    const Tensor gate = random(shape, dt, rng, -8, 8);  // both saturated tails of the sigmoid
    const Tensor up = random(shape, dt, rng, -2, 2);
    const Tensor dh = random(shape, dt, rng, -1, 1);
    Tensor h_cpu = Tensor::empty(shape, dt), dg_cpu = Tensor::empty(shape, dt),
           du_cpu = Tensor::empty(shape, dt);
    b.cpu->swiglu_forward(h_cpu, gate, up);
    b.cpu->swiglu_backward(dg_cpu, du_cpu, dh, gate, up);
    const Tensor gate_d = b.up(gate), up_d = b.up(up), dh_d = b.up(dh);
    Tensor h = b.gpu->empty(shape, dt), dg = b.gpu->empty(shape, dt), du = b.gpu->empty(shape, dt);
    b.gpu->swiglu_forward(h, gate_d, up_d);
    b.gpu->swiglu_backward(dg, du, dh_d, gate_d, up_d);
    // Each output is a product of O(1) factors with one exp: relative error of a few ulp;
    // scale 1e-3 covers outputs that underflow toward zero in the negative tail.
    const double rel = rel_for(dt, 1e-5);
    expect_close(b.down(h), h_cpu, rel, 1e-3, "swiglu_forward h");
    expect_close(b.down(dg), dg_cpu, rel, 1e-3, "swiglu_backward dgate");
    expect_close(b.down(du), du_cpu, rel, 1e-3, "swiglu_backward dup");
  }
}

TEST(CudaParity, SoftmaxForwardBackwardMatchCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  for (DType dt : {DType::f32, DType::f64}) {
    fm::Rng rng(1000);
    const int64_t n = 50, e = 67;  // e > 32 and odd: lanes loop and the tail is ragged
    const Tensor logits = random({n, e}, dt, rng, -4, 4);
    const Tensor dprobs = random({n, e}, dt, rng, -1, 1);
    Tensor p_cpu = Tensor::empty({n, e}, dt), dl_cpu = Tensor::empty({n, e}, dt);
    b.cpu->softmax_forward(p_cpu, logits);
    b.cpu->softmax_backward(dl_cpu, dprobs, p_cpu);
    Tensor p = b.gpu->empty({n, e}, dt), dl = b.gpu->empty({n, e}, dt);
    b.gpu->softmax_forward(p, b.up(logits));
    // Backward from the CPU's probs so the comparison isolates the backward kernel.
    b.gpu->softmax_backward(dl, b.up(dprobs), b.up(p_cpu));
    const double rel = rel_for(dt, 1e-5);
    // probs: a few ulp relative to p itself; dlogits = p (dp - <dp, p>): ulp relative to
    // p |dp| ~ 1 / e.
    expect_close(b.down(p), p_cpu, rel, 1e-7, "softmax_forward");
    expect_close(b.down(dl), dl_cpu, rel, 1.0 / e, "softmax_backward");
  }
}

TEST(CudaParity, RmsnormForwardBackwardMatchCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  for (DType dt : {DType::f32, DType::f64}) {
    fm::Rng rng(1100);
    const int64_t n = 33, c = 257;
    const double eps = 1e-5;
    const Tensor x = random({n, c}, dt, rng, -2, 2);
    const Tensor w = random({c}, dt, rng, 0.5, 1.5);
    const Tensor dy = random({n, c}, dt, rng, -1, 1);
    const Tensor dw0 = random({c}, dt, rng, -1, 1);  // dw accumulates

    Tensor y_cpu = Tensor::empty({n, c}, dt), rstd_cpu = Tensor::empty({n}, dt);
    b.cpu->rmsnorm_forward(y_cpu, rstd_cpu, x, w, eps);
    Tensor dx_cpu = Tensor::empty({n, c}, dt), dw_cpu = clone(dw0);
    b.cpu->rmsnorm_backward(dx_cpu, dw_cpu, dy, x, w, rstd_cpu);

    const Tensor x_d = b.up(x), w_d = b.up(w);
    Tensor y = b.gpu->empty({n, c}, dt), rstd = b.gpu->empty({n}, dt);
    b.gpu->rmsnorm_forward(y, rstd, x_d, w_d, eps);
    Tensor dx = b.gpu->empty({n, c}, dt), dw = b.up(dw0);
    b.gpu->rmsnorm_backward(dx, dw, b.up(dy), x_d, w_d, b.up(rstd_cpu));

    const double rel = rel_for(dt, 1e-5);
    // rstd, y: ulps of a length-c sum of squares, relative to the value itself.
    expect_close(b.down(rstd), rstd_cpu, rel, 0.0, "rmsnorm_forward rstd");
    expect_close(b.down(y), y_cpu, rel, 1e-3, "rmsnorm_forward y");
    // dx = rstd (g - xhat mean(g xhat)) cancels: judged against |g| rstd ~ 1.
    expect_close(b.down(dx), dx_cpu, rel, 1.0, "rmsnorm_backward dx");
    // dw: dw0 + a sum of n terms of size ~1.
    const Tensor dw_got = b.down(dw);
    expect_close(dw_got, dw_cpu, rel, std::sqrt(double(n)), "rmsnorm_backward dw");
    // Deterministic: the same backward from the same dw0 gives the same bits.
    Tensor dw2 = b.up(dw0);
    b.gpu->rmsnorm_backward(dx, dw2, b.up(dy), x_d, w_d, b.up(rstd_cpu));
    expect_bitwise_equal(b.down(dw2), dw_got, "rmsnorm_backward dw repeats bit for bit");
  }
}

// --- optimizer ---------------------------------------------------------------------------

TEST(CudaParity, AdamwStepsMatchCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(1200);
  const Shape shape{1000, 3};
  const Tensor p0 = random(shape, DType::f32, rng, -1, 1);
  const Tensor m0 = random(shape, DType::f32, rng, -1e-2, 1e-2);
  const Tensor v0 = random(shape, DType::f32, rng, 0, 1e-4);
  Tensor p_cpu = clone(p0), m_cpu = clone(m0), v_cpu = clone(v0);
  Tensor p = b.up(p0), m = b.up(m0), v = b.up(v0);
  for (int64_t step = 7; step <= 9; ++step) {  // several steps: the state must carry over
    const Tensor g = random(shape, DType::f32, rng, -1e-2, 1e-2);
    b.cpu->adamw_step(p_cpu, g, m_cpu, v_cpu, 1e-3, 0.9, 0.95, 1e-8, 0.1, step);
    b.gpu->adamw_step(p, b.up(g), m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, step);
  }
  // Elementwise f32 arithmetic: a few ulp relative to each value.
  expect_close(b.down(m), m_cpu, 1e-5, 1e-6, "adamw m");
  expect_close(b.down(v), v_cpu, 1e-5, 1e-8, "adamw v");
  expect_close(b.down(p), p_cpu, 1e-5, 1e-3, "adamw param");
}

// --- errors --------------------------------------------------------------------------------

TEST(CudaParity, ShapeMismatchThrows) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  Tensor c = b.gpu->empty({3, 5}, DType::f32);
  const Tensor a = b.gpu->empty({3, 4}, DType::f32);
  const Tensor bad = b.gpu->empty({5, 5}, DType::f32);  // inner dimension 5 != 4
  EXPECT_THROW(b.gpu->matmul(c, a, false, bad, false), fm::Error);
  const Tensor host = Tensor::zeros({3, 5}, DType::f32);  // host tensor given to a device op
  EXPECT_THROW(b.gpu->axpy(c, 1.0, host), fm::Error);
}

// The one check that runs without a GPU: the factory reports "no GPU" as an fm::Error
// rather than crashing (in CUDA builds on GPU-less machines and in CPU-only builds).
TEST(CudaBackend, FactoryThrowsWhenNoGpuIsVisible) {
  if (fm::cuda_available()) GTEST_SKIP() << "a CUDA GPU is visible: nothing to check here";
  EXPECT_THROW(fm::make_cuda_backend(0), fm::Error);
}

}  // namespace
