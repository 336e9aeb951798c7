// CPU backend forward ops against straightforward reference loops written here.
// f64 results are compared at ~1e-12 (only summation order differs from the
// reference); f32 results at 1e-5 (rounding at ~6e-8 per op over short sums).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "engine/backend.h"
#include "engine/dtype.h"
#include "engine/error.h"
#include "engine/rng.h"
#include "tests/engine/cpu_test_support.h"

namespace fm {
namespace {

using test::at;

std::unique_ptr<Backend> g_cpu = make_cpu_backend();
Backend& cpu() {
  return *g_cpu;
}

constexpr double kTolF64 = 1e-12, kTolF32 = 1e-5;
double tol_for(DType dt) {
  return dt == DType::f32 ? kTolF32 : kTolF64;
}

Tensor f64_from(Shape shape, const std::vector<double>& values) {
  Tensor t = Tensor::empty(std::move(shape), DType::f64);
  std::copy(values.begin(), values.end(), t.data<double>());
  return t;
}

Tensor nan_filled(Shape shape, DType dt) {
  Tensor t = Tensor::empty(std::move(shape), dt);
  cpu().fill(t, std::numeric_limits<double>::quiet_NaN());
  return t;
}

// --- matmul ------------------------------------------------------------------------------------

// c = alpha op(a) op(b) + beta c0 in f64 from the (possibly f32) inputs.
Tensor naive_matmul(const Tensor& a, bool ta, const Tensor& b, bool tb, double alpha, double beta,
                    const Tensor& c0) {
  const int64_t M = ta ? a.dim(1) : a.dim(0), K = ta ? a.dim(0) : a.dim(1);
  const int64_t N = tb ? b.dim(0) : b.dim(1);
  Tensor c = Tensor::empty({M, N}, DType::f64);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k)
        s += at(a, ta ? k * M + i : i * K + k) * at(b, tb ? j * K + k : k * N + j);
      c.data<double>()[i * N + j] = alpha * s + beta * at(c0, i * N + j);
    }
  return c;
}

// 150 x 140 output: four 128 x 128 tiles, two of them partial.
TEST(CpuMatmul, AllTransposeCombinationsMatchNaiveLoops) {
  Rng rng(1);
  const int64_t M = 150, N = 140, K = 37;
  for (DType dt : {DType::f64, DType::f32}) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        SCOPED_TRACE(testing::Message()
                     << dtype_name(dt) << " trans_a " << ta << " trans_b " << tb);
        const Tensor a = test::random_normal(ta ? Shape{K, M} : Shape{M, K}, rng, dt);
        const Tensor b = test::random_normal(tb ? Shape{N, K} : Shape{K, N}, rng, dt);
        const Tensor c0 = test::random_normal({M, N}, rng, dt);
        Tensor c = test::clone(c0);
        cpu().matmul(c, a, ta, b, tb, 0.7, 0.3);
        test::expect_close(c, naive_matmul(a, ta, b, tb, 0.7, 0.3, c0), tol_for(dt), "c");
      }
    }
  }
}

// BLAS semantics: beta = 0 ignores the old contents of c, NaNs included.
TEST(CpuMatmul, ZeroBetaOverwritesNaNs) {
  Rng rng(2);
  const Tensor a = test::random_normal({5, 3}, rng), b = test::random_normal({3, 4}, rng);
  Tensor c = nan_filled({5, 4}, DType::f64);
  cpu().matmul(c, a, false, b, false, 1.0, 0.0);
  test::expect_close(c,
                     naive_matmul(a, false, b, false, 1.0, 0.0, Tensor::zeros({5, 4}, DType::f64)),
                     kTolF64, "c");
}

TEST(CpuMatmul, EmptyInnerDimensionScalesC) {
  Rng rng(3);
  const Tensor a = Tensor::empty({4, 0}, DType::f64), b = Tensor::empty({0, 3}, DType::f64);
  const Tensor c0 = test::random_normal({4, 3}, rng);
  Tensor c = test::clone(c0);
  cpu().matmul(c, a, false, b, false, 1.0, 0.5);
  for (int64_t i = 0; i < 12; ++i) EXPECT_EQ(at(c, i), 0.5 * at(c0, i));
  Tensor d = nan_filled({4, 3}, DType::f64);
  cpu().matmul(d, a, false, b, false, 1.0, 0.0);
  for (int64_t i = 0; i < 12; ++i) EXPECT_EQ(at(d, i), 0.0);
}

