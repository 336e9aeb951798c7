// bf16 on the CPU backend: every float op follows engine/mixed_precision.h's rule, bf16
// storage and f32 arithmetic. A call with bf16 tensors must give, bit for bit, the f32
// call on the same values with each bf16 output rounded once (f32 outputs of a mixed call
// exactly the f32 call's). Plus conversions, upload/download, and bad input.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/dtype.h"
#include "engine/error.h"
#include "engine/rng.h"
#include "tests/engine/cpu_test_support.h"

namespace fm {
namespace {

using test::Tensors;
using testing::HasSubstr;

std::unique_ptr<Backend> g_cpu = make_cpu_backend();
Backend& cpu() {
  return *g_cpu;
}

constexpr DType bf = DType::bf16, f32 = DType::f32;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// f32 <-> bf16 on the host with dtype.h's scalar conversions, independent of Backend::convert.
Tensor narrow_to_bf16(const Tensor& x) {
  Tensor t = Tensor::empty(x.shape(), bf);
  for (int64_t i = 0; i < x.numel(); ++i)
    static_cast<uint16_t*>(t.raw())[i] = f32_to_bf16(x.data<float>()[i]);
  return t;
}
Tensor widen_to_f32(const Tensor& x) {
  Tensor t = Tensor::empty(x.shape(), f32);
  for (int64_t i = 0; i < x.numel(); ++i)
    t.data<float>()[i] = bf16_to_f32(static_cast<const uint16_t*>(x.raw())[i]);
  return t;
}

// Element i of a bf16, f32, f64 or i32 tensor, for messages and comparisons.
double value(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::bf16:
      return bf16_to_f32(static_cast<const uint16_t*>(t.raw())[i]);
    case DType::i32:
      return t.data<int32_t>()[i];
    default:
      return test::at(t, i);
  }
}

// Normal(shift, stddev) values as `dtype`: a bf16 tensor holds them rounded to bf16, an f32
// one at full f32 precision (so a mixed call also checks that f32 arguments stay f32).
Tensor random(Shape shape, DType dtype, Rng& rng, double stddev = 1.0, double shift = 0.0) {
  Tensor t = Tensor::empty(std::move(shape), f32);
  rng.normal(t.data<float>(), t.numel(), static_cast<float>(shift), static_cast<float>(stddev));
  return dtype == bf ? narrow_to_bf16(t) : t;
}
// |Normal(0, 1)| + 0.1: for probabilities to normalise and second moments.
Tensor random_positive(Shape shape, DType dtype, Rng& rng) {
  Tensor t = Tensor::empty(std::move(shape), f32);
  rng.normal(t.data<float>(), t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = std::abs(t.data<float>()[i]) + 0.1f;
  return dtype == bf ? narrow_to_bf16(t) : t;
}
// An output the op must overwrite: NaN everywhere.
Tensor nan_out(Shape shape, DType dtype) {
  Tensor t = Tensor::empty(std::move(shape), dtype);
  cpu().fill(t, kNaN);
  return t;
}
Tensor ids_tensor(Shape shape, const std::vector<int32_t>& values) {
  return test::int_tensor(std::move(shape), values);
}

using Op = std::function<void(Tensors&)>;

// Runs `op` on `args` (float tensors f32 or bf16, some bf16; index tensors i32; undefined
// allowed) and on copies with every bf16 argument widened to f32. Each argument listed in
// `outputs` must then equal the f32 run's, rounded to bf16 where the argument is bf16, bit for
// bit. The f32 run's float outputs must be finite, so NaN == NaN cannot pass for an output the
// bf16 call never wrote.
void expect_bf16_rule(const Op& op, Tensors args, const std::vector<size_t>& outputs) {
  bool any_bf16 = false;
  for (const Tensor& t : args) any_bf16 = any_bf16 || (t.defined() && t.dtype() == bf);
  ASSERT_TRUE(any_bf16) << "the case has no bf16 argument";
  Tensors wide;
  for (const Tensor& t : args)
    wide.push_back(!t.defined() ? t : t.dtype() == bf ? widen_to_f32(t) : test::clone(t));
  op(wide);
  op(args);
  for (size_t o : outputs) {
    const Tensor& got = args[o];
    const Tensor expected = got.dtype() == bf ? narrow_to_bf16(wide[o]) : wide[o];
    ASSERT_EQ(got.dtype(), expected.dtype()) << "argument " << o;
    const size_t size = dtype_size(got.dtype());
    int64_t first_diff = -1;
    for (int64_t i = 0; i < got.numel() && first_diff < 0; ++i) {
      if (wide[o].dtype() == f32) {
        ASSERT_TRUE(std::isfinite(wide[o].data<float>()[i]))
            << "argument " << o << "[" << i << "] of the f32 call is not finite";
      }
      if (std::memcmp(static_cast<const char*>(got.raw()) + i * size,
                      static_cast<const char*>(expected.raw()) + i * size, size) != 0)
        first_diff = i;
    }
    EXPECT_EQ(first_diff, -1) << "argument " << o << " (" << got.describe() << ") element "
                              << first_diff << " is " << value(got, first_diff)
                              << " but the f32 call gives " << value(expected, first_diff);
  }
}

template <class F>
void expect_error(F&& f, const std::vector<std::string>& substrings) {
  try {
    f();
    ADD_FAILURE() << "no fm::Error thrown";
  } catch (const Error& e) {
    for (const std::string& s : substrings) EXPECT_THAT(e.what(), HasSubstr(s));
  }
}

// --- dense linear algebra ------------------------------------------------------------------

TEST(CpuBf16, MatmulIsTheF32MatmulRoundedOnce) {
  Rng rng(1);
  const int64_t M = 19, N = 23, K = 37;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      SCOPED_TRACE(testing::Message() << "trans_a " << ta << " trans_b " << tb);
      const Shape as = ta ? Shape{K, M} : Shape{M, K}, bs = tb ? Shape{N, K} : Shape{K, N};
      auto op = [&](double alpha, double beta) {
        return [=](Tensors& t) { cpu().matmul(t[0], t[1], ta, t[2], tb, alpha, beta); };
      };
      // beta = 0: c is written (its NaNs ignored); beta != 0: c is read and accumulated.
      expect_bf16_rule(op(0.7, 0.0),
                       {nan_out({M, N}, bf), random(as, bf, rng), random(bs, bf, rng)}, {0});
      expect_bf16_rule(op(0.7, 0.5),
                       {random({M, N}, bf, rng), random(as, bf, rng), random(bs, bf, rng)}, {0});
      // Mixed: bf16 operands, f32 c accumulated; and a bf16 a with an f32 b.
      expect_bf16_rule(op(1.0, 1.0),
                       {random({M, N}, f32, rng), random(as, bf, rng), random(bs, bf, rng)}, {0});
      expect_bf16_rule(op(1.0, 0.0),
                       {nan_out({M, N}, bf), random(as, bf, rng), random(bs, f32, rng)}, {0});
    }
  }
}

