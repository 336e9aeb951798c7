// CUDA backend bf16 parity (engine/mixed_precision.h): every float op called with bf16
// tensors, and the f32/bf16 mixes a training step uses, against the rule itself: the CPU
// reference runs the op's f32 form on the same values widened to f32 (exact), and each
// output the CUDA call holds in bf16 is that f32 result rounded once to nearest even. So the
// reference needs nothing of the CPU backend's own bf16 path. Where the CUDA backend has a
// native bf16 kernel (fill, convert, axpy, scale, rowwise_dot, SwiGLU, RMSNorm, RoPE, the row
// copies and row sums, attention forward / backward / cached with an f32 lse, the log-prob with
// f32 per-row values, AdamW with a bf16 gradient) it must also give exactly the bits of its own
// f32 kernel on the widened values.
// Skips without a GPU.
//
// Tolerances: |cuda - ref| <= ulp + rel * (|ref| + scale), where ulp is one bf16 spacing at
// |ref| for a bf16 output (0 for f32) and rel, scale are the f32 op's own tolerance from
// cuda_parity*_test.cpp (the CUDA f32 kernels are a few f32 ulp from the CPU's; rounding
// both to bf16 then differs by at most one bf16 ulp). So non-GEMM ops are exact or within
// 1 bf16 ulp beyond the f32 tolerance; copies are bitwise.
// GEMMs (tensor cores, f32 accumulation, blocked differently from the CPU's BLAS): rel 1e-2,
// scale sqrt(K) / 3 (the typical |c| for inputs in U(-1, 1)). The inputs are exact in f32
// and the products exact, so the f32 sums differ by ~K * 6e-8 of the terms; the rest is the
// final bf16 rounding (<= 2^-8 relative). A wrong index or transpose errs by O(1).
#include <algorithm>
#include <cmath>
#include <functional>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "support/cuda_bf16.h"

namespace {

using fm::DType;
using fm::Shape;
using fm::Tensor;
using fm::testing::Backends;
using fm::testing::bits;
using fm::testing::check_native_is_widened;
using fm::testing::check_op;
using fm::testing::expect_bitwise_equal;
using fm::testing::group_offsets;
using fm::testing::i32_tensor;
using fm::testing::Op;
using fm::testing::Out;
using fm::testing::random;
using fm::testing::random_bf16;
using fm::testing::to_bf16;
using fm::testing::value;
using fm::testing::widened;

// --- memory ------------------------------------------------------------------------

TEST(CudaBf16, ConvertRoundTripsOnDevice) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(11);
  Tensor f = random({41, 23}, DType::f32, rng, -3, 3);
  // Special values: ties to even (1 + 2^-8 rounds down, 1 + 3 * 2^-8 up), -0, infinities,
  // a subnormal, and FLT_MAX (rounds to infinity).
  const float specials[] = {1.0f + 0x1p-8f,
                            1.0f + 3 * 0x1p-8f,
                            -0.0f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            0x1p-130f,
                            std::numeric_limits<float>::max()};
  std::copy(std::begin(specials), std::end(specials), f.data<float>());
  const Tensor want = to_bf16(f);  // the host's rounding
  const Tensor fd = b.up(f);

  Tensor hd = b.gpu->empty(f.shape(), DType::bf16);
  b.gpu->convert(hd, fd);  // f32 -> bf16 on the device
  const Tensor h = b.down(hd);
  expect_bitwise_equal(h, want, "convert f32 -> bf16 (device)");

  Tensor back = b.gpu->empty(f.shape(), DType::f32);
  b.gpu->convert(back, hd);  // bf16 -> f32: exact
  expect_bitwise_equal(b.down(back), widened(want), "convert bf16 -> f32 (device)");

  // f64 -> bf16 rounds through f32, as the host default does; bf16 -> f64 is exact.
  const Tensor d = random({41, 23}, DType::f64, rng, -3, 3);
  Tensor want_from_d = Tensor::empty(d.shape(), DType::bf16);
  b.cpu->convert(want_from_d, d);
  Tensor hd2 = b.gpu->empty(d.shape(), DType::bf16);
  b.gpu->convert(hd2, b.up(d));
  expect_bitwise_equal(b.down(hd2), want_from_d, "convert f64 -> bf16 (device)");
  Tensor d2 = b.gpu->empty(d.shape(), DType::f64);
  b.gpu->convert(d2, hd2);
  Tensor want_d2 = Tensor::empty(d.shape(), DType::f64);
  b.cpu->convert(want_d2, want_from_d);
  expect_bitwise_equal(b.down(d2), want_d2, "convert bf16 -> f64 (device)");

