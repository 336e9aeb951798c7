// The CPU backend rejects bad arguments with an fm::Error naming the op and the
// tensor, and never reads out of bounds for bad ids.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <limits>

#include "engine/backend.h"
#include "engine/error.h"
#include "engine/rng.h"
#include "tests/engine/cpu_test_support.h"

namespace fm {
namespace {

using testing::HasSubstr;

std::unique_ptr<Backend> g_cpu = make_cpu_backend();
Backend& cpu() {
  return *g_cpu;
}

template <class F>
void expect_error(F&& f, const std::string& substr) {
  try {
    f();
    ADD_FAILURE() << "no fm::Error thrown; expected one containing \"" << substr << "\"";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(substr));
  }
}

Tensor f32(Shape s) {
  return Tensor::zeros(std::move(s), DType::f32);
}
Tensor f64(Shape s) {
  return Tensor::zeros(std::move(s), DType::f64);
}

TEST(CpuBadInput, WrongWeightShapeNamesOpTensorAndShapes) {
  Tensor y = f32({4, 64}), rstd = f32({4});
  expect_error(
      [&] {
        cpu().rmsnorm_forward(y, rstd, f32({4, 64}), f32({32}), 1e-5);
      },
      "rmsnorm_forward: w must be f32[64] but is f32[32] on cpu");
}

TEST(CpuBadInput, MixedFloatDtypesAreRejected) {
  Tensor y = f32({2, 3}), rstd = f32({2});
  expect_error(
      [&] {
        cpu().rmsnorm_forward(y, rstd, f32({2, 3}), f64({3}), 1e-5);
      },
      "rmsnorm_forward: w must be f32[3]");
  Tensor h = f64({2, 3});
  expect_error([&] { cpu().swiglu_forward(h, f32({2, 3}), f32({2, 3})); }, "swiglu_forward: h");
}

TEST(CpuBadInput, NonFloatOrUndefinedTensorsAreRejected) {
  Tensor p = Tensor::zeros({2, 3}, DType::i32);
  expect_error(
      [&] {
        cpu().softmax_forward(p, Tensor::zeros({2, 3}, DType::i32));
      },
      "softmax_forward: logits must be an f32, f64 or bf16 tensor");
  Tensor out = f32({2, 3});
  expect_error([&] { cpu().softmax_forward(out, Tensor()); },
               "softmax_forward: logits is undefined");
}

TEST(CpuBadInput, MatmulInnerDimensionMismatch) {
  Tensor c = f32({3, 5});
  expect_error(
      [&] {
        cpu().matmul(c, f32({3, 4}), false, f32({5, 5}), false);
      },
      "matmul: b must be");
  // op(a) = [3, 4] but op(b) = b^T = [5, 4]
  expect_error(
      [&] {
        cpu().matmul(c, f32({4, 3}), true, f32({4, 5}), true, 1.0, 0.0);
      },
      "matmul: b must be f32 with cols = 4");
  Tensor c_bad = f32({3, 6});
  expect_error(
      [&] {
        cpu().matmul(c_bad, f32({3, 4}), false, f32({4, 5}), false);
      },
      "matmul: c must be f32[3, 5]");
}

TEST(CpuBadInput, GroupOffsetsMustCoverTheRows) {
  Tensor y = f32({6, 4});
  const Tensor x = f32({6, 3}), w = f32({2, 3, 4});
  expect_error(
      [&] {
        cpu().grouped_matmul(y, x, w, false, {0, 2});
      },
      "grouped_matmul: off must have");
  expect_error(
      [&] {
        cpu().grouped_matmul(y, x, w, false, {0, 2, 5});
      },
      "grouped_matmul: off must run");
  expect_error(
      [&] {
        cpu().grouped_matmul(y, x, w, false, {0, 7, 6});
      },
      "grouped_matmul: off must be non-decreasing");
  Tensor dw = f32({2, 4, 3});
  expect_error(
      [&] {
        cpu().grouped_weight_grad(dw, f32({6, 4}), f32({6, 3}), {1, 2, 6});
      },
      "grouped_weight_grad: off must run");
}

TEST(CpuBadInput, EmbeddingIdsOutOfRangeThrow) {
  Tensor out = f32({3, 2});
  const Tensor table = f32({5, 2});
  expect_error(
      [&] {
        cpu().embedding_forward(out, table, test::int_tensor({3}, {0, 5, 1}));
      },
      "embedding_forward: ids[1] = 5 is out of range [0, 5)");
  Tensor dtable = f32({5, 2});
  expect_error(
      [&] {
        cpu().embedding_backward(dtable, f32({3, 2}), test::int_tensor({3}, {0, 1, -1}));
      },
      "embedding_backward: ids[2] = -1");
}

TEST(CpuBadInput, RowAndColumnIndicesOutOfRangeThrow) {
  Tensor out = f32({2, 3});
  expect_error(
      [&] {
        cpu().gather_rows(out, f32({4, 3}), test::int_tensor({2}, {4, 0}));
      },
      "gather_rows: idx[0] = 4");
  Tensor dst = f32({4, 3});
  expect_error(
      [&] {
        cpu().scatter_add_rows(dst, f32({2, 3}), test::int_tensor({2}, {1, 9}), Tensor());
      },
      "scatter_add_rows: idx[1] = 9");
  expect_error(
      [&] {
        cpu().scatter_add_rows(dst, f32({2, 3}), test::int_tensor({2}, {1, 2}), f32({3}));
      },
      "scatter_add_rows: w must be f32[2]");
  Tensor cols = f32({2, 1});
  expect_error(
      [&] {
        cpu().gather_cols(cols, f32({2, 3}), test::int_tensor({2, 1}, {0, 3}));
      },
      "gather_cols: ids[1] = 3");
  Tensor dx = f32({2, 3});
  expect_error(
      [&] {
        cpu().scatter_add_cols(dx, f32({2, 1}), test::int_tensor({2, 1}, {-2, 0}));
      },
      "scatter_add_cols: ids[0] = -2");
}

TEST(CpuBadInput, TopkRejectsTooManyExpertsAndNaNScores) {
  Tensor ids = Tensor::empty({2, 4}, DType::i32);
  expect_error(
      [&] {
        cpu().topk(ids, f32({2, 3}), Tensor());
      },
      "topk: ids must be i32[2, K] with K <= E = 3");
  Tensor ids2 = Tensor::empty({2, 1}, DType::i32);
  Tensor scores = f32({2, 3});
  scores.data<float>()[4] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { cpu().topk(ids2, scores, Tensor()); }, "topk: row 1");
  expect_error([&] { cpu().topk(ids2, f32({2, 3}), f32({4})); }, "topk: bias must be f32[3]");
}