// Groups 0 and 3 empty.
const std::vector<int64_t> kOff = {0, 0, 13, 14, 14, 20};

TEST(CpuBf16, GroupedMatmulAndWeightGradAreTheF32FormsRoundedOnce) {
  Rng rng(2);
  const int64_t G = 5, R = 5, S = 7, rows = kOff.back();
  for (bool trans_w : {false, true}) {
    SCOPED_TRACE(testing::Message() << "trans_w " << trans_w);
    const int64_t in = trans_w ? S : R, out = trans_w ? R : S;
    auto op = [&](Tensors& t) { cpu().grouped_matmul(t[0], t[1], t[2], trans_w, kOff); };
    expect_bf16_rule(
        op, {nan_out({rows, out}, bf), random({rows, in}, bf, rng), random({G, R, S}, bf, rng)},
        {0});
    expect_bf16_rule(
        op, {nan_out({rows, out}, f32), random({rows, in}, bf, rng), random({G, R, S}, f32, rng)},
        {0});
  }
  // dw accumulates: bf16 dw (widened, accumulated in f32, rounded once), and the mixed case
  // of f32 weight gradients from bf16 activations.
  auto grad = [&](Tensors& t) { cpu().grouped_weight_grad(t[0], t[1], t[2], kOff); };
  for (DType dw : {bf, f32}) {
    SCOPED_TRACE(dtype_name(dw));
    expect_bf16_rule(
        grad, {random({G, R, S}, dw, rng), random({rows, R}, bf, rng), random({rows, S}, bf, rng)},
        {0});
  }
}

// --- elementwise and reductions ------------------------------------------------------------