// --- grouped matmul ----------------------------------------------------------------------------

// Groups 0 and 3 empty, group 1 spans two row tiles.
const std::vector<int64_t> kOff = {0, 0, 130, 131, 131, 140};

TEST(CpuGroupedMatmul, MatchesPerGroupProductsWithEmptyGroups) {
  Rng rng(4);
  const int64_t G = 5, R = 5, S = 7, rows = kOff.back();
  for (DType dt : {DType::f64, DType::f32}) {
    for (bool trans_w : {false, true}) {
      SCOPED_TRACE(testing::Message() << dtype_name(dt) << " trans_w " << trans_w);
      const int64_t in = trans_w ? S : R, out = trans_w ? R : S;
      const Tensor x = test::random_normal({rows, in}, rng, dt);
      const Tensor w = test::random_normal({G, R, S}, rng, dt);
      Tensor y = nan_filled({rows, out}, dt);
      cpu().grouped_matmul(y, x, w, trans_w, kOff);
      Tensor ref = Tensor::empty({rows, out}, DType::f64);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = kOff[g]; r < kOff[g + 1]; ++r)
          for (int64_t o = 0; o < out; ++o) {
            double s = 0;
            for (int64_t i = 0; i < in; ++i)
              s += at(x, r * in + i) * at(w, g * R * S + (trans_w ? o * S + i : i * S + o));
            ref.data<double>()[r * out + o] = s;
          }
      test::expect_close(y, ref, tol_for(dt), "y");
    }
  }
}

TEST(CpuGroupedWeightGrad, AccumulatesPerGroupProductsAndSkipsEmptyGroups) {
  Rng rng(5);
  const int64_t G = 5, R = 4, S = 6, rows = kOff.back();
  for (DType dt : {DType::f64, DType::f32}) {
    SCOPED_TRACE(dtype_name(dt));
    const Tensor dy = test::random_normal({rows, R}, rng, dt),
                 x = test::random_normal({rows, S}, rng, dt);
    const Tensor dw0 = test::random_normal({G, R, S}, rng, dt);
    Tensor dw = test::clone(dw0);
    cpu().grouped_weight_grad(dw, dy, x, kOff);
    Tensor ref = Tensor::empty({G, R, S}, DType::f64);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t s = 0; s < S; ++s) {
          double acc = at(dw0, (g * R + r) * S + s);
          for (int64_t n = kOff[g]; n < kOff[g + 1]; ++n)
            acc += at(dy, n * R + r) * at(x, n * S + s);
          ref.data<double>()[(g * R + r) * S + s] = acc;
        }
    test::expect_close(dw, ref, tol_for(dt), "dw");
    const size_t bytes = static_cast<size_t>(R * S) * dtype_size(dt);
    for (int64_t g : {0, 3})  // empty groups: untouched, bit for bit
      EXPECT_EQ(std::memcmp(dw.row(g).raw(), dw0.row(g).raw(), bytes), 0) << "group " << g;
  }
}

// --- elementwise and reductions ----------------------------------------------------------------

TEST(CpuAxpy, AddsScaledX) {
  Rng rng(6);
  const Tensor x = test::random_normal({3, 4}, rng), y0 = test::random_normal({3, 4}, rng);
  Tensor y = test::clone(y0);
  cpu().axpy(y, -2.5, x);
  for (int64_t i = 0; i < 12; ++i) EXPECT_EQ(at(y, i), at(y0, i) + -2.5 * at(x, i));
}

TEST(CpuScale, MultipliesEveryElement) {
  Rng rng(7);
  const Tensor x0 = test::random_normal({7}, rng, DType::f32);
  Tensor x = test::clone(x0);
  cpu().scale(x, 0.25);
  for (int64_t i = 0; i < 7; ++i) EXPECT_EQ(x.data<float>()[i], 0.25f * x0.data<float>()[i]);
}

// 10000 elements: three summation chunks.
TEST(CpuSumSquares, MatchesNaiveSumInF64) {
  Rng rng(8);
  for (DType dt : {DType::f64, DType::f32}) {
    const Tensor x = test::random_normal({10000}, rng, dt);
    double ref = 0;
    for (int64_t i = 0; i < x.numel(); ++i) ref += at(x, i) * at(x, i);
    EXPECT_NEAR(cpu().sum_squares(x), ref, 1e-12 * ref) << dtype_name(dt);
  }
}

