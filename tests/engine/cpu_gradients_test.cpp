// Every CPU op with a backward: the analytic gradient (f64) against central finite
// differences of the f64 forward, and the f32 forward against the f64 forward.
// Tolerances are justified in cpu_test_support.h.
#include <gtest/gtest.h>

#include <cmath>

#include "engine/backend.h"
#include "engine/rng.h"
#include "tests/engine/cpu_test_support.h"

namespace fm {
namespace {

using test::Forward;
using test::Tensors;

std::unique_ptr<Backend> g_cpu = make_cpu_backend();
Backend& cpu() {
  return *g_cpu;
}

Tensor empty_like(const Tensor& t) {
  return Tensor::empty(t.shape(), t.dtype());
}
Tensor empty_as(const Tensor& t, Shape shape) {
  return Tensor::empty(std::move(shape), t.dtype());
}

// `grad` minus what it held before an accumulating backward.
Tensor accumulated(const Tensor& after, const Tensor& before) {
  Tensor d = test::clone(after);
  cpu().axpy(d, -1.0, before);
  return d;
}

// --- matmul ----------------------------------------------------------------------------------

Forward matmul_forward(bool ta, bool tb, double alpha) {
  return [=](const Tensors& in) {
    const Tensor &a = in[0], &b = in[1];
    Tensor c = empty_as(a, {ta ? a.dim(1) : a.dim(0), tb ? b.dim(0) : b.dim(1)});
    cpu().matmul(c, a, ta, b, tb, alpha, 0.0);
    return Tensors{c};
  };
}

// For c = alpha op(a) op(b): the model's backward is two more matmuls.
TEST(CpuMatmul, TransposedProductsMatchFiniteDifferences) {
  Rng rng(101);
  const int64_t M = 3, K = 4, N = 5;
  const double alpha = 0.75;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      SCOPED_TRACE(testing::Message() << "trans_a " << ta << " trans_b " << tb);
      Tensor a = test::random_normal(ta ? Shape{K, M} : Shape{M, K}, rng);
      Tensor b = test::random_normal(tb ? Shape{N, K} : Shape{K, N}, rng);
      const Forward f = matmul_forward(ta, tb, alpha);
      const Tensors w = test::random_weights_for(f, {a, b}, rng);
      const Tensor& dc = w[0];
      Tensor da = empty_like(a), db = empty_like(b);
      // dop(a) = alpha dc op(b)^T, dop(b) = alpha op(a)^T dc; a transposed operand takes
      // the transpose of its gradient.
      if (!ta)
        cpu().matmul(da, dc, false, b, !tb, alpha);
      else
        cpu().matmul(da, b, tb, dc, true, alpha);
      if (!tb)
        cpu().matmul(db, a, !ta, dc, false, alpha);
      else
        cpu().matmul(db, dc, true, a, ta, alpha);
      test::expect_gradients_match_finite_differences(f, {a, b}, w, {da, db}, {"a", "b"});
    }
  }
}

TEST(CpuMatmul, F32ForwardMatchesF64) {
  Rng rng(102);
  const int64_t M = 20, K = 30, N = 25;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      test::expect_f32_forward_matches_f64(
          matmul_forward(ta, tb, 1.5), {test::random_normal(ta ? Shape{K, M} : Shape{M, K}, rng),
                                        test::random_normal(tb ? Shape{N, K} : Shape{K, N}, rng)});
}

// --- grouped matmul ----------------------------------------------------------------------------

const std::vector<int64_t> kGroupOff = {0, 3, 3, 7, 8, 8};  // G = 5, groups 1 and 4 empty

Forward grouped_matmul_forward(bool trans_w) {
  return [=](const Tensors& in) {
    const Tensor &x = in[0], &w = in[1];
    Tensor y = empty_as(x, {x.dim(0), trans_w ? w.dim(1) : w.dim(2)});
    cpu().grouped_matmul(y, x, w, trans_w, kGroupOff);
    return Tensors{y};
  };
}