TEST(CpuBf16, ElementwiseOpsAreTheF32FormsRoundedOnce) {
  Rng rng(3);
  const int64_t N = 9, C = 13;
  for (DType y : {bf, f32}) {  // y bf16 or f32, x bf16
    SCOPED_TRACE(dtype_name(y));
    expect_bf16_rule([](Tensors& t) { cpu().axpy(t[0], -0.3, t[1]); },
                     {random({N, C}, y, rng), random({N, C}, bf, rng)}, {0});
    expect_bf16_rule([](Tensors& t) { cpu().add_row_vector(t[0], t[1], 0.7); },
                     {random({N, C}, y, rng), random({C}, bf, rng)}, {0});
    expect_bf16_rule([](Tensors& t) { cpu().rowwise_dot(t[0], t[1], t[2]); },
                     {nan_out({N}, y), random({N, C}, bf, rng), random({N, C}, bf, rng)}, {0});
    expect_bf16_rule([](Tensors& t) { cpu().column_sum(t[0], t[1]); },
                     {nan_out({C}, y), random({N, C}, bf, rng)}, {0});
    expect_bf16_rule([](Tensors& t) { cpu().scale_rows(t[0], t[1], t[2]); },
                     {nan_out({N, C}, y), random({N, C}, bf, rng), random({N}, bf, rng)}, {0});
  }
  expect_bf16_rule([](Tensors& t) { cpu().scale(t[0], 0.37); }, {random({N, C}, bf, rng)}, {0});
  // sum_squares returns f64: the bf16 call returns exactly the f32 call's value.
  const Tensor x = random({N, C}, bf, rng);
  const double s = cpu().sum_squares(x);
  EXPECT_EQ(s, cpu().sum_squares(widen_to_f32(x)));
  EXPECT_GT(s, 0.0);
}

// --- embedding, norms, rope ----------------------------------------------------------------

TEST(CpuBf16, EmbeddingIsTheF32FormRoundedOnce) {
  Rng rng(4);
  const int64_t V = 5, C = 8;
  const Tensor ids = test::random_ids({12}, rng, V);  // repeats: backward sums several rows
  for (DType d : {bf, f32}) {  // the written / accumulated tensor bf16 or f32
    SCOPED_TRACE(dtype_name(d));
    expect_bf16_rule([&](Tensors& t) { cpu().embedding_forward(t[0], t[1], ids); },
                     {nan_out({12, C}, d), random({V, C}, bf, rng)}, {0});
    expect_bf16_rule([&](Tensors& t) { cpu().embedding_backward(t[0], t[1], ids); },
                     {random({V, C}, d, rng), random({12, C}, bf, rng)}, {0});
  }
}

TEST(CpuBf16, RmsNormIsTheF32FormRoundedOnce) {
  Rng rng(5);
  const int64_t N = 6, C = 24;
  auto fwd = [](Tensors& t) { cpu().rmsnorm_forward(t[0], t[1], t[2], t[3], 1e-5); };
  auto bwd = [](Tensors& t) { cpu().rmsnorm_backward(t[0], t[1], t[2], t[3], t[4], t[5]); };
  for (DType side : {bf, f32}) {  // rstd (forward) and dw, rstd (backward) bf16 or f32
    SCOPED_TRACE(dtype_name(side));
    expect_bf16_rule(fwd,
                     {nan_out({N, C}, bf), nan_out({N}, side), random({N, C}, bf, rng, 2.0),
                      random({C}, bf, rng, 0.1, 1.0)},
                     {0, 1});
    expect_bf16_rule(bwd,
                     {nan_out({N, C}, bf), random({C}, side, rng), random({N, C}, bf, rng),
                      random({N, C}, bf, rng, 2.0), random({C}, bf, rng, 0.1, 1.0),
                      random_positive({N}, side, rng)},
                     {0, 1});
  }
}

TEST(CpuBf16, RopeIsTheF32FormRoundedOnce) {
  Rng rng(6);
  const Tensor pos = ids_tensor({5}, {0, 1, 7, 100, 3});
  for (bool inverse : {false, true})
    expect_bf16_rule([&](Tensors& t) { cpu().rope(t[0], pos, 10000.0, inverse); },
                     {random({5, 2, 8}, bf, rng)}, {0});
}

// --- attention -----------------------------------------------------------------------------

