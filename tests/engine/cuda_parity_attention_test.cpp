// CUDA backend parity for embedding, RoPE and attention (engine/cuda/routing.cu,
// attention.cu): each op runs on the CPU reference and on the CUDA backend from the same
// random inputs (fixed seeds) and must match within a stated tolerance, repeat bit for
// bit, and reject bad indices with an fm::Error naming the op. Skips without a GPU.
//
// Tolerances, |cuda - cpu| <= rel * (|cpu| + scale) (see cuda_parity_test.cpp):
// - embedding forward and backward: bitwise. The forward is a copy; the backward adds
//   each row's sources in ascending token order with one rounding per add, as the CPU.
// - rope f32: rel 1e-6, scale 1. cos/sin are computed in f64 on both sides and rounded to
//   f32 (rarely 1 ulp apart after rounding), the rotation is unfused on both: a few 1e-8.
//   f64: 1e-12 -- CUDA's pow/cos/sin are within 2 ulp of glibc's; with pos < 512 the
//   angle error is below 512 * 4.4e-16 = 2.3e-13. Forward then inverse: two rotations
//   whose rounded cos/sin have c^2 + s^2 = 1 +- 1.2e-7 and four roundings of terms <= 1.4:
//   at most ~5e-7, so rel 2e-6 (f32).
// - attention forward f32: rel 1e-5, scale 1 (out is an average of v in [-1, 1]; lse is
//   O(log N)). Scores are sequential D-term dots on both sides (the GPU contracts into
//   FMA), error ~1e-6 of a score of O(1); the GPU's online softmax rescales per chunk of
//   32 keys, a few ulp more.
// - attention backward f32: rel 1e-4, scale 1. dS = P (dO . v - delta) cancels terms of
//   size ~sqrt(D) / 2 (error ~1e-6 each, delta summed in a different order on the GPU),
//   then sums of up to 2 * 40 of them.
// - f64 everything: rel 1e-12.
// A wrong index, mask, head mapping or formula gives errors of order 1, far outside.
#include <gmock/gmock.h>

#include "support/cuda_parity.h"

namespace {

using fm::DType;
using fm::Shape;
using fm::Tensor;
using fm::testing::Backends;
using fm::testing::clone;
using fm::testing::expect_bitwise_equal;
using fm::testing::expect_close;
using fm::testing::random;
using fm::testing::rel_for;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

Tensor ints(const std::vector<int32_t>& values) {
  Tensor t = Tensor::empty({static_cast<int64_t>(values.size())}, DType::i32);
  std::copy(values.begin(), values.end(), t.data<int32_t>());
  return t;
}

std::string label(const char* what, DType dt, int64_t hq, int64_t hkv, int64_t dim) {
  return std::string(what) + " " + fm::dtype_name(dt) + " Hq=" + std::to_string(hq) +
         " Hkv=" + std::to_string(hkv) + " D=" + std::to_string(dim);
}

// --- embedding ----------------------------------------------------------------------------

TEST(CudaParity, EmbeddingForwardBackwardMatchCpuBitwise) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  const int64_t vocab = 50, cols = 70, n = 300;  // ids repeat ~6 times; some rows untouched
  fm::Rng rng(2100);
  std::vector<int32_t> id_values(static_cast<size_t>(n));
  for (auto& id : id_values) id = static_cast<int32_t>(rng.next_below(vocab - 10));
  id_values[3] = 0;
  id_values[17] = static_cast<int32_t>(vocab - 1);  // both ends of the range
  const Tensor ids = ints(id_values);
  for (DType dt : {DType::f32, DType::f64}) {
    const Tensor table = random({vocab, cols}, dt, rng, -1, 1);
    const Tensor dout = random({n, cols}, dt, rng, -1, 1);
    const Tensor dtable0 = random({vocab, cols}, dt, rng, -1, 1);  // backward accumulates

    Tensor out_cpu = Tensor::empty({n, cols}, dt), dtable_cpu = clone(dtable0);
    b.cpu->embedding_forward(out_cpu, table, ids);
    b.cpu->embedding_backward(dtable_cpu, dout, ids);

    const Tensor ids_d = b.up(ids), dout_d = b.up(dout);
    Tensor out = b.gpu->empty({n, cols}, dt);
    b.gpu->embedding_forward(out, b.up(table), ids_d);
    expect_bitwise_equal(b.down(out), out_cpu, "embedding_forward");

    Tensor dtable = b.up(dtable0);
    b.gpu->embedding_backward(dtable, dout_d, ids_d);
    const Tensor got = b.down(dtable);
    expect_bitwise_equal(got, dtable_cpu, "embedding_backward equals the CPU's sums");
    Tensor again = b.up(dtable0);
    b.gpu->embedding_backward(again, dout_d, ids_d);
    expect_bitwise_equal(b.down(again), got, "embedding_backward repeats bit for bit");
  }
}