TEST(CpuRowwiseDot, MatchesNaiveLoop) {
  Rng rng(9);
  const Tensor a = test::random_normal({5, 6}, rng), b = test::random_normal({5, 6}, rng);
  Tensor out = nan_filled({5}, DType::f64), ref = Tensor::empty({5}, DType::f64);
  cpu().rowwise_dot(out, a, b);
  for (int64_t n = 0; n < 5; ++n) {
    double s = 0;
    for (int64_t c = 0; c < 6; ++c) s += at(a, n * 6 + c) * at(b, n * 6 + c);
    ref.data<double>()[n] = s;
  }
  test::expect_close(out, ref, kTolF64, "out");
}

// 70 columns: two column blocks; the output is overwritten, not accumulated.
TEST(CpuColumnSum, WritesColumnSums) {
  Rng rng(10);
  const Tensor x = test::random_normal({9, 70}, rng);
  Tensor out = nan_filled({70}, DType::f64), ref = Tensor::empty({70}, DType::f64);
  cpu().column_sum(out, x);
  for (int64_t c = 0; c < 70; ++c) {
    double s = 0;
    for (int64_t n = 0; n < 9; ++n) s += at(x, n * 70 + c);
    ref.data<double>()[c] = s;
  }
  test::expect_close(out, ref, kTolF64, "out");
}

TEST(CpuAddRowVector, AddsScaledVectorToEveryRow) {
  Rng rng(11);
  const Tensor x0 = test::random_normal({4, 3}, rng), v = test::random_normal({3}, rng);
  Tensor x = test::clone(x0);
  cpu().add_row_vector(x, v, 2.0);
  for (int64_t n = 0; n < 4; ++n)
    for (int64_t c = 0; c < 3; ++c) EXPECT_EQ(at(x, n * 3 + c), at(x0, n * 3 + c) + 2.0 * at(v, c));
}

TEST(CpuScaleRows, MatchesTheComposedDefault) {
  Rng rng(12);
  const Tensor x = test::random_normal({5, 7}, rng), w = test::random_normal({5}, rng);
  Tensor out = nan_filled({5, 7}, DType::f64);
  cpu().scale_rows(out, x, w);
  for (int64_t n = 0; n < 5; ++n)
    for (int64_t c = 0; c < 7; ++c) EXPECT_EQ(at(out, n * 7 + c), at(w, n) * at(x, n * 7 + c));
  Tensor bad_w = test::random_normal({4}, rng);
  EXPECT_THROW(cpu().scale_rows(out, x, bad_w), Error);
}

// --- embedding, norms, rope --------------------------------------------------------------------

TEST(CpuEmbedding, ForwardCopiesTableRows) {
  Rng rng(12);
  const Tensor table = test::random_normal({6, 5}, rng, DType::f32);
  const Tensor ids = test::int_tensor({4}, {5, 0, 5, 2});
  Tensor out = Tensor::empty({4, 5}, DType::f32);
  cpu().embedding_forward(out, table, ids);
  for (int64_t n = 0; n < 4; ++n)
    EXPECT_EQ(std::memcmp(out.row(n).raw(), table.row(ids.data<int32_t>()[n]).raw(), 5 * 4), 0);
}

TEST(CpuRmsnorm, ForwardMatchesFormula) {
  Rng rng(13);
  const int64_t N = 3, C = 8;
  const double eps = 1e-6;
  for (DType dt : {DType::f64, DType::f32}) {
    const Tensor x = test::random_normal({N, C}, rng, dt), w = test::random_normal({C}, rng, dt);
    Tensor y = Tensor::empty({N, C}, dt), rstd = Tensor::empty({N}, dt);
    cpu().rmsnorm_forward(y, rstd, x, w, eps);
    Tensor y_ref = Tensor::empty({N, C}, DType::f64), rstd_ref = Tensor::empty({N}, DType::f64);
    for (int64_t n = 0; n < N; ++n) {
      double ms = 0;
      for (int64_t c = 0; c < C; ++c) ms += at(x, n * C + c) * at(x, n * C + c) / C;
      const double r = 1.0 / std::sqrt(ms + eps);
      rstd_ref.data<double>()[n] = r;
      for (int64_t c = 0; c < C; ++c)
        y_ref.data<double>()[n * C + c] = at(x, n * C + c) * r * at(w, c);
    }
    test::expect_close(y, y_ref, tol_for(dt), "y");
    test::expect_close(rstd, rstd_ref, tol_for(dt), "rstd");
  }
}