TEST(CpuBf16, AttentionIsTheF32FormRoundedOnce) {
  Rng rng(7);
  const int64_t N = 7, Hq = 4, Hkv = 2, D = 8;
  const double scale = 1 / std::sqrt(8.0);
  const Tensor seq_off = ids_tensor({3}, {0, 3, 7});
  const Tensor q = random({N, Hq, D}, bf, rng), k = random({N, Hkv, D}, bf, rng),
               v = random({N, Hkv, D}, bf, rng);
  auto fwd = [&](Tensors& t) {
    cpu().attention_forward(t[0], t[1], t[2], t[3], t[4], seq_off, scale);
  };
  for (DType lse : {bf, f32})
    expect_bf16_rule(fwd, {nan_out({N, Hq, D}, bf), nan_out({N, Hq}, lse), q, k, v}, {0, 1});

  // Backward from the forward's own out and lse (lse bf16 or f32, dk written as f32 or bf16).
  Tensor out32 = nan_out({N, Hq, D}, f32), lse32 = nan_out({N, Hq}, f32);
  cpu().attention_forward(out32, lse32, widen_to_f32(q), widen_to_f32(k), widen_to_f32(v), seq_off,
                          scale);
  auto bwd = [&](Tensors& t) {
    cpu().attention_backward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], seq_off, scale);
  };
  for (DType side : {bf, f32}) {
    SCOPED_TRACE(dtype_name(side));
    expect_bf16_rule(bwd,
                     {nan_out({N, Hq, D}, bf), nan_out({N, Hkv, D}, side), nan_out({N, Hkv, D}, bf),
                      random({N, Hq, D}, bf, rng), q, k, v, narrow_to_bf16(out32),
                      side == bf ? narrow_to_bf16(lse32) : lse32},
                     {0, 1, 2});
  }

  // Cached: 3 tokens against 2 slots of 5 positions.
  const Tensor slot = ids_tensor({3}, {0, 1, 1}), pos = ids_tensor({3}, {4, 2, 0});
  auto cached = [&](Tensors& t) {
    cpu().attention_cached(t[0], t[1], t[2], t[3], slot, pos, scale);
  };
  for (DType cache : {bf, f32})
    expect_bf16_rule(cached,
                     {nan_out({3, Hq, D}, bf), random({3, Hq, D}, bf, rng),
                      random({2, 5, Hkv, D}, cache, rng), random({2, 5, Hkv, D}, cache, rng)},
                     {0});
}

// --- SwiGLU, router pieces -----------------------------------------------------------------

TEST(CpuBf16, SwiGluIsTheF32FormRoundedOnce) {
  Rng rng(8);
  const Shape s = {5, 12};
  for (DType side : {bf, f32}) {  // up and h (forward), dup (backward) bf16 or f32
    SCOPED_TRACE(dtype_name(side));
    expect_bf16_rule([](Tensors& t) { cpu().swiglu_forward(t[0], t[1], t[2]); },
                     {nan_out(s, side), random(s, bf, rng, 2.0), random(s, side, rng)}, {0});
    expect_bf16_rule([](Tensors& t) { cpu().swiglu_backward(t[0], t[1], t[2], t[3], t[4]); },
                     {nan_out(s, bf), nan_out(s, side), random(s, bf, rng), random(s, bf, rng, 2.0),
                      random(s, bf, rng)},
                     {0, 1});
  }
}