  // f32 <-> f64 on the device.
  Tensor dd = b.gpu->empty(f.shape(), DType::f64);
  b.gpu->convert(dd, fd);
  Tensor ff = b.gpu->empty(f.shape(), DType::f32);
  b.gpu->convert(ff, dd);
  expect_bitwise_equal(b.down(ff), f, "convert f32 -> f64 -> f32 (device)");

  // NaN stays NaN (payload bits may differ between host and device).
  Tensor nan = Tensor::empty({1}, DType::f32);
  nan.data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
  Tensor nan_d = b.gpu->empty({1}, DType::bf16);
  b.gpu->convert(nan_d, b.up(nan));
  EXPECT_TRUE(std::isnan(value(b.down(nan_d), 0))) << "convert keeps NaN";

  // Host <-> device goes through the host default.
  Tensor host_out = Tensor::empty(f.shape(), DType::bf16);
  b.gpu->convert(host_out, fd);
  expect_bitwise_equal(host_out, want, "convert device f32 -> host bf16");
}

TEST(CudaBf16, FillWritesTheCpuBits) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  for (double v : {-1.25, 0.1, 3e38}) {  // 0.1 and 3e38 are not bf16 values: both round
    Tensor c = Tensor::empty({17, 9}, DType::bf16);
    b.cpu->fill(c, v);
    Tensor g = b.gpu->empty({17, 9}, DType::bf16);
    b.gpu->fill(g, v);
    expect_bitwise_equal(b.down(g), c, "fill bf16 " + std::to_string(v));
  }
}

TEST(CudaBf16, MixingBf16WithF64Throws) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  Tensor y = b.gpu->empty({4}, DType::f64);
  const Tensor x = b.gpu->empty({4}, DType::bf16);
  EXPECT_THROW(b.gpu->axpy(y, 1.0, x), fm::Error);
}

// --- GEMM ----------------------------------------------------------------------------

constexpr double kGemmRel = 1e-2;  // see the file comment

TEST(CudaBf16, MatmulBf16InputsWithBf16OrF32Output) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  uint64_t seed = 100;
  const int64_t m = 37, n = 53, k = 129;
  for (DType c_type : {DType::bf16, DType::f32})
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (double beta : {0.0, 0.5}) {
          fm::Rng rng(++seed);
          const Tensor a = random_bf16(ta ? Shape{k, m} : Shape{m, k}, rng, -1, 1);
          const Tensor bm = random_bf16(tb ? Shape{n, k} : Shape{k, n}, rng, -1, 1);
          const Tensor c0f = random({m, n}, DType::f32, rng, -1, 1);
          const Tensor c0 = c_type == DType::bf16 ? to_bf16(c0f) : c0f;
          check_op(b,
                   "matmul c " + std::string(fm::dtype_name(c_type)) + " ta " + std::to_string(ta) +
                       " tb " + std::to_string(tb) + " beta " + std::to_string(beta),
                   {c0, a, bm}, {{0, "c", kGemmRel, std::sqrt(double(k)) / 3}},
                   [&](fm::Backend& be, std::vector<Tensor>& t) {
                     be.matmul(t[0], t[1], ta, t[2], tb, 0.75, beta);
                   });
        }
}

TEST(CudaBf16, MatmulWithEmptyInnerDimensionScalesBf16C) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(150);
  const Tensor c0 = random_bf16({5, 7}, rng, -1, 1);
  const Tensor a = to_bf16(Tensor::zeros({5, 0}, DType::f32));
  const Tensor bm = to_bf16(Tensor::zeros({0, 7}, DType::f32));
  for (double beta : {0.0, 0.5})
    check_op(b, "matmul K=0 beta " + std::to_string(beta), {c0, a, bm}, {{0, "c", 0.0, 0.0}},
             [&](fm::Backend& be, std::vector<Tensor>& t) {
               be.matmul(t[0], t[1], false, t[2], false, 1.0, beta);
             });
}

TEST(CudaBf16, GroupedMatmulBf16WithBf16OrF32Output) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  const std::vector<int64_t> off = group_offsets();
  const int64_t groups = 5, rows = off.back(), r = 24, s = 40;
  uint64_t seed = 200;
  for (DType y_type : {DType::bf16, DType::f32})
    for (bool trans_w : {false, true}) {
      fm::Rng rng(++seed);
      const int64_t k = trans_w ? s : r, n = trans_w ? r : s;
      const Tensor x = random_bf16({rows, k}, rng, -1, 1);
      const Tensor w = random_bf16({groups, r, s}, rng, -1, 1);
      const Tensor y0 = y_type == DType::bf16 ? to_bf16(Tensor::zeros({rows, n}, DType::f32))
                                              : Tensor::zeros({rows, n}, DType::f32);
      check_op(b,
               "grouped_matmul y " + std::string(fm::dtype_name(y_type)) + " trans_w " +
                   std::to_string(trans_w),
               {y0, x, w}, {{0, "y", kGemmRel, std::sqrt(double(k)) / 3}},
               [&](fm::Backend& be, std::vector<Tensor>& t) {
                 be.grouped_matmul(t[0], t[1], t[2], trans_w, off);
               });
    }
}