TEST(CpuGroupedMatmul, BackwardMatchesFiniteDifferences) {
  Rng rng(111);
  const int64_t G = 5, R = 3, S = 4, rows = kGroupOff.back();
  for (bool trans_w : {false, true}) {
    SCOPED_TRACE(testing::Message() << "trans_w " << trans_w);
    Tensor x = test::random_normal({rows, trans_w ? S : R}, rng);
    Tensor w = test::random_normal({G, R, S}, rng);
    const Forward f = grouped_matmul_forward(trans_w);
    const Tensors dy = test::random_weights_for(f, {x, w}, rng);
    // dx_g = dy_g op(w[g])^T; dw[g] += x_g^T dy_g (or dy_g^T x_g when y = x w^T)
    Tensor dx = empty_like(x);
    cpu().grouped_matmul(dx, dy[0], w, !trans_w, kGroupOff);
    const Tensor dw0 = test::random_normal({G, R, S}, rng);
    Tensor dw = test::clone(dw0);
    if (!trans_w)
      cpu().grouped_weight_grad(dw, x, dy[0], kGroupOff);
    else
      cpu().grouped_weight_grad(dw, dy[0], x, kGroupOff);
    test::expect_gradients_match_finite_differences(f, {x, w}, dy, {dx, accumulated(dw, dw0)},
                                                    {"x", "w"});
  }
}

TEST(CpuGroupedMatmul, F32ForwardMatchesF64) {
  Rng rng(112);
  for (bool trans_w : {false, true})
    test::expect_f32_forward_matches_f64(
        grouped_matmul_forward(trans_w),
        {test::random_normal({8, 6}, rng), test::random_normal({5, 6, 6}, rng)});
}

// --- embedding ---------------------------------------------------------------------------------

Forward embedding_forward(const Tensor& ids) {
  return [=](const Tensors& in) {
    Tensor out = empty_as(in[0], {ids.numel(), in[0].dim(1)});
    cpu().embedding_forward(out, in[0], ids);
    return Tensors{out};
  };
}

TEST(CpuEmbedding, BackwardMatchesFiniteDifferences) {
  Rng rng(121);
  const Tensor ids = test::int_tensor({7}, {2, 0, 4, 2, 2, 5, 0});  // repeats; rows 1, 3 unused
  Tensor table = test::random_normal({6, 3}, rng);
  const Forward f = embedding_forward(ids);
  const Tensors dout = test::random_weights_for(f, {table}, rng);
  const Tensor dtable0 = test::random_normal({6, 3}, rng);
  Tensor dtable = test::clone(dtable0);
  cpu().embedding_backward(dtable, dout[0], ids);
  test::expect_gradients_match_finite_differences(f, {table}, dout, {accumulated(dtable, dtable0)},
                                                  {"table"});
}

TEST(CpuEmbedding, F32ForwardMatchesF64) {
  Rng rng(122);
  test::expect_f32_forward_matches_f64(embedding_forward(test::random_ids({9}, rng, 5)),
                                       {test::random_normal({5, 4}, rng)});
}

// --- RMSNorm -----------------------------------------------------------------------------------

constexpr double kRmsEps = 1e-5;

Forward rmsnorm_forward() {
  return [](const Tensors& in) {
    Tensor y = empty_like(in[0]), rstd = empty_as(in[0], {in[0].dim(0)});
    cpu().rmsnorm_forward(y, rstd, in[0], in[1], kRmsEps);
    return Tensors{y};
  };
}

TEST(CpuRmsnorm, BackwardMatchesFiniteDifferences) {
  Rng rng(131);
  const int64_t N = 4, C = 6;
  Tensor x = test::random_normal({N, C}, rng), w = test::random_normal({C}, rng);
  const Forward f = rmsnorm_forward();
  const Tensors dy = test::random_weights_for(f, {x, w}, rng);
  Tensor y = empty_like(x), rstd = empty_as(x, {N});
  cpu().rmsnorm_forward(y, rstd, x, w, kRmsEps);
  const Tensor dw0 = test::random_normal({C}, rng);
  Tensor dx = empty_like(x), dw = test::clone(dw0);
  cpu().rmsnorm_backward(dx, dw, dy[0], x, w, rstd);
  test::expect_gradients_match_finite_differences(f, {x, w}, dy, {dx, accumulated(dw, dw0)},
                                                  {"x", "w"});
}

TEST(CpuRmsnorm, F32ForwardMatchesF64) {
  Rng rng(132);
  test::expect_f32_forward_matches_f64(
      rmsnorm_forward(), {test::random_normal({5, 16}, rng), test::random_normal({16}, rng)});
}

// --- RoPE --------------------------------------------------------------------------------------

constexpr double kRopeTheta = 10000.0;

Forward rope_forward(const Tensor& pos) {
  return [=](const Tensors& in) {
    Tensor x = test::clone(in[0]);
    cpu().rope(x, pos, kRopeTheta, false);
    return Tensors{x};
  };
}