TEST(CudaParity, EmbeddingRejectsOutOfRangeIds) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  const Tensor table = b.gpu->zeros({5, 4}, DType::f32);
  Tensor out = b.gpu->empty({4, 4}, DType::f32);
  Tensor dtable = b.gpu->zeros({5, 4}, DType::f32);
  const Tensor dout = b.gpu->zeros({4, 4}, DType::f32);
  const Tensor too_big = b.up(ints({0, 4, 5, 7}));  // first bad at position 2
  const Tensor negative = b.up(ints({1, -1, 2, 3}));
  EXPECT_THAT([&] { b.gpu->embedding_forward(out, table, too_big); },
              ThrowsMessage<fm::Error>(
                  AllOf(HasSubstr("embedding_forward"), HasSubstr("ids[2] = 5 is out of range"))));
  EXPECT_THAT([&] { b.gpu->embedding_forward(out, table, negative); },
              ThrowsMessage<fm::Error>(HasSubstr("ids[1] = -1 is out of range")));
  EXPECT_THAT([&] { b.gpu->embedding_backward(dtable, dout, too_big); },
              ThrowsMessage<fm::Error>(
                  AllOf(HasSubstr("embedding_backward"), HasSubstr("ids[2] = 5 is out of range"))));
  // The rejected call left no trace: dtable is still zero and the backend still works.
  expect_bitwise_equal(b.down(dtable), Tensor::zeros({5, 4}, DType::f32), "dtable untouched");
}

// --- RoPE ---------------------------------------------------------------------------------

TEST(CudaParity, RopeMatchesCpuAndInverseRestoresX) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  const int64_t n = 37, heads = 3;
  for (DType dt : {DType::f32, DType::f64})
    for (int64_t dim : {64, 40}) {
      fm::Rng rng(2200 + dim);
      const Tensor x0 = random({n, heads, dim}, dt, rng, -1, 1);
      std::vector<int32_t> p(static_cast<size_t>(n));
      for (auto& v : p) v = static_cast<int32_t>(rng.next_below(512));
      const Tensor pos = ints(p);
      const double theta = 10000.0;
      Tensor x_cpu = clone(x0);
      b.cpu->rope(x_cpu, pos, theta, false);
      Tensor x = b.up(x0);
      const Tensor pos_d = b.up(pos);
      b.gpu->rope(x, pos_d, theta, false);
      const std::string what =
          std::string("rope ") + fm::dtype_name(dt) + " D=" + std::to_string(dim);
      const double rel = rel_for(dt, 1e-6);
      expect_close(b.down(x), x_cpu, rel, 1.0, what + " forward");
      // The inverse is the transpose of the rotation: x comes back up to rounding.
      b.gpu->rope(x, pos_d, theta, true);
      expect_close(b.down(x), x0, rel_for(dt, 2e-6), 1.0, what + " forward then inverse");
    }
}

// --- attention ------------------------------------------------------------------------------

// Packed sequences of 7, 1, 0, 40 and 33 tokens: a length-1 and an empty sequence, one
// longer than a 32-key chunk and one a key past it.
const std::vector<int32_t> kSeqOff = {0, 7, 8, 8, 48, 81};
constexpr int64_t kTokens = 81;

struct AttentionInputs {
  Tensor q, k, v, seq_off;
  double scale;
};

AttentionInputs attention_inputs(DType dt, int64_t hq, int64_t hkv, int64_t dim, uint64_t seed) {
  fm::Rng rng(seed);
  return {random({kTokens, hq, dim}, dt, rng, -1.5, 1.5),
          random({kTokens, hkv, dim}, dt, rng, -1.5, 1.5),
          random({kTokens, hkv, dim}, dt, rng, -1, 1), ints(kSeqOff),
          1.0 / std::sqrt(static_cast<double>(dim))};
}

struct HeadConfig {
  int64_t hq, hkv;
};
const HeadConfig kHeads[] = {{4, 2}, {3, 3}};  // grouped-query and one kv head per query head
const int64_t kDims[] = {64, 40, 256};