TEST(CudaBf16, GroupedWeightGradF32OrBf16FromBf16) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  const std::vector<int64_t> off = group_offsets();
  const int64_t groups = 5, rows = off.back(), r = 24, s = 40;
  for (DType dw_type : {DType::f32, DType::bf16}) {
    fm::Rng rng(300);
    const Tensor dy = random_bf16({rows, r}, rng, -1, 1);
    const Tensor x = random_bf16({rows, s}, rng, -1, 1);
    const Tensor dw0f = random({groups, r, s}, DType::f32, rng, -1, 1);
    const Tensor dw0 = dw_type == DType::bf16 ? to_bf16(dw0f) : dw0f;
    // dw0 + a sum of up to 13 products of size <= 1: scale 2 as in the f32 test.
    check_op(b, "grouped_weight_grad dw " + std::string(fm::dtype_name(dw_type)), {dw0, dy, x},
             {{0, "dw", kGemmRel, 2.0}}, [&](fm::Backend& be, std::vector<Tensor>& t) {
               be.grouped_weight_grad(t[0], t[1], t[2], off);
             });
    // Empty groups 1 and 4 keep their old gradient exactly.
    Tensor dw = b.up(dw0);
    b.gpu->grouped_weight_grad(dw, b.up(dy), b.up(x), off);
    const Tensor got = b.down(dw);
    for (int64_t g : {1, 4})
      expect_bitwise_equal(got.row(g), dw0.row(g), "empty group " + std::to_string(g));
  }
}

// --- elementwise and reductions ---------------------------------------------------------

TEST(CudaBf16, AxpyAndScaleNativeAndMixed) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(400);
  const Tensor y0 = random_bf16({41, 77}, rng, -2, 2);
  const Tensor x = random_bf16({41, 77}, rng, -2, 2);
  const Op axpy = [](fm::Backend& be, std::vector<Tensor>& t) { be.axpy(t[0], -0.3, t[1]); };
  const Op scale = [](fm::Backend& be, std::vector<Tensor>& t) { be.scale(t[0], 1.7); };
  // One rounding of one f32 operation each: the f32 tolerance plus one bf16 ulp.
  check_op(b, "axpy bf16", {y0, x}, {{0, "y", 1e-5, 1.0}}, axpy);
  check_op(b, "scale bf16", {y0}, {{0, "x", 1e-5, 0.0}}, scale);
  check_native_is_widened(b, "axpy", {y0, x}, {0}, axpy);
  check_native_is_widened(b, "scale", {y0}, {0}, scale);
  // f32 y with bf16 x (the widened path): f32 tolerance.
  check_op(b, "axpy f32 y, bf16 x", {widened(y0), x}, {{0, "y", 1e-5, 1.0}}, axpy);
}

TEST(CudaBf16, ReductionsAndRowVector) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(500);
  const int64_t n = 300, c = 45;
  const Tensor a = random_bf16({n, c}, rng, -1, 1);
  const Tensor bb = random_bf16({n, c}, rng, -1, 1);
  const Tensor v = random_bf16({c}, rng, -1, 1);
  const Op dot = [](fm::Backend& be, std::vector<Tensor>& t) { be.rowwise_dot(t[0], t[1], t[2]); };
  for (DType out_type : {DType::bf16, DType::f32}) {  // native for both
    const Tensor out0 = out_type == DType::bf16 ? to_bf16(Tensor::zeros({n}, DType::f32))
                                                : Tensor::zeros({n}, DType::f32);
    const std::string what = "rowwise_dot out " + std::string(fm::dtype_name(out_type));
    check_op(b, what, {out0, a, bb}, {{0, "out", 1e-5, std::sqrt(double(c)) / 3}}, dot);
    check_native_is_widened(b, what, {out0, a, bb}, {0}, dot);
  }
  check_op(b, "column_sum", {to_bf16(Tensor::zeros({c}, DType::f32)), a},
           {{0, "out", 1e-5, std::sqrt(double(n) / 3)}},
           [](fm::Backend& be, std::vector<Tensor>& t) { be.column_sum(t[0], t[1]); });
  check_op(b, "add_row_vector", {a, v}, {{0, "x", 1e-5, 1.0}},
           [](fm::Backend& be, std::vector<Tensor>& t) { be.add_row_vector(t[0], t[1], 0.6); });
  const double want = b.cpu->sum_squares(widened(a));
  const double got = b.gpu->sum_squares(b.up(a));
  EXPECT_NEAR(got, want, 1e-6 * want) << "sum_squares bf16 (f64 sum of widened squares)";
}