TEST(CpuBf16, RouterOpsAreTheF32FormsRoundedOnce) {
  Rng rng(9);
  const int64_t N = 6, E = 8, K = 3;
  const Shape ne = {N, E}, nk = {N, K};
  const Tensor ids = ids_tensor(nk, {0, 1, 2, 7, 6, 5, 3, 3, 1, 4, 0, 2, 5, 6, 7, 1, 3, 5});
  for (DType side : {bf, f32}) {
    SCOPED_TRACE(dtype_name(side));
    expect_bf16_rule([](Tensors& t) { cpu().softmax_forward(t[0], t[1]); },
                     {nan_out(ne, side), random(ne, bf, rng, 3.0)}, {0});
    expect_bf16_rule([](Tensors& t) { cpu().softmax_backward(t[0], t[1], t[2]); },
                     {nan_out(ne, bf), random(ne, side, rng), random_positive(ne, bf, rng)}, {0});
    expect_bf16_rule([&](Tensors& t) { cpu().gather_cols(t[0], t[1], ids); },
                     {nan_out(nk, side), random(ne, bf, rng)}, {0});
    expect_bf16_rule([&](Tensors& t) { cpu().scatter_add_cols(t[0], t[1], ids); },
                     {random(ne, side, rng), random(nk, bf, rng)}, {0});
    expect_bf16_rule([](Tensors& t) { cpu().normalize_rows_forward(t[0], t[1]); },
                     {nan_out(nk, side), random_positive(nk, bf, rng)}, {0});
    expect_bf16_rule([](Tensors& t) { cpu().normalize_rows_backward(t[0], t[1], t[2]); },
                     {nan_out(nk, bf), random(nk, side, rng), random_positive(nk, bf, rng)}, {0});
    // topk: ids [N, K] from bf16 scores, bias bf16 / f32 / undefined.
    expect_bf16_rule([](Tensors& t) { cpu().topk(t[0], t[1], t[2]); },
                     {ids_tensor(nk, std::vector<int32_t>(N * K, -1)), random(ne, bf, rng),
                      random({E}, side, rng, 0.3)},
                     {0});
  }
  expect_bf16_rule([](Tensors& t) { cpu().topk(t[0], t[1], t[2]); },
                   {ids_tensor(nk, std::vector<int32_t>(N * K, -1)), random(ne, bf, rng), Tensor()},
                   {0});
}

// --- token permutation ---------------------------------------------------------------------

TEST(CpuBf16, RowPermutationsAreTheF32FormsRoundedOnce) {
  Rng rng(10);
  const int64_t R = 6, M = 8, C = 5;
  const Tensor idx = ids_tensor({M}, {5, 0, 0, 3, 2, 5, 1, 0});  // repeats: sums in order of m
  const Tensor distinct = ids_tensor({4}, {4, 0, 2, 5});         // scatter_rows: distinct rows
  for (DType side : {bf, f32}) {
    SCOPED_TRACE(dtype_name(side));
    expect_bf16_rule([&](Tensors& t) { cpu().gather_rows(t[0], t[1], idx); },
                     {nan_out({M, C}, side), random({R, C}, bf, rng)}, {0});
    expect_bf16_rule([&](Tensors& t) { cpu().scatter_rows(t[0], t[1], distinct); },
                     {random({R, C}, side, rng), random({4, C}, bf, rng)}, {0});
    expect_bf16_rule([&](Tensors& t) { cpu().scatter_add_rows(t[0], t[1], idx, t[2]); },
                     {random({R, C}, side, rng), random({M, C}, bf, rng), random({M}, side, rng)},
                     {0});
  }
  expect_bf16_rule([&](Tensors& t) { cpu().scatter_add_rows(t[0], t[1], idx, t[2]); },
                   {random({R, C}, bf, rng), random({M, C}, bf, rng), Tensor()}, {0});
}

// --- LM head loss, optimizer ---------------------------------------------------------------

TEST(CpuBf16, LogProbIsTheF32FormRoundedOnce) {
  Rng rng(11);
  const int64_t N = 5, V = 11;
  const Tensor targets = ids_tensor({N}, {3, -1, 10, 0, 7});
  const Tensor logits = random({N, V}, bf, rng, 3.0);
  auto fwd = [&](Tensors& t) { cpu().logprob_forward(t[0], t[1], t[2], t[3], targets); };
  // bf16 logits with bf16 or with f32 log-probs, entropy and lse.
  for (DType side : {bf, f32})
    expect_bf16_rule(fwd, {nan_out({N}, side), nan_out({N}, side), nan_out({N}, side), logits},
                     {0, 1, 2});

  Tensor logp = nan_out({N}, f32), entropy = nan_out({N}, f32), lse = nan_out({N}, f32);
  cpu().logprob_forward(logp, entropy, lse, widen_to_f32(logits), targets);
  auto bwd = [&](Tensors& t) { cpu().logprob_backward(t[0], t[1], t[2], t[3], t[4], targets); };
  for (DType side : {bf, f32}) {  // dlogp, dentropy, lse bf16 or f32
    SCOPED_TRACE(dtype_name(side));
    const Tensor lse_side = side == bf ? narrow_to_bf16(lse) : lse;
    expect_bf16_rule(
        bwd,
        {nan_out({N, V}, bf), random({N}, side, rng), random({N}, side, rng), logits, lse_side},
        {0});
    expect_bf16_rule(bwd, {nan_out({N, V}, bf), random({N}, side, rng), Tensor(), logits, lse_side},
                     {0});
  }
}