TEST(CudaParity, AttentionForwardMatchesCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  uint64_t seed = 2300;
  for (DType dt : {DType::f32, DType::f64})
    for (const HeadConfig& h : kHeads)
      for (int64_t dim : kDims) {
        const AttentionInputs in = attention_inputs(dt, h.hq, h.hkv, dim, ++seed);
        Tensor out_cpu = Tensor::empty(in.q.shape(), dt),
               lse_cpu = Tensor::empty({kTokens, h.hq}, dt);
        b.cpu->attention_forward(out_cpu, lse_cpu, in.q, in.k, in.v, in.seq_off, in.scale);
        Tensor out = b.gpu->empty(in.q.shape(), dt), lse = b.gpu->empty({kTokens, h.hq}, dt);
        b.gpu->attention_forward(out, lse, b.up(in.q), b.up(in.k), b.up(in.v), b.up(in.seq_off),
                                 in.scale);
        const double rel = rel_for(dt, 1e-5);
        expect_close(b.down(out), out_cpu, rel, 1.0,
                     label("attention_forward out", dt, h.hq, h.hkv, dim));
        expect_close(b.down(lse), lse_cpu, rel, 1.0,
                     label("attention_forward lse", dt, h.hq, h.hkv, dim));
      }
}

TEST(CudaParity, AttentionBackwardMatchesCpuAndRepeatsBitwise) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  uint64_t seed = 2400;
  for (DType dt : {DType::f32, DType::f64})
    for (const HeadConfig& h : kHeads)
      for (int64_t dim : kDims) {
        const AttentionInputs in = attention_inputs(dt, h.hq, h.hkv, dim, ++seed);
        fm::Rng rng(seed + 1000);
        const Tensor dout = random(in.q.shape(), dt, rng, -1, 1);
        // Both backwards start from the CPU's forward, so the comparison isolates the backward.
        Tensor out = Tensor::empty(in.q.shape(), dt), lse = Tensor::empty({kTokens, h.hq}, dt);
        b.cpu->attention_forward(out, lse, in.q, in.k, in.v, in.seq_off, in.scale);
        Tensor dq_cpu = Tensor::empty(in.q.shape(), dt), dk_cpu = Tensor::empty(in.k.shape(), dt),
               dv_cpu = Tensor::empty(in.k.shape(), dt);
        b.cpu->attention_backward(dq_cpu, dk_cpu, dv_cpu, dout, in.q, in.k, in.v, out, lse,
                                  in.seq_off, in.scale);

        const Tensor dout_d = b.up(dout), q_d = b.up(in.q), k_d = b.up(in.k), v_d = b.up(in.v),
                     out_d = b.up(out), lse_d = b.up(lse), off_d = b.up(in.seq_off);
        Tensor dq = b.gpu->empty(in.q.shape(), dt), dk = b.gpu->empty(in.k.shape(), dt),
               dv = b.gpu->empty(in.k.shape(), dt);
        b.gpu->attention_backward(dq, dk, dv, dout_d, q_d, k_d, v_d, out_d, lse_d, off_d, in.scale);
        const Tensor dq_got = b.down(dq), dk_got = b.down(dk), dv_got = b.down(dv);
        const double rel = rel_for(dt, 1e-4);
        expect_close(dq_got, dq_cpu, rel, 1.0,
                     label("attention_backward dq", dt, h.hq, h.hkv, dim));
        expect_close(dk_got, dk_cpu, rel, 1.0,
                     label("attention_backward dk", dt, h.hq, h.hkv, dim));
        expect_close(dv_got, dv_cpu, rel, 1.0,
                     label("attention_backward dv", dt, h.hq, h.hkv, dim));

        b.gpu->attention_backward(dq, dk, dv, dout_d, q_d, k_d, v_d, out_d, lse_d, off_d, in.scale);
        expect_bitwise_equal(b.down(dq), dq_got, "attention_backward dq repeats bit for bit");
        expect_bitwise_equal(b.down(dk), dk_got, "attention_backward dk repeats bit for bit");
        expect_bitwise_equal(b.down(dv), dv_got, "attention_backward dv repeats bit for bit");
      }
}