// --- SwiGLU, softmax, RMSNorm -------------------------------------------------------------

TEST(CudaBf16, SwigluForwardBackward) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(600);
  const Shape shape{29, 130};
  const Tensor gate = random_bf16(shape, rng, -8, 8);
  const Tensor up = random_bf16(shape, rng, -2, 2);
  const Tensor dh = random_bf16(shape, rng, -1, 1);
  const Tensor zero = to_bf16(Tensor::zeros(shape, DType::f32));
  const Op fwd = [](fm::Backend& be, std::vector<Tensor>& t) {
    be.swiglu_forward(t[0], t[1], t[2]);
  };
  const Op bwd = [](fm::Backend& be, std::vector<Tensor>& t) {
    be.swiglu_backward(t[0], t[1], t[2], t[3], t[4]);
  };
  check_op(b, "swiglu_forward", {zero, gate, up}, {{0, "h", 1e-5, 1e-3}}, fwd);
  check_op(b, "swiglu_backward", {zero, zero, dh, gate, up},
           {{0, "dgate", 1e-5, 1e-3}, {1, "dup", 1e-5, 1e-3}}, bwd);
  check_native_is_widened(b, "swiglu_forward", {zero, gate, up}, {0}, fwd);
  check_native_is_widened(b, "swiglu_backward", {zero, zero, dh, gate, up}, {0, 1}, bwd);
}

TEST(CudaBf16, SoftmaxForwardBackward) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(700);
  const int64_t n = 50, e = 67;
  const Tensor logits = random_bf16({n, e}, rng, -4, 4);
  const Tensor dprobs = random_bf16({n, e}, rng, -1, 1);
  const Tensor zero = to_bf16(Tensor::zeros({n, e}, DType::f32));
  check_op(b, "softmax_forward", {zero, logits}, {{0, "probs", 1e-5, 1e-7}},
           [](fm::Backend& be, std::vector<Tensor>& t) { be.softmax_forward(t[0], t[1]); });
  Tensor probs_f32 = Tensor::empty({n, e}, DType::f32);
  b.cpu->softmax_forward(probs_f32, widened(logits));
  check_op(b, "softmax_backward", {zero, dprobs, to_bf16(probs_f32)},
           {{0, "dlogits", 1e-5, 1.0 / e}},
           [](fm::Backend& be, std::vector<Tensor>& t) { be.softmax_backward(t[0], t[1], t[2]); });
}

TEST(CudaBf16, RmsnormWithF32Rstd) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(800);
  const int64_t n = 33, c = 257;
  const double eps = 1e-5;
  const Tensor x = random_bf16({n, c}, rng, -2, 2);
  const Tensor w = random_bf16({c}, rng, 0.5, 1.5);
  const Tensor dy = random_bf16({n, c}, rng, -1, 1);
  const Tensor dw0f = random({c}, DType::f32, rng, -1, 1);
  const Tensor y0 = to_bf16(Tensor::zeros({n, c}, DType::f32));
  const Tensor rstd0 = Tensor::zeros({n}, DType::f32);
  const Op fwd = [eps](fm::Backend& be, std::vector<Tensor>& t) {
    be.rmsnorm_forward(t[0], t[1], t[2], t[3], eps);
  };
  check_op(b, "rmsnorm_forward", {y0, rstd0, x, w},
           {{0, "y", 1e-5, 1e-3}, {1, "rstd (f32)", 1e-5, 0.0}}, fwd);
  check_native_is_widened(b, "rmsnorm_forward", {y0, rstd0, x, w}, {0, 1}, fwd);

  Tensor rstd = Tensor::empty({n}, DType::f32), y = Tensor::empty({n, c}, DType::f32);
  b.cpu->rmsnorm_forward(y, rstd, widened(x), widened(w), eps);
  const Op bwd = [](fm::Backend& be, std::vector<Tensor>& t) {
    be.rmsnorm_backward(t[0], t[1], t[2], t[3], t[4], t[5]);
  };
  for (DType dw_type : {DType::f32, DType::bf16}) {
    const Tensor dw0 = dw_type == DType::bf16 ? to_bf16(dw0f) : dw0f;
    const std::string what = "rmsnorm_backward dw " + std::string(fm::dtype_name(dw_type));
    check_op(b, what, {y0, dw0, dy, x, w, rstd},
             {{0, "dx", 1e-5, 1.0}, {1, "dw", 1e-5, std::sqrt(double(n))}}, bwd);
    check_native_is_widened(b, what, {y0, dw0, dy, x, w, rstd}, {0, 1}, bwd);
  }
}