// The backward of a rotation is the inverse rotation.
TEST(CpuRope, InverseIsTheBackwardByFiniteDifferences) {
  Rng rng(141);
  const Tensor pos = test::int_tensor({4}, {0, 1, 7, 1000});
  Tensor x = test::random_normal({4, 2, 6}, rng);
  const Forward f = rope_forward(pos);
  const Tensors dy = test::random_weights_for(f, {x}, rng);
  Tensor dx = test::clone(dy[0]);
  cpu().rope(dx, pos, kRopeTheta, true);
  test::expect_gradients_match_finite_differences(f, {x}, dy, {dx}, {"x"});
}

TEST(CpuRope, F32ForwardMatchesF64) {
  Rng rng(142);
  test::expect_f32_forward_matches_f64(rope_forward(test::int_tensor({3}, {0, 5, 300})),
                                       {test::random_normal({3, 4, 8}, rng)});
}

// --- attention ---------------------------------------------------------------------------------

Forward attention_forward(const Tensor& seq_off, double scale) {
  return [=](const Tensors& in) {
    const Tensor &q = in[0], &k = in[1], &v = in[2];
    Tensor out = empty_like(q), lse = empty_as(q, {q.dim(0), q.dim(1)});
    cpu().attention_forward(out, lse, q, k, v, seq_off, scale);
    return Tensors{out};
  };
}

// Four sequences of lengths 3, 1, 4, 2; grouped-query with Hq = 4, Hkv = 2.
TEST(CpuAttention, BackwardMatchesFiniteDifferences) {
  Rng rng(151);
  const int64_t N = 10, Hq = 4, Hkv = 2, D = 3;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const Tensor seq_off = test::int_tensor({5}, {0, 3, 4, 8, 10});
  Tensor q = test::random_normal({N, Hq, D}, rng);
  Tensor k = test::random_normal({N, Hkv, D}, rng), v = test::random_normal({N, Hkv, D}, rng);
  const Forward f = attention_forward(seq_off, scale);
  const Tensors dout = test::random_weights_for(f, {q, k, v}, rng);
  Tensor out = empty_like(q), lse = empty_as(q, {N, Hq});
  cpu().attention_forward(out, lse, q, k, v, seq_off, scale);
  Tensor dq = empty_like(q), dk = empty_like(k), dv = empty_like(v);
  cpu().attention_backward(dq, dk, dv, dout[0], q, k, v, out, lse, seq_off, scale);
  test::expect_gradients_match_finite_differences(f, {q, k, v}, dout, {dq, dk, dv},
                                                  {"q", "k", "v"});
}

TEST(CpuAttention, F32ForwardMatchesF64) {
  Rng rng(152);
  test::expect_f32_forward_matches_f64(
      attention_forward(test::int_tensor({3}, {0, 5, 12}), 0.5),
      {test::random_normal({12, 4, 8}, rng), test::random_normal({12, 2, 8}, rng),
       test::random_normal({12, 2, 8}, rng)});
}

// --- SwiGLU ------------------------------------------------------------------------------------

Forward swiglu_forward() {
  return [](const Tensors& in) {
    Tensor h = empty_like(in[0]);
    cpu().swiglu_forward(h, in[0], in[1]);
    return Tensors{h};
  };
}

TEST(CpuSwiglu, BackwardMatchesFiniteDifferences) {
  Rng rng(161);
  Tensor gate = test::random_normal({3, 5}, rng), up = test::random_normal({3, 5}, rng);
  const Forward f = swiglu_forward();
  const Tensors dh = test::random_weights_for(f, {gate, up}, rng);
  Tensor dgate = empty_like(gate), dup = empty_like(up);
  cpu().swiglu_backward(dgate, dup, dh[0], gate, up);
  test::expect_gradients_match_finite_differences(f, {gate, up}, dh, {dgate, dup}, {"gate", "up"});
}

TEST(CpuSwiglu, F32ForwardMatchesF64) {
  Rng rng(162);
  test::expect_f32_forward_matches_f64(
      swiglu_forward(), {test::random_normal({4, 9}, rng), test::random_normal({4, 9}, rng)});
}

// --- router: softmax, gather/scatter columns, row normalisation -------------------------------

Forward softmax_forward() {
  return [](const Tensors& in) {
    Tensor p = empty_like(in[0]);
    cpu().softmax_forward(p, in[0]);
    return Tensors{p};
  };
}