TEST(CpuRope, ForwardRotatesHalfPairsByPositionAngle) {
  Rng rng(14);
  const int64_t N = 3, H = 2, D = 6;
  const double theta = 500.0;
  const Tensor pos = test::int_tensor({N}, {0, 3, 41});
  for (DType dt : {DType::f64, DType::f32}) {
    const Tensor x0 = test::random_normal({N, H, D}, rng, dt);
    Tensor x = test::clone(x0), ref = Tensor::empty({N, H, D}, DType::f64);
    cpu().rope(x, pos, theta, false);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D / 2; ++i) {
          const double a = pos.data<int32_t>()[n] * std::pow(theta, -2.0 * i / D);
          const int64_t lo = (n * H + h) * D + i, hi = lo + D / 2;
          ref.data<double>()[lo] = at(x0, lo) * std::cos(a) - at(x0, hi) * std::sin(a);
          ref.data<double>()[hi] = at(x0, hi) * std::cos(a) + at(x0, lo) * std::sin(a);
        }
    test::expect_close(x, ref, tol_for(dt), "x");
  }
}

TEST(CpuRope, InverseUndoesForward) {
  Rng rng(15);
  const Tensor pos = test::int_tensor({4}, {0, 1, 100, 4095});
  const Tensor x0 = test::random_normal({4, 3, 8}, rng);
  Tensor x = test::clone(x0);
  cpu().rope(x, pos, 10000.0, false);
  cpu().rope(x, pos, 10000.0, true);
  test::expect_close(x, x0, kTolF64, "x");
}

// --- attention ---------------------------------------------------------------------------------

// out/lse for each sequence separately, head h reading kv head h / (Hq / Hkv).
void naive_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                     const std::vector<int32_t>& off, double scale, Tensor* out, Tensor* lse) {
  const int64_t Hq = q.dim(1), Hkv = k.dim(1), D = q.dim(2);
  *out = Tensor::empty(q.shape(), DType::f64);
  *lse = Tensor::empty({q.dim(0), Hq}, DType::f64);
  for (size_t s = 0; s + 1 < off.size(); ++s)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = off[s]; i < off[s + 1]; ++i) {
        const int64_t kvh = h / (Hq / Hkv);
        std::vector<double> score;
        for (int64_t j = off[s]; j <= i; ++j) {
          double dot = 0;
          for (int64_t c = 0; c < D; ++c)
            dot += at(q, (i * Hq + h) * D + c) * at(k, (j * Hkv + kvh) * D + c);
          score.push_back(scale * dot);
        }
        double total = 0;
        for (double sc : score) total += std::exp(sc);
        for (int64_t c = 0; c < D; ++c) {
          double o = 0;
          for (int64_t j = off[s]; j <= i; ++j)
            o += std::exp(score[j - off[s]]) / total * at(v, (j * Hkv + kvh) * D + c);
          out->data<double>()[(i * Hq + h) * D + c] = o;
        }
        lse->data<double>()[i * Hq + h] = std::log(total);
      }
}

// Sequences of lengths 3, 1, 5, 2 (the single token attends only to itself).
TEST(CpuAttention, ForwardMatchesNaivePerSequenceWithGroupedQueryHeads) {
  Rng rng(16);
  const std::vector<int32_t> off = {0, 3, 4, 9, 11};
  const int64_t N = 11, Hq = 4, Hkv = 2, D = 5;
  const double scale = 0.4;
  for (DType dt : {DType::f64, DType::f32}) {
    SCOPED_TRACE(dtype_name(dt));
    const Tensor q = test::random_normal({N, Hq, D}, rng, dt);
    const Tensor k = test::random_normal({N, Hkv, D}, rng, dt),
                 v = test::random_normal({N, Hkv, D}, rng, dt);
    Tensor out = Tensor::empty({N, Hq, D}, dt), lse = Tensor::empty({N, Hq}, dt);
    cpu().attention_forward(out, lse, q, k, v, test::int_tensor({5}, off), scale);
    Tensor out_ref, lse_ref;
    naive_attention(q, k, v, off, scale, &out_ref, &lse_ref);
    test::expect_close(out, out_ref, tol_for(dt), "out");
    test::expect_close(lse, lse_ref, tol_for(dt), "lse");
    for (int64_t h = 0; h < Hq; ++h)  // token 3 is alone: out = its v row of kv head h / 2
      for (int64_t c = 0; c < D; ++c)
        EXPECT_NEAR(at(out, (3 * Hq + h) * D + c), at(v, (3 * Hkv + h / 2) * D + c), tol_for(dt));
  }
}