TEST(CpuBf16, AdamWIsTheF32FormRoundedOnce) {
  Rng rng(12);
  const Shape s = {7, 9};
  auto op = [](Tensors& t) {
    cpu().adamw_step(t[0], t[1], t[2], t[3], 1e-2, 0.9, 0.95, 1e-8, 0.1, 3);
  };
  // All bf16; and f32 master weights and moments with a bf16 gradient.
  for (DType state : {bf, f32}) {
    SCOPED_TRACE(dtype_name(state));
    expect_bf16_rule(op,
                     {random(s, state, rng), random(s, bf, rng, 0.1), random(s, state, rng, 0.1),
                      random_positive(s, state, rng)},
                     {0, 2, 3});
  }
}

// --- accuracy against f64 --------------------------------------------------------------------

// bf16 results against f64 on the same (bf16-exact) inputs. The f32 arithmetic adds ~1e-6
// relative; rounding the output to bf16 adds at most 2^-9 ~ 2e-3 relative. 1e-2 leaves a
// margin while wrong data (a misread argument, a lost accumulation) shows up at ~1e-1.
TEST(CpuBf16, ResultsAreWithinBf16RoundingOfF64) {
  constexpr double kTolBf16 = 1e-2;
  Rng rng(13);
  auto f64_of = [](const Tensor& b) { return test::to_dtype(widen_to_f32(b), DType::f64); };
  {
    const Tensor a = random({16, 40}, bf, rng), b = random({40, 12}, bf, rng);
    Tensor c = nan_out({16, 12}, bf), c64 = nan_out({16, 12}, DType::f64);
    cpu().matmul(c, a, false, b, false);
    cpu().matmul(c64, f64_of(a), false, f64_of(b), false);
    test::expect_close(widen_to_f32(c), c64, kTolBf16, "matmul c");
  }
  {
    const Tensor x = random({6, 32}, bf, rng, 2.0), w = random({32}, bf, rng, 0.1, 1.0);
    Tensor y = nan_out({6, 32}, bf), rstd = nan_out({6}, bf);
    Tensor y64 = nan_out({6, 32}, DType::f64), rstd64 = nan_out({6}, DType::f64);
    cpu().rmsnorm_forward(y, rstd, x, w, 1e-5);
    cpu().rmsnorm_forward(y64, rstd64, f64_of(x), f64_of(w), 1e-5);
    test::expect_close(widen_to_f32(y), y64, kTolBf16, "rmsnorm y");
    test::expect_close(widen_to_f32(rstd), rstd64, kTolBf16, "rmsnorm rstd");
  }
  {
    const Tensor logits = random({5, 50}, bf, rng, 3.0);
    const Tensor targets = ids_tensor({5}, {1, 49, 0, 17, 30});
    Tensor logp = nan_out({5}, bf), ent = nan_out({5}, bf), lse = nan_out({5}, bf);
    Tensor logp64 = nan_out({5}, DType::f64), ent64 = nan_out({5}, DType::f64),
           lse64 = nan_out({5}, DType::f64);
    cpu().logprob_forward(logp, ent, lse, logits, targets);
    cpu().logprob_forward(logp64, ent64, lse64, f64_of(logits), targets);
    test::expect_close(widen_to_f32(logp), logp64, kTolBf16, "logp");
    test::expect_close(widen_to_f32(ent), ent64, kTolBf16, "entropy");
    test::expect_close(widen_to_f32(lse), lse64, kTolBf16, "lse");
  }
}

// --- conversions, upload and download ------------------------------------------------------

Tensor f32_of(const std::vector<float>& values) {
  Tensor t = Tensor::empty({static_cast<int64_t>(values.size())}, f32);
  std::copy(values.begin(), values.end(), t.data<float>());
  return t;
}
uint16_t bits(const Tensor& t, int64_t i) {
  return static_cast<const uint16_t*>(t.raw())[i];
}