TEST(CpuSoftmax, BackwardMatchesFiniteDifferences) {
  Rng rng(171);
  Tensor logits = test::random_normal({4, 6}, rng);
  const Forward f = softmax_forward();
  const Tensors dp = test::random_weights_for(f, {logits}, rng);
  Tensor probs = f({logits})[0], dlogits = empty_like(logits);
  cpu().softmax_backward(dlogits, dp[0], probs);
  test::expect_gradients_match_finite_differences(f, {logits}, dp, {dlogits}, {"logits"});
}

TEST(CpuSoftmax, F32ForwardMatchesF64) {
  Rng rng(172);
  test::expect_f32_forward_matches_f64(softmax_forward(), {test::random_normal({5, 8}, rng)});
}

Forward gather_cols_forward(const Tensor& ids) {
  return [=](const Tensors& in) {
    Tensor out = empty_as(in[0], ids.shape());
    cpu().gather_cols(out, in[0], ids);
    return Tensors{out};
  };
}

TEST(CpuGatherCols, ScatterAddColsIsTheBackwardByFiniteDifferences) {
  Rng rng(181);
  const Tensor ids = test::int_tensor({3, 2}, {4, 1, 0, 0, 2, 3});  // row 1 picks column 0 twice
  Tensor x = test::random_normal({3, 5}, rng);
  const Forward f = gather_cols_forward(ids);
  const Tensors dout = test::random_weights_for(f, {x}, rng);
  const Tensor dx0 = test::random_normal({3, 5}, rng);
  Tensor dx = test::clone(dx0);
  cpu().scatter_add_cols(dx, dout[0], ids);
  test::expect_gradients_match_finite_differences(f, {x}, dout, {accumulated(dx, dx0)}, {"x"});
}

Forward normalize_rows_forward() {
  return [](const Tensors& in) {
    Tensor g = empty_like(in[0]);
    cpu().normalize_rows_forward(g, in[0]);
    return Tensors{g};
  };
}

TEST(CpuNormalizeRows, BackwardMatchesFiniteDifferences) {
  Rng rng(191);
  Tensor p = test::random_uniform({4, 3}, rng, 0.1, 1.0);  // router probabilities are positive
  const Forward f = normalize_rows_forward();
  const Tensors dg = test::random_weights_for(f, {p}, rng);
  Tensor dp = empty_like(p);
  cpu().normalize_rows_backward(dp, dg[0], p);
  test::expect_gradients_match_finite_differences(f, {p}, dg, {dp}, {"p"});
}

TEST(CpuNormalizeRows, F32ForwardMatchesF64) {
  Rng rng(192);
  test::expect_f32_forward_matches_f64(normalize_rows_forward(),
                                       {test::random_uniform({5, 4}, rng, 0.1, 1.0)});
}

// --- token permutation -------------------------------------------------------------------------

Forward gather_rows_forward(const Tensor& idx) {
  return [=](const Tensors& in) {
    Tensor out = empty_as(in[0], {idx.numel(), in[0].dim(1)});
    cpu().gather_rows(out, in[0], idx);
    return Tensors{out};
  };
}

TEST(CpuGatherRows, ScatterAddRowsIsTheBackwardByFiniteDifferences) {
  Rng rng(201);
  const Tensor idx = test::int_tensor({6}, {3, 0, 3, 1, 3, 0});
  Tensor src = test::random_normal({4, 3}, rng);
  const Forward f = gather_rows_forward(idx);
  const Tensors dout = test::random_weights_for(f, {src}, rng);
  Tensor dsrc = Tensor::zeros({4, 3}, DType::f64);
  cpu().scatter_add_rows(dsrc, dout[0], idx, Tensor());
  test::expect_gradients_match_finite_differences(f, {src}, dout, {dsrc}, {"src"});
}