// Every packed sequence s written into cache slot (S - 1 - s) at positions 0 .. len - 1;
// every token then attends from the cache, in reverse token order. The rows must be the
// packed forward's bit for bit: both kernels run one row function over the same keys.
TEST(CudaParity, AttentionCachedRowsEqualPackedRowsBitwise) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  const int64_t slots = static_cast<int64_t>(kSeqOff.size()) - 1, max_len = 45;
  uint64_t seed = 2500;
  for (DType dt : {DType::f32, DType::f64})
    for (const HeadConfig& h : kHeads)
      for (int64_t dim : {int64_t{64}, int64_t{40}}) {
        const AttentionInputs in = attention_inputs(dt, h.hq, h.hkv, dim, ++seed);
        Tensor out = b.gpu->empty(in.q.shape(), dt), lse = b.gpu->empty({kTokens, h.hq}, dt);
        b.gpu->attention_forward(out, lse, b.up(in.q), b.up(in.k), b.up(in.v), b.up(in.seq_off),
                                 in.scale);
        const Tensor packed = b.down(out);

        Tensor k_cache = Tensor::zeros({slots, max_len, h.hkv, dim}, dt);
        Tensor v_cache = Tensor::zeros({slots, max_len, h.hkv, dim}, dt);
        const int64_t row_bytes = h.hkv * dim * static_cast<int64_t>(fm::dtype_size(dt));
        std::vector<int32_t> slot(kTokens), pos(kTokens);
        Tensor q_rev = Tensor::empty(in.q.shape(), dt);
        const int64_t q_bytes = h.hq * dim * static_cast<int64_t>(fm::dtype_size(dt));
        for (int64_t s = 0; s < slots; ++s)
          for (int32_t i = kSeqOff[s]; i < kSeqOff[s + 1]; ++i) {
            const int64_t cache_row = (slots - 1 - s) * max_len + (i - kSeqOff[s]);
            std::memcpy(static_cast<char*>(k_cache.raw()) + cache_row * row_bytes,
                        static_cast<const char*>(in.k.raw()) + i * row_bytes, row_bytes);
            std::memcpy(static_cast<char*>(v_cache.raw()) + cache_row * row_bytes,
                        static_cast<const char*>(in.v.raw()) + i * row_bytes, row_bytes);
            const int64_t r = kTokens - 1 - i;  // query rows in reverse order
            slot[r] = static_cast<int32_t>(slots - 1 - s);
            pos[r] = i - kSeqOff[s];
            std::memcpy(static_cast<char*>(q_rev.raw()) + r * q_bytes,
                        static_cast<const char*>(in.q.raw()) + i * q_bytes, q_bytes);
          }
        Tensor cached = b.gpu->empty(in.q.shape(), dt);
        b.gpu->attention_cached(cached, b.up(q_rev), b.up(k_cache), b.up(v_cache), b.up(ints(slot)),
                                b.up(ints(pos)), in.scale);
        const Tensor got = b.down(cached);
        for (int64_t i = 0; i < kTokens; ++i)
          expect_bitwise_equal(
              got.row(kTokens - 1 - i), packed.row(i),
              label("attention_cached row", dt, h.hq, h.hkv, dim) + " token " + std::to_string(i));
      }
}

TEST(CudaParity, AttentionRejectsBadOffsetsAndCacheIndices) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  const DType dt = DType::f32;
  const Tensor q = b.gpu->zeros({4, 2, 8}, dt), k = b.gpu->zeros({4, 1, 8}, dt);
  Tensor out = b.gpu->empty({4, 2, 8}, dt), lse = b.gpu->empty({4, 2}, dt);
  EXPECT_THAT(
      [&] {
        b.gpu->attention_forward(out, lse, q, k, k, b.up(ints({0, 3, 2, 4})), 1.0);
      },
      ThrowsMessage<fm::Error>(
          AllOf(HasSubstr("attention_forward"), HasSubstr("seq_off[1] = 3 > seq_off[2] = 2"))));
  EXPECT_THAT(
      [&] {
        b.gpu->attention_forward(out, lse, q, k, k, b.up(ints({0, 3})), 1.0);
      },
      ThrowsMessage<fm::Error>(HasSubstr("seq_off must run from 0 to N = 4")));
  const Tensor cache = b.gpu->zeros({2, 5, 1, 8}, dt);
  EXPECT_THAT(
      [&] {
        b.gpu->attention_cached(out, q, cache, cache, b.up(ints({0, 1, 2, 0})),
                                b.up(ints({0, 1, 2, 3})), 1.0);
      },
      ThrowsMessage<fm::Error>(
          AllOf(HasSubstr("attention_cached"), HasSubstr("slot[2] = 2 is out of range"))));
  EXPECT_THAT(
      [&] {
        b.gpu->attention_cached(out, q, cache, cache, b.up(ints({0, 1, 1, 0})),
                                b.up(ints({0, 1, 5, 3})), 1.0);
      },
      ThrowsMessage<fm::Error>(HasSubstr("pos[2] = 5 is out of range")));
}

}  // namespace