TEST(CpuBf16, ConvertRoundsToNearestEven) {
  const float inf = std::numeric_limits<float>::infinity();
  const Tensor src = f32_of({1.0f, 1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-8f + 0x1p-20f,
                             -2.5f, inf, -inf, std::numeric_limits<float>::max(),
                             std::numeric_limits<float>::quiet_NaN(), 0.0f, -0.0f});
  // 1 + 2^-8 is halfway between 1 (0x3f80) and 1 + 2^-7 (0x3f81): to the even 0x3f80;
  // 1 + 3 * 2^-8 is halfway between 0x3f81 and 0x3f82: to the even 0x3f82; just above half
  // rounds up. FLT_MAX rounds up to inf.
  const std::vector<uint16_t> expected = {0x3f80, 0x3f80, 0x3f82, 0x3f81, 0xc020, 0x7f80,
                                          0xff80, 0x7f80, 0,      0x0000, 0x8000};
  Tensor dst = Tensor::empty(src.shape(), bf);
  cpu().convert(dst, src);
  for (int64_t i = 0; i < src.numel(); ++i) {
    if (i == 8) {
      EXPECT_TRUE(std::isnan(bf16_to_f32(bits(dst, i)))) << "NaN stays NaN";
      continue;
    }
    EXPECT_EQ(bits(dst, i), expected[i]) << "element " << i << " = " << src.data<float>()[i];
  }
  // f64 -> bf16 rounds through f32 (Backend::convert): 1 + 2^-8 + 2^-40 becomes the f32 tie
  // 1 + 2^-8, which rounds to even.
  Tensor d64 = Tensor::empty({3}, DType::f64);
  d64.data<double>()[0] = 1.0 + 0x1p-8 + 0x1p-40;
  d64.data<double>()[1] = -3.140625;  // exact in bf16
  d64.data<double>()[2] = 1e-3;
  Tensor b = Tensor::empty({3}, bf);
  cpu().convert(b, d64);
  EXPECT_EQ(bits(b, 0), 0x3f80);
  EXPECT_EQ(bf16_to_f32(bits(b, 1)), -3.140625f);
  EXPECT_EQ(bits(b, 2), f32_to_bf16(1e-3f));
  EXPECT_NE(bf16_to_f32(bits(b, 2)), 1e-3f);  // 1e-3 is not a bf16 value: it did round
}