// dst = base + scatter_add_rows(src, w): dsrc[m] = w[m] ddst[idx[m]], dw[m] = ddst[idx[m]] . src[m]
TEST(CpuScatterAddRows, GatherRowsAndRowwiseDotAreTheBackwardByFiniteDifferences) {
  Rng rng(202);
  const int64_t M = 6, R = 4, C = 3;
  const Tensor idx = test::int_tensor({M}, {2, 0, 2, 3, 2, 0});
  const Tensor base = test::random_normal({R, C}, rng);
  Tensor src = test::random_normal({M, C}, rng), w = test::random_normal({M}, rng);
  const Forward f = [&](const Tensors& in) {
    Tensor dst = test::clone(test::to_dtype(base, in[0].dtype()));
    cpu().scatter_add_rows(dst, in[0], idx, in[1]);
    return Tensors{dst};
  };
  const Tensors ddst = test::random_weights_for(f, {src, w}, rng);
  Tensor gathered = Tensor::empty({M, C}, DType::f64), dw = Tensor::empty({M}, DType::f64);
  cpu().gather_rows(gathered, ddst[0], idx);
  cpu().rowwise_dot(dw, gathered, src);
  Tensor dsrc = test::clone(gathered);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < C; ++c) dsrc.data<double>()[m * C + c] *= w.data<double>()[m];
  test::expect_gradients_match_finite_differences(f, {src, w}, ddst, {dsrc, dw}, {"src", "w"});
}

// --- bias-style broadcast: add_row_vector and column_sum ------------------------------------

TEST(CpuAddRowVector, ColumnSumIsTheBackwardByFiniteDifferences) {
  Rng rng(211);
  const double alpha = -0.5;
  Tensor x = test::random_normal({5, 4}, rng), v = test::random_normal({4}, rng);
  const Forward f = [&](const Tensors& in) {
    Tensor y = test::clone(in[0]);
    cpu().add_row_vector(y, in[1], alpha);
    return Tensors{y};
  };
  const Tensors dy = test::random_weights_for(f, {x, v}, rng);
  Tensor dv = Tensor::empty({4}, DType::f64);
  cpu().column_sum(dv, dy[0]);
  cpu().scale(dv, alpha);
  test::expect_gradients_match_finite_differences(f, {x, v}, dy, {dy[0], dv}, {"x", "v"});
}

// --- log-probabilities and entropy -------------------------------------------------------------

Forward logprob_forward(const Tensor& targets) {
  return [=](const Tensors& in) {
    const int64_t N = in[0].dim(0);
    Tensor logp = empty_as(in[0], {N}), entropy = empty_as(in[0], {N}), lse = empty_as(in[0], {N});
    cpu().logprob_forward(logp, entropy, lse, in[0], targets);
    return Tensors{logp, entropy};
  };
}

// Row 2 has no target (-1): only its entropy carries gradient.
TEST(CpuLogprob, BackwardMatchesFiniteDifferences) {
  Rng rng(221);
  const int64_t N = 4, V = 7;
  const Tensor targets = test::int_tensor({N}, {3, 0, -1, 6});
  Tensor logits = test::random_normal({N, V}, rng, DType::f64);
  const Forward f = logprob_forward(targets);
  const Tensors w = test::random_weights_for(f, {logits}, rng);  // dlogp, dentropy
  Tensor logp = empty_as(logits, {N}), entropy = empty_as(logits, {N}), lse = empty_as(logits, {N});
  cpu().logprob_forward(logp, entropy, lse, logits, targets);
  Tensor dlogits = empty_like(logits);
  cpu().logprob_backward(dlogits, w[0], w[1], logits, lse, targets);
  test::expect_gradients_match_finite_differences(f, {logits}, w, {dlogits}, {"logits"});
}

// Undefined dentropy means zero: the gradient is that of logp alone.
TEST(CpuLogprob, UndefinedDentropyActsAsZero) {
  Rng rng(222);
  const Tensor targets = test::int_tensor({3}, {1, -1, 4});
  Tensor logits = test::random_normal({3, 5}, rng);
  Tensor logp = empty_as(logits, {3}), entropy = empty_as(logits, {3}), lse = empty_as(logits, {3});
  cpu().logprob_forward(logp, entropy, lse, logits, targets);
  const Tensor dlogp = test::random_normal({3}, rng);
  Tensor with_zero = empty_like(logits), with_undefined = empty_like(logits);
  cpu().logprob_backward(with_zero, dlogp, Tensor::zeros({3}, DType::f64), logits, lse, targets);
  cpu().logprob_backward(with_undefined, dlogp, Tensor(), logits, lse, targets);
  EXPECT_TRUE(test::bitwise_equal(with_zero, with_undefined));
  for (int64_t v = 0; v < 5; ++v) EXPECT_EQ(with_undefined.data<double>()[5 + v], 0.0);
}

TEST(CpuLogprob, F32ForwardMatchesF64) {
  Rng rng(223);
  test::expect_f32_forward_matches_f64(logprob_forward(test::int_tensor({4}, {0, 9, -1, 5})),
                                       {test::random_normal({4, 10}, rng)});
}

}  // namespace
}  // namespace fm