TEST(CpuBadInput, AttentionRejectsBadSequenceOffsetsAndHeads) {
  const Tensor q = f32({5, 4, 2}), k = f32({5, 2, 2}), v = f32({5, 2, 2});
  Tensor out = f32({5, 4, 2}), lse = f32({5, 4});
  expect_error(
      [&] {
        cpu().attention_forward(out, lse, q, k, v, test::int_tensor({3}, {0, 2, 4}), 1.0);
      },
      "attention_forward: seq_off must run from 0 to N = 5");
  expect_error(
      [&] {
        cpu().attention_forward(out, lse, q, k, v, test::int_tensor({3}, {1, 2, 5}), 1.0);
      },
      "attention_forward: seq_off must run from 0");
  expect_error(
      [&] {
        cpu().attention_forward(out, lse, q, k, v, test::int_tensor({4}, {0, 3, 2, 5}), 1.0);
      },
      "attention_forward: seq_off must be non-decreasing");
  expect_error(
      [&] {
        cpu().attention_forward(out, lse, q, f32({5, 3, 2}), f32({5, 3, 2}),
                                test::int_tensor({2}, {0, 5}), 1.0);
      },
      "attention_forward: k must be");
  Tensor dq = f32({5, 4, 2}), dk = f32({5, 2, 2}), dv = f32({5, 3, 2});
  expect_error(
      [&] {
        cpu().attention_backward(dq, dk, dv, out, q, k, v, out, lse, test::int_tensor({2}, {0, 5}),
                                 1.0);
      },
      "attention_backward: dv must match k");
}

TEST(CpuBadInput, LogprobTargetBeyondVocabThrows) {
  Tensor logp = f32({2}), entropy = f32({2}), lse = f32({2});
  expect_error(
      [&] {
        cpu().logprob_forward(logp, entropy, lse, f32({2, 4}), test::int_tensor({2}, {1, 4}));
      },
      "logprob_forward: targets[1] = 4 is out of range");
}

TEST(CpuBadInput, RopeNeedsEvenHeadDim) {
  Tensor x = f32({2, 1, 3});
  expect_error(
      [&] {
        cpu().rope(x, test::int_tensor({2}, {0, 1}), 1e4, false);
      },
      "rope: the head dim of x must be even");
  Tensor y = f32({2, 1, 4});
  expect_error(
      [&] {
        cpu().rope(y, test::int_tensor({3}, {0, 1, 2}), 1e4, false);
      },
      "rope: pos must be i32[2]");
}

TEST(CpuBadInput, AdamwRejectsStepZeroAndMismatchedState) {
  Tensor p = f32({4}), m = f32({4}), v = f32({4});
  expect_error([&] { cpu().adamw_step(p, f32({4}), m, v, 1e-3, 0.9, 0.95, 1e-8, 0.0, 0); },
               "adamw_step: step must be >= 1");
  Tensor v_bad = f32({5});
  expect_error([&] { cpu().adamw_step(p, f32({4}), m, v_bad, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1); },
               "adamw_step: v must match param");
}

TEST(CpuBadInput, FillRejectsValuesAnIntegerDtypeCannotHold) {
  Tensor u = Tensor::empty({2}, DType::u8);
  expect_error([&] { cpu().fill(u, 256.0); }, "fill: u8 cannot hold the value 256");
  Tensor i = Tensor::empty({2}, DType::i32);
  expect_error([&] { cpu().fill(i, 1.5); }, "fill: i32 cannot hold the value 1.5");
}

TEST(CpuBadInput, CopyRejectsMismatchAndUnreachableDevices) {
  Tensor dst = f32({2, 3});
  expect_error(
      [&] {
        cpu().copy(dst, f32({3, 2}));
      },
      "copy: dst f32[2, 3] on cpu and src f32[3, 2] on cpu");
  float storage[6] = {};
  const Tensor gpu = Tensor::view(storage, {2, 3}, DType::f32, Device::cuda(0));
  expect_error([&] { cpu().copy(dst, gpu); }, "copy: the CPU backend cannot reach cuda:0");
}

}  // namespace
}  // namespace fm