TEST(CudaBf16, RouterColumnOps) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(900);
  const int64_t n = 40, e = 16, k = 4;
  const Tensor scores = random_bf16({n, e}, rng, -1, 1);
  const Tensor bias = random_bf16({e}, rng, -0.1, 0.1);
  Tensor ids = Tensor::empty({n, k}, DType::i32);
  b.cpu->topk(ids, widened(scores), widened(bias));
  Tensor ids_gpu = b.gpu->empty({n, k}, DType::i32);
  b.gpu->topk(ids_gpu, b.up(scores), b.up(bias));
  expect_bitwise_equal(b.down(ids_gpu), ids, "topk on bf16 scores");

  const Tensor zero_nk = to_bf16(Tensor::zeros({n, k}, DType::f32));
  check_op(b, "gather_cols", {zero_nk, scores, ids}, {{0, "out", 0.0, 0.0}},
           [](fm::Backend& be, std::vector<Tensor>& t) { be.gather_cols(t[0], t[1], t[2]); });
  const Tensor dout = random_bf16({n, k}, rng, -1, 1);
  check_op(b, "scatter_add_cols", {scores, dout, ids}, {{0, "dx", 1e-5, 1.0}},
           [](fm::Backend& be, std::vector<Tensor>& t) { be.scatter_add_cols(t[0], t[1], t[2]); });
  const Tensor p = random_bf16({n, k}, rng, 0.05, 1);
  const Tensor dg = random_bf16({n, k}, rng, -1, 1);
  check_op(b, "normalize_rows_forward", {zero_nk, p}, {{0, "g", 1e-5, 1e-3}},
           [](fm::Backend& be, std::vector<Tensor>& t) { be.normalize_rows_forward(t[0], t[1]); });
  check_op(b, "normalize_rows_backward", {zero_nk, dg, p}, {{0, "dp", 1e-5, 1.0}},
           [](fm::Backend& be, std::vector<Tensor>& t) {
             be.normalize_rows_backward(t[0], t[1], t[2]);
           });
}

// --- embedding, rows, RoPE -------------------------------------------------------------------

TEST(CudaBf16, EmbeddingAndRowOps) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(1000);
  const int64_t vocab = 50, c = 24;
  const Tensor table = random_bf16({vocab, c}, rng, -1, 1);
  std::vector<int32_t> idv;
  for (int i = 0; i < 37; ++i) idv.push_back(static_cast<int32_t>((i * 17 + 3) % vocab));
  const Tensor ids = i32_tensor(idv);  // repeats, so the backward adds several rows
  const Tensor out0 = to_bf16(Tensor::zeros({37, c}, DType::f32));
  const Op emb = [](fm::Backend& be, std::vector<Tensor>& t) {
    be.embedding_forward(t[0], t[1], t[2]);
  };
  check_op(b, "embedding_forward", {out0, table, ids}, {{0, "out", 0.0, 0.0}}, emb);
  check_native_is_widened(b, "embedding_forward", {out0, table, ids}, {0}, emb);
  const Tensor dout = random_bf16({37, c}, rng, -1, 1);
  const Op emb_back = [](fm::Backend& be, std::vector<Tensor>& t) {
    be.embedding_backward(t[0], t[1], t[2]);
  };
  for (DType dt : {DType::bf16, DType::f32}) {  // f32 dtable from bf16 dout: a mix
    const Tensor dtable0 = dt == DType::bf16 ? table : widened(table);
    check_op(b, "embedding_backward dtable " + std::string(fm::dtype_name(dt)),
             {dtable0, dout, ids}, {{0, "dtable", 1e-5, 1.0}}, emb_back);
  }
  check_native_is_widened(b, "embedding_backward", {table, dout, ids}, {0}, emb_back);
  const Op gather = [](fm::Backend& be, std::vector<Tensor>& t) {
    be.gather_rows(t[0], t[1], t[2]);
  };
  check_op(b, "gather_rows", {out0, table, ids}, {{0, "out", 0.0, 0.0}}, gather);
  check_native_is_widened(b, "gather_rows", {out0, table, ids}, {0}, gather);
  const Tensor distinct = i32_tensor({7, 0, 49, 13, 22});
  const Tensor src = random_bf16({5, c}, rng, -1, 1);
  const Op scatter = [](fm::Backend& be, std::vector<Tensor>& t) {
    be.scatter_rows(t[0], t[1], t[2]);
  };
  check_op(b, "scatter_rows", {table, src, distinct}, {{0, "dst", 0.0, 0.0}}, scatter);
  check_native_is_widened(b, "scatter_rows", {table, src, distinct}, {0}, scatter);
  const Tensor wrow = random_bf16({37}, rng, 0, 1);
  const Op scatter_add = [](fm::Backend& be, std::vector<Tensor>& t) {
    be.scatter_add_rows(t[0], t[1], t[2], t[3]);
  };
  for (bool weighted : {false, true}) {
    const std::string what = std::string("scatter_add_rows weighted ") + (weighted ? "yes" : "no");
    const std::vector<Tensor> args{table, dout, ids, weighted ? wrow : Tensor()};
    check_op(b, what, args, {{0, "dst", 1e-5, 1.0}}, scatter_add);
    check_native_is_widened(b, what, args, {0}, scatter_add);
  }
}