// The bulk rounding (engine/dtype.h's f32_to_bf16_n, what host conversions and the transfer
// engine's bf16 slots use) gives the scalar f32_to_bf16's bits: on the special values (ties to
// even either way, the largest finite values that round to infinity, infinities, NaNs of
// every kind, subnormals, signed zeros) and on a million random bit patterns.
TEST(CpuBf16, BulkRoundingMatchesTheScalarBitForBit) {
  std::vector<uint32_t> patterns = {
      0x00000000u, 0x80000000u, 0x3f808000u, 0x3f818000u, 0x3f807fffu, 0x3f808001u, 0x7f7fffffu,
      0xff7fffffu, 0x7f7f8000u, 0x7f7f7fffu, 0x7f800000u, 0xff800000u, 0x7f800001u, 0x7fc00000u,
      0xffffffffu, 0x7fbfffffu, 0x00000001u, 0x00008000u, 0x00018000u, 0x807fffffu};
  uint64_t x = 0x9e3779b97f4a7c15ull;
  for (int i = 0; i < 1000000; ++i) {  // splitmix64
    uint64_t z = (x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    patterns.push_back(static_cast<uint32_t>(z ^ (z >> 31)));
  }
  std::vector<float> src(patterns.size());
  std::memcpy(src.data(), patterns.data(), patterns.size() * sizeof(float));
  std::vector<uint16_t> got(src.size());
  f32_to_bf16_n(got.data(), src.data(), static_cast<int64_t>(src.size()));
  int64_t wrong = 0;
  for (size_t i = 0; i < src.size(); ++i) {
    const bool bad = got[i] != f32_to_bf16(src[i]);
    if (bad && wrong < 5)
      ADD_FAILURE() << std::hex << "0x" << patterns[i] << ": 0x" << got[i] << " vs 0x"
                    << f32_to_bf16(src[i]);
    wrong += bad;
  }
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(got[2], 0x3f80) << "1 + 2^-8 ties to even: down";
  EXPECT_EQ(got[3], 0x3f82) << "1 + 3 x 2^-8 ties to even: up";
  EXPECT_EQ(got[6], 0x7f80) << "the largest f32 rounds to infinity";
  EXPECT_TRUE(std::isnan(bf16_to_f32(got[12]))) << "a NaN whose payload is in the low bits";
}

// Every bf16 bit pattern widens to f32 and f64 and narrows back unchanged (NaNs stay NaN),
// and the CPU override agrees with Backend::convert's host default for every dtype pair.
TEST(CpuBf16, ConvertRoundTripsEveryBf16Value) {
  Tensor all = Tensor::empty({65536}, bf);
  for (int64_t i = 0; i < 65536; ++i)
    static_cast<uint16_t*>(all.raw())[i] = static_cast<uint16_t>(i);
  for (DType wide : {f32, DType::f64}) {
    SCOPED_TRACE(dtype_name(wide));
    Tensor w = Tensor::empty({65536}, wide), back = Tensor::empty({65536}, bf);
    cpu().convert(w, all);
    cpu().convert(back, w);
    int64_t widen_errors = 0, narrow_errors = 0;
    for (int64_t i = 0; i < 65536; ++i) {
      const float orig = bf16_to_f32(bits(all, i));
      const bool nan = std::isnan(orig);
      if (nan ? !std::isnan(test::at(w, i)) : test::at(w, i) != orig) ++widen_errors;
      if (nan ? !std::isnan(bf16_to_f32(bits(back, i))) : bits(back, i) != bits(all, i))
        ++narrow_errors;
    }
    EXPECT_EQ(widen_errors, 0);
    EXPECT_EQ(narrow_errors, 0);
  }
}

TEST(CpuBf16, UploadRoundsAndDownloadWidens) {
  const std::vector<double> host = {1.0, 1.0 + 0x1p-8, 1.0 + 3 * 0x1p-8, -2.5, 1e-3, 3e38};
  const Tensor t = cpu().upload(host, {2, 3}, bf);
  ASSERT_EQ(t.dtype(), bf);
  ASSERT_EQ(t.shape(), (Shape{2, 3}));
  for (int64_t i = 0; i < 6; ++i)
    EXPECT_EQ(bits(t, i), f32_to_bf16(static_cast<float>(host[i]))) << "element " << i;
  const std::vector<double> down = cpu().download_f64(t);
  ASSERT_EQ(down.size(), host.size());
  EXPECT_EQ(down[0], 1.0);
  EXPECT_EQ(down[1], 1.0);  // the tie rounded to even
  EXPECT_EQ(down[2], 1.0 + 0x1p-6);
  EXPECT_EQ(down[3], -2.5);
  EXPECT_EQ(down[4], static_cast<double>(bf16_to_f32(f32_to_bf16(1e-3f))));
  EXPECT_NE(down[4], 1e-3);
  EXPECT_EQ(down[5], static_cast<double>(bf16_to_f32(bits(t, 5))));
}

// --- bad input -------------------------------------------------------------------------------

TEST(CpuBf16, Bf16WithF64IsRejectedNamingTheOp) {
  Tensor y = nan_out({2, 3}, bf), rstd = nan_out({2}, bf);
  const Tensor x = Tensor::zeros({2, 3}, bf), w64 = Tensor::zeros({3}, DType::f64);
  expect_error([&] { cpu().rmsnorm_forward(y, rstd, x, w64, 1e-5); },
               {"rmsnorm_forward", "bf16 mixes only with f32"});
  Tensor c = nan_out({2, 2}, DType::f64);
  expect_error(
      [&] {
        cpu().matmul(c, x, false, Tensor::zeros({3, 2}, bf), false);
      },
      {"matmul", "f64"});
}

TEST(CpuBf16, WrongShapeBf16ArgumentNamesTheTensor) {
  Tensor y = nan_out({4, 64}, bf), rstd = nan_out({4}, f32);
  const Tensor x = Tensor::zeros({4, 64}, bf), w = Tensor::zeros({32}, bf);
  expect_error([&] { cpu().rmsnorm_forward(y, rstd, x, w, 1e-5); },
               {"rmsnorm_forward: w must be f32[64] but is f32[32]", "bf16"});
  Tensor c = nan_out({2, 2}, bf);
  expect_error(
      [&] {
        cpu().matmul(c, Tensor::zeros({2, 3}, bf), false, Tensor::zeros({4, 2}, bf), false);
      },
      {"matmul: b must be", "[4, 2]", "bf16"});
  Tensor dw = Tensor::zeros({3, 4, 5}, bf);
  expect_error(
      [&] {
        cpu().grouped_weight_grad(dw, Tensor::zeros({6, 4}, bf), Tensor::zeros({6, 7}, bf),
                                  {0, 2, 4, 6});
      },
      {"grouped_weight_grad: x must be", "[6, 7]"});
}

}  // namespace
}  // namespace fm