// --- SwiGLU, softmax, router ---------------------------------------------------------------------

TEST(CpuSwiglu, ForwardIsSiluOfGateTimesUp) {
  Rng rng(17);
  const Tensor gate = test::random_normal({2, 5}, rng), up = test::random_normal({2, 5}, rng);
  Tensor h = Tensor::empty({2, 5}, DType::f64), ref = Tensor::empty({2, 5}, DType::f64);
  cpu().swiglu_forward(h, gate, up);
  for (int64_t i = 0; i < 10; ++i)
    ref.data<double>()[i] = at(gate, i) / (1.0 + std::exp(-at(gate, i))) * at(up, i);
  test::expect_close(h, ref, kTolF64, "h");
}

// Logits near 1000 would overflow exp without the max subtraction.
TEST(CpuSoftmax, ForwardMatchesFormulaAndSurvivesLargeLogits) {
  Rng rng(18);
  Tensor logits = test::random_normal({3, 6}, rng);
  for (int64_t i = 6; i < 12; ++i) logits.data<double>()[i] += 1000.0;
  Tensor p = Tensor::empty({3, 6}, DType::f64), ref = Tensor::empty({3, 6}, DType::f64);
  cpu().softmax_forward(p, logits);
  for (int64_t n = 0; n < 3; ++n) {
    const double m =
        *std::max_element(logits.data<double>() + n * 6, logits.data<double>() + n * 6 + 6);
    double total = 0;
    for (int64_t e = 0; e < 6; ++e) total += std::exp(at(logits, n * 6 + e) - m);
    for (int64_t e = 0; e < 6; ++e)
      ref.data<double>()[n * 6 + e] = std::exp(at(logits, n * 6 + e) - m) / total;
  }
  test::expect_close(p, ref, kTolF64, "probs");
}

std::vector<int32_t> topk_ids(const Tensor& scores, const Tensor& bias, int64_t K) {
  Tensor ids = Tensor::empty({scores.dim(0), K}, DType::i32);
  cpu().topk(ids, scores, bias);
  return {ids.data<int32_t>(), ids.data<int32_t>() + ids.numel()};
}

TEST(CpuTopk, TiesGoToTheLowerExpertId) {
  const Tensor scores = f64_from({2, 5}, {1, 3, 3, 2, 3, /**/ 0, 0, 0, 0, 0});
  EXPECT_EQ(topk_ids(scores, Tensor(), 3), (std::vector<int32_t>{1, 2, 4, 0, 1, 2}));
}

// bias reorders the selection (values are exact in binary, so sums tie exactly); the scores
// themselves stay untouched.
TEST(CpuTopk, BiasShiftsTheSelectionButNotTheScores) {
  const Tensor scores = f64_from({1, 4}, {0.75, 0.5, 0.125, 0.625});
  const Tensor before = test::clone(scores);
  // keys 0.75, 0.75, 1.125, 0.625
  EXPECT_EQ(topk_ids(scores, f64_from({4}, {0, 0.25, 1.0, 0}), 2), (std::vector<int32_t>{2, 0}));
  // keys 0.75, 0.875, 0.625, 0.875: the tie for first goes to expert 1
  EXPECT_EQ(topk_ids(scores, f64_from({4}, {0, 0.375, 0.5, 0.25}), 2),
            (std::vector<int32_t>{1, 3}));
  EXPECT_TRUE(test::bitwise_equal(scores, before));
}

TEST(CpuTopk, MatchesStableSortOfRandomScores) {
  Rng rng(19);
  const int64_t N = 20, E = 9, K = 4;
  const Tensor scores = test::random_normal({N, E}, rng, DType::f32);
  const Tensor bias = test::random_normal({E}, rng, DType::f32);
  const std::vector<int32_t> ids = topk_ids(scores, bias, K);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<int32_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    auto key = [&](int32_t e) { return scores.data<float>()[n * E + e] + bias.data<float>()[e]; };
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return key(a) > key(b); });
    for (int64_t k = 0; k < K; ++k) EXPECT_EQ(ids[n * K + k], order[k]) << "row " << n;
  }
}