TEST(CudaBf16, RopeForwardAndInverse) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(1100);
  const Tensor x = random_bf16({12, 3, 16}, rng, -1, 1);
  std::vector<int32_t> pos;
  for (int i = 0; i < 12; ++i) pos.push_back(i * 37 % 500);
  for (bool inverse : {false, true}) {
    const std::string what = std::string("rope inverse ") + (inverse ? "yes" : "no");
    const Op op = [inverse](fm::Backend& be, std::vector<Tensor>& t) {
      be.rope(t[0], t[1], 10000.0, inverse);
    };
    check_op(b, what, {x, i32_tensor(pos)}, {{0, "x", 1e-6, 1.0}}, op);
    check_native_is_widened(b, what, {x, i32_tensor(pos)}, {0}, op);
  }
}

// --- attention ---------------------------------------------------------------------------------

// These check foremoe's attention kernels; cuDNN's path, the bf16 default in builds with
// cuDNN, has its own tests (cuda_cudnn_attention_test.cpp).
TEST(CudaBf16, AttentionWithF32Lse) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::set_cuda_attention(*b.gpu, fm::CudaAttention::kernel);
  fm::Rng rng(1200);
  const int64_t n = 40, hq = 4, hkv = 2, d = 16;
  const double scale = 0.25;
  const Tensor seq_off = i32_tensor({0, 17, 17, 40});
  const Tensor q = random_bf16({n, hq, d}, rng, -1, 1);
  const Tensor k = random_bf16({n, hkv, d}, rng, -1, 1);
  const Tensor v = random_bf16({n, hkv, d}, rng, -1, 1);
  const Tensor out0 = to_bf16(Tensor::zeros({n, hq, d}, DType::f32));
  const Tensor lse0 = Tensor::zeros({n, hq}, DType::f32);
  const Op fwd = [scale](fm::Backend& be, std::vector<Tensor>& t) {
    be.attention_forward(t[0], t[1], t[2], t[3], t[4], t[5], scale);
  };
  check_op(b, "attention_forward", {out0, lse0, q, k, v, seq_off},
           {{0, "out", 1e-5, 1.0}, {1, "lse (f32)", 1e-5, 1.0}}, fwd);
  check_native_is_widened(b, "attention_forward", {out0, lse0, q, k, v, seq_off}, {0, 1}, fwd);

  // The backward from the CPU's forward (out rounded to bf16, lse f32).
  Tensor out = Tensor::empty({n, hq, d}, DType::f32), lse = Tensor::empty({n, hq}, DType::f32);
  b.cpu->attention_forward(out, lse, widened(q), widened(k), widened(v), seq_off, scale);
  const Tensor dout = random_bf16({n, hq, d}, rng, -1, 1);
  const Tensor dkv0 = to_bf16(Tensor::zeros({n, hkv, d}, DType::f32));
  const Op bwd = [scale](fm::Backend& be, std::vector<Tensor>& t) {
    be.attention_backward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], scale);
  };
  const std::vector<Tensor> bwd_args{out0, dkv0, dkv0, dout, q, k, v, to_bf16(out), lse, seq_off};
  check_op(b, "attention_backward", bwd_args,
           {{0, "dq", 1e-4, 1.0}, {1, "dk", 1e-4, 1.0}, {2, "dv", 1e-4, 1.0}}, bwd);
  check_native_is_widened(b, "attention_backward", bwd_args, {0, 1, 2}, bwd);

  // Cached attention over a bf16 KV cache.
  const int64_t slots = 2, max_len = 8;
  const Tensor kc = random_bf16({slots, max_len, hkv, d}, rng, -1, 1);
  const Tensor vc = random_bf16({slots, max_len, hkv, d}, rng, -1, 1);
  const Tensor qc = random_bf16({3, hq, d}, rng, -1, 1);
  const Op cached = [scale](fm::Backend& be, std::vector<Tensor>& t) {
    be.attention_cached(t[0], t[1], t[2], t[3], t[4], t[5], scale);
  };
  const std::vector<Tensor> cached_args{to_bf16(Tensor::zeros({3, hq, d}, DType::f32)),
                                        qc,
                                        kc,
                                        vc,
                                        i32_tensor({0, 1, 1}),
                                        i32_tensor({5, 2, 7})};
  check_op(b, "attention_cached", cached_args, {{0, "out", 1e-5, 1.0}}, cached);
  check_native_is_widened(b, "attention_cached", cached_args, {0}, cached);
}

// The native bf16 attention kernels over rows of several 32-key chunks (online-softmax
// rescaling, dk/dv over several query chunks) and a head dim that is not a multiple of 32
// (4 columns per lane, the last lanes idle): exactly the f32 kernels' bits rounded once.
TEST(CudaBf16, AttentionNativeIsWidenedOverLongRows) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::set_cuda_attention(*b.gpu, fm::CudaAttention::kernel);
  fm::Rng rng(1250);
  const int64_t n = 75, hq = 4, hkv = 1, d = 80;
  const double scale = 1.0 / std::sqrt(double(d));
  const Tensor seq_off = i32_tensor({0, 5, 75});  // a 70-token sequence: 3 key chunks
  const Tensor q = random_bf16({n, hq, d}, rng, -1, 1);
  const Tensor k = random_bf16({n, hkv, d}, rng, -1, 1);
  const Tensor v = random_bf16({n, hkv, d}, rng, -1, 1);
  const Tensor out0 = to_bf16(Tensor::zeros({n, hq, d}, DType::f32));
  const Tensor lse0 = Tensor::zeros({n, hq}, DType::f32);
  check_native_is_widened(b, "attention_forward (long rows)", {out0, lse0, q, k, v, seq_off},
                          {0, 1}, [scale](fm::Backend& be, std::vector<Tensor>& t) {
                            be.attention_forward(t[0], t[1], t[2], t[3], t[4], t[5], scale);
                          });

  Tensor out = Tensor::empty({n, hq, d}, DType::f32), lse = Tensor::empty({n, hq}, DType::f32);
  b.cpu->attention_forward(out, lse, widened(q), widened(k), widened(v), seq_off, scale);
  const Tensor dout = random_bf16({n, hq, d}, rng, -1, 1);
  const Tensor dkv0 = to_bf16(Tensor::zeros({n, hkv, d}, DType::f32));
  check_native_is_widened(b, "attention_backward (long rows)",
                          {out0, dkv0, dkv0, dout, q, k, v, to_bf16(out), lse, seq_off}, {0, 1, 2},
                          [scale](fm::Backend& be, std::vector<Tensor>& t) {
                            be.attention_backward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7],
                                                  t[8], t[9], scale);
                          });

  // Decode over a bf16 cache: rows of 1, 34, 65 and 80 keys.
  const int64_t slots = 3, max_len = 80;
  const Tensor kc = random_bf16({slots, max_len, hkv, d}, rng, -1, 1);
  const Tensor vc = random_bf16({slots, max_len, hkv, d}, rng, -1, 1);
  const Tensor qc = random_bf16({4, hq, d}, rng, -1, 1);
  check_native_is_widened(b, "attention_cached (long rows)",
                          {to_bf16(Tensor::zeros({4, hq, d}, DType::f32)), qc, kc, vc,
                           i32_tensor({2, 0, 1, 2}), i32_tensor({0, 33, 64, 79})},
                          {0}, [scale](fm::Backend& be, std::vector<Tensor>& t) {
                            be.attention_cached(t[0], t[1], t[2], t[3], t[4], t[5], scale);
                          });
}

// --- LM head, sampling, optimizer -----------------------------------------------------------