TEST(CpuGatherCols, PicksColumnsAndScatterAddsDuplicates) {
  const Tensor x = f64_from({2, 3}, {1, 2, 3, 4, 5, 6});
  const Tensor ids = test::int_tensor({2, 2}, {2, 0, 1, 1});
  Tensor out = Tensor::empty({2, 2}, DType::f64);
  cpu().gather_cols(out, x, ids);
  EXPECT_EQ(std::vector<double>(out.data<double>(), out.data<double>() + 4),
            (std::vector<double>{3, 1, 5, 5}));
  Tensor dx = f64_from({2, 3}, {10, 10, 10, 10, 10, 10});
  cpu().scatter_add_cols(dx, f64_from({2, 2}, {1, 2, 3, 4}), ids);
  EXPECT_EQ(std::vector<double>(dx.data<double>(), dx.data<double>() + 6),
            (std::vector<double>{12, 10, 11, 10, 17, 10}));
}

TEST(CpuNormalizeRows, RowsSumToOne) {
  const Tensor p = f64_from({2, 3}, {1, 2, 5, 0.5, 0.25, 0.25});
  Tensor g = Tensor::empty({2, 3}, DType::f64);
  cpu().normalize_rows_forward(g, p);
  test::expect_close(g, f64_from({2, 3}, {0.125, 0.25, 0.625, 0.5, 0.25, 0.25}), kTolF64, "g");
}

// --- token permutation -------------------------------------------------------------------------

TEST(CpuGatherRows, CopiesIndexedRows) {
  Rng rng(20);
  const Tensor src = test::random_normal({4, 3}, rng);
  const Tensor idx = test::int_tensor({5}, {3, 3, 0, 2, 1});
  Tensor out = Tensor::empty({5, 3}, DType::f64);
  cpu().gather_rows(out, src, idx);
  for (int64_t m = 0; m < 5; ++m)
    for (int64_t c = 0; c < 3; ++c)
      EXPECT_EQ(at(out, m * 3 + c), at(src, idx.data<int32_t>()[m] * 3 + c));
}

// The documented order (m ascending) is reproduced bit for bit.
TEST(CpuScatterAddRows, AddsWeightedRowsInSourceOrder) {
  Rng rng(21);
  const int64_t M = 40, R = 6, C = 5;
  for (DType dt : {DType::f64, DType::f32}) {
    SCOPED_TRACE(dtype_name(dt));
    const Tensor src = test::random_normal({M, C}, rng, dt), w = test::random_normal({M}, rng, dt);
    const Tensor idx = test::random_ids({M}, rng, R - 1);  // row R - 1 receives nothing
    const Tensor dst0 = test::random_normal({R, C}, rng, dt);
    Tensor dst = test::clone(dst0), ref = test::clone(dst0);
    cpu().scatter_add_rows(dst, src, idx, w);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t r = idx.data<int32_t>()[m];
        if (dt == DType::f32)
          ref.data<float>()[r * C + c] += w.data<float>()[m] * src.data<float>()[m * C + c];
        else
          ref.data<double>()[r * C + c] += w.data<double>()[m] * src.data<double>()[m * C + c];
      }
    EXPECT_TRUE(test::bitwise_equal(dst, ref));
  }
}

// --- log-probabilities -------------------------------------------------------------------------

TEST(CpuLogprob, ForwardMatchesNaiveWithNegativeTargetAndLargeLogits) {
  Rng rng(22);
  const int64_t N = 3, V = 6;
  Tensor logits = test::random_normal({N, V}, rng);
  for (int64_t v = 0; v < V; ++v) logits.data<double>()[2 * V + v] += 800.0;
  const Tensor targets = test::int_tensor({N}, {4, -1, 0});
  Tensor logp = nan_filled({N}, DType::f64), entropy = Tensor::empty({N}, DType::f64),
         lse = Tensor::empty({N}, DType::f64);
  cpu().logprob_forward(logp, entropy, lse, logits, targets);
  Tensor logp_ref = Tensor::empty({N}, DType::f64), ent_ref = Tensor::empty({N}, DType::f64),
         lse_ref = Tensor::empty({N}, DType::f64);
  for (int64_t n = 0; n < N; ++n) {
    const double* x = logits.data<double>() + n * V;
    const double m = *std::max_element(x, x + V);
    double total = 0;
    for (int64_t v = 0; v < V; ++v) total += std::exp(x[v] - m);
    const double l = m + std::log(total);
    double h = 0;
    for (int64_t v = 0; v < V; ++v) h -= std::exp(x[v] - l) * (x[v] - l);
    const int32_t t = targets.data<int32_t>()[n];
    logp_ref.data<double>()[n] = t >= 0 ? x[t] - l : 0.0;
    ent_ref.data<double>()[n] = h;
    lse_ref.data<double>()[n] = l;
  }
  test::expect_close(logp, logp_ref, kTolF64, "logp");
  test::expect_close(entropy, ent_ref, kTolF64, "entropy");
  test::expect_close(lse, lse_ref, kTolF64, "lse");
  EXPECT_EQ(at(logp, 1), 0.0);
  EXPECT_GT(at(entropy, 1), 0.0);
}