TEST(CudaBf16, LogprobWithBf16LogitsAndF32Outputs) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(1300);
  const int64_t n = 9, v = 100;
  const Tensor logits = random_bf16({n, v}, rng, -4, 4);
  const Tensor targets = i32_tensor({3, -1, 99, 0, 50, 7, 7, -1, 12});
  const Tensor row0 = Tensor::zeros({n}, DType::f32);
  const Op fwd = [](fm::Backend& be, std::vector<Tensor>& t) {
    be.logprob_forward(t[0], t[1], t[2], t[3], t[4]);
  };
  // logp, lse ~ log V + O(1), entropy ~ log V: scale 1 as in the f32 test.
  check_op(b, "logprob_forward", {row0, row0, row0, logits, targets},
           {{0, "logp", 1e-5, 1.0}, {1, "entropy", 1e-5, 1.0}, {2, "lse", 1e-5, 1.0}}, fwd);
  check_native_is_widened(b, "logprob_forward", {row0, row0, row0, logits, targets}, {0, 1, 2},
                          fwd);
  Tensor logp = Tensor::empty({n}, DType::f32), ent = Tensor::empty({n}, DType::f32),
         lse = Tensor::empty({n}, DType::f32);
  b.cpu->logprob_forward(logp, ent, lse, widened(logits), targets);
  const Tensor dlogp = random({n}, DType::f32, rng, -1, 1);
  const Tensor dentropy = random({n}, DType::f32, rng, -1, 1);
  const Op bwd = [](fm::Backend& be, std::vector<Tensor>& t) {
    be.logprob_backward(t[0], t[1], t[2], t[3], t[4], t[5]);
  };
  for (bool with_entropy : {false, true}) {
    const std::string what =
        std::string("logprob_backward entropy ") + (with_entropy ? "yes" : "no");
    const std::vector<Tensor> args{to_bf16(Tensor::zeros({n, v}, DType::f32)),
                                   dlogp,
                                   with_entropy ? dentropy : Tensor(),
                                   logits,
                                   lse,
                                   targets};
    // dlogits = dlogp (onehot - p) + dentropy (...): terms of size <= ~|dlogp| + |dentropy|
    // * log V; scale 1 judges the ones near zero.
    check_op(b, what, args, {{0, "dlogits", 1e-5, 1.0}}, bwd);
    check_native_is_widened(b, what, args, {0}, bwd);
  }
  // bf16 logp (all-bf16 call): the widened path, each output rounded once.
  const Tensor row0_bf16 = to_bf16(row0);
  check_op(b, "logprob_forward all bf16", {row0_bf16, row0_bf16, row0_bf16, logits, targets},
           {{0, "logp", 1e-5, 1.0}, {1, "entropy", 1e-5, 1.0}, {2, "lse", 1e-5, 1.0}}, fwd);
}

TEST(CudaBf16, SampleRowsOnBf16LogitsEqualsWidened) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(1400);
  const int64_t rows = 4, v = 50;
  const Tensor logits = random_bf16({rows, v}, rng, -3, 3);
  const Tensor u = random({rows}, DType::f64, rng, 0, 1);
  for (double temperature : {0.0, 1.0}) {
    fm::SamplingParams params;
    params.temperature = temperature;
    params.top_k = 20;
    Tensor ids[2], logp[2], model_logp[2];
    for (int i = 0; i < 2; ++i) {
      ids[i] = b.gpu->empty({rows}, DType::i32);
      logp[i] = b.gpu->empty({rows}, DType::f64);
      model_logp[i] = b.gpu->empty({rows}, DType::f64);
      b.gpu->sample_rows(ids[i], logp[i], model_logp[i], b.up(i == 0 ? logits : widened(logits)),
                         b.up(u), params);
    }
    const std::string what = "sample_rows temperature " + std::to_string(temperature);
    expect_bitwise_equal(b.down(ids[0]), b.down(ids[1]), what + " ids");
    expect_bitwise_equal(b.down(logp[0]), b.down(logp[1]), what + " logp");
    expect_bitwise_equal(b.down(model_logp[0]), b.down(model_logp[1]), what + " model_logp");
  }
}

TEST(CudaBf16, AdamwWithBf16GradAndF32State) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(1500);
  const Shape shape{1000, 3};
  const Tensor p0 = random(shape, DType::f32, rng, -1, 1);
  const Tensor m0 = random(shape, DType::f32, rng, -1e-2, 1e-2);
  const Tensor v0 = random(shape, DType::f32, rng, 0, 1e-4);
  const Tensor g = random_bf16(shape, rng, -1e-2, 1e-2);
  const Op steps = [](fm::Backend& be, std::vector<Tensor>& t) {
    for (int64_t step = 7; step <= 9; ++step)  // the state must carry over
      be.adamw_step(t[0], t[1], t[2], t[3], 1e-3, 0.9, 0.95, 1e-8, 0.1, step);
  };
  // Elementwise f32 arithmetic: a few f32 ulp relative to each value (the f32 test's bounds).
  const std::vector<Out> outs{{0, "param", 1e-5, 1e-3}, {2, "m", 1e-5, 1e-6}, {3, "v", 1e-5, 1e-8}};
  check_op(b, "adamw_step bf16 grad", {p0, g, m0, v0}, outs, steps);
  check_native_is_widened(b, "adamw_step bf16 grad", {p0, g, m0, v0}, {0, 2, 3}, steps);
  // bf16 param and moments: the widened path, each rounded once per step on both sides.
  check_op(b, "adamw_step all bf16", {to_bf16(p0), g, to_bf16(m0), to_bf16(v0)}, outs,
           [](fm::Backend& be, std::vector<Tensor>& t) {
             be.adamw_step(t[0], t[1], t[2], t[3], 1e-3, 0.9, 0.95, 1e-8, 0.1, 7);
           });
}

}  // namespace