// --- optimizer ---------------------------------------------------------------------------------

TEST(CpuAdamw, TwoStepsMatchTheFormula) {
  Rng rng(23);
  const double lr = 1e-2, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;
  for (DType dt : {DType::f64, DType::f32}) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor p = test::random_normal({10}, rng, dt);
    Tensor m = Tensor::zeros({10}, dt), v = Tensor::zeros({10}, dt);
    std::vector<double> p_ref(10), m_ref(10, 0.0), v_ref(10, 0.0);
    for (int64_t i = 0; i < 10; ++i) p_ref[i] = at(p, i);
    for (int64_t t = 1; t <= 2; ++t) {
      const Tensor g = test::random_normal({10}, rng, dt);
      cpu().adamw_step(p, g, m, v, lr, b1, b2, eps, wd, t);
      for (int64_t i = 0; i < 10; ++i) {
        m_ref[i] = b1 * m_ref[i] + (1 - b1) * at(g, i);
        v_ref[i] = b2 * v_ref[i] + (1 - b2) * at(g, i) * at(g, i);
        const double mhat = m_ref[i] / (1 - std::pow(b1, t)),
                     vhat = v_ref[i] / (1 - std::pow(b2, t));
        p_ref[i] -= lr * (mhat / (std::sqrt(vhat) + eps) + wd * p_ref[i]);
      }
    }
    Tensor ref = Tensor::empty({10}, DType::f64);
    std::copy(p_ref.begin(), p_ref.end(), ref.data<double>());
    test::expect_close(p, ref, tol_for(dt), "param");
  }
}

// --- memory ------------------------------------------------------------------------------------

TEST(CpuFill, WritesTheValueInEveryDtype) {
  for (DType dt : {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64,
                   DType::u8, DType::u16}) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor t = Tensor::empty({3, 2}, dt);
    cpu().fill(t, 6.0);
    for (int64_t i = 0; i < 6; ++i) {
      const uint8_t* p = static_cast<const uint8_t*>(t.raw()) + i * dtype_size(dt);
      double got = 0;
      switch (dt) {
        case DType::f32:
          got = *reinterpret_cast<const float*>(p);
          break;
        case DType::f64:
          got = *reinterpret_cast<const double*>(p);
          break;
        case DType::bf16:
          got = bf16_to_f32(*reinterpret_cast<const uint16_t*>(p));
          break;
        case DType::f16:
          got = f16_to_f32(*reinterpret_cast<const uint16_t*>(p));
          break;
        case DType::i32:
          got = *reinterpret_cast<const int32_t*>(p);
          break;
        case DType::i64:
          got = static_cast<double>(*reinterpret_cast<const int64_t*>(p));
          break;
        case DType::u8:
          got = *p;
          break;
        case DType::u16:
          got = *reinterpret_cast<const uint16_t*>(p);
          break;
      }
      EXPECT_EQ(got, 6.0);
    }
  }
  Tensor h = Tensor::empty({2}, DType::bf16);
  cpu().fill(h, -0.1);  // rounded to the nearest bf16
  EXPECT_EQ(static_cast<const uint16_t*>(h.raw())[1], f32_to_bf16(-0.1f));
}

TEST(CpuCopy, CopiesHostTensorsBitForBit) {
  Rng rng(24);
  const Tensor src = test::random_normal({4, 5}, rng, DType::f32);
  Tensor dst = Tensor::empty({4, 5}, DType::f32);
  cpu().copy(dst, src);
  EXPECT_TRUE(test::bitwise_equal(dst, src));
  const Tensor host = cpu().to_host(src);
  EXPECT_TRUE(test::bitwise_equal(host, src));
}

}  // namespace
}  // namespace fm
