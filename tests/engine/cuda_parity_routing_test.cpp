// CUDA backend parity for the routing ops (top-k, the router's column ops, token
// permutation) and the LM-head log-prob: each runs on the CPU reference and on the CUDA
// backend from the same random inputs (fixed seeds) and the results are compared; bad
// indices must throw fm::Error naming the op. Skips without a GPU (uses only backend.h).
//
// Tolerances (|cuda - cpu| <= rel * (|cpu| + scale), see support/cuda_parity.h):
// - top-k ids, gathers, scatters (copies) and scatter_add_cols (the CPU's additions in the
//   CPU's order): bit-identical, checked bitwise.
// - normalize_rows and scatter_add_rows: the kernels round every product and sum exactly as
//   the CPU does, in the same order, so they are expected to match bit for bit; rel 1e-6
//   (f32) only leaves room for a host compiler that contracts a * b + c into an FMA
//   (about one ulp per add). scatter_add_rows must also repeat bit for bit on the GPU.
// - logprob V = 32: rel 1e-5 (f32). The CPU sums the row serially, the GPU in a tree;
//   both are fp32 sums of 32 terms (error ~ sqrt(V) * 6e-8 of the sum) plus an ulp or two
//   from CUDA's expf/logf against glibc's.
// - logprob V = 50000: rel 1e-4 (f32). The CPU's serial fp32 sum of 5e4 terms carries
//   ~ 6e-8 * sqrt(V / 3) ~ 1e-5 relative error (the GPU's tree far less); 1e-4 leaves
//   margin and still rejects any formula error (>= 1e-2).
// - dlogits: scale ~ 10x the largest softmax probability (0.3 for V = 32, 1e-3 for
//   V = 50000), since dlogits ~ p (dlogp + dentropy (log p + H)) can cancel to ~0 while
//   its error is ~ p * |error in H|.
// - f64: rel 1e-12 throughout.
#include <initializer_list>
#include <numeric>
#include <string>
#include <utility>

#include "support/cuda_parity.h"

namespace {

using fm::DType;
using fm::Shape;
using fm::Tensor;
using fm::testing::at;
using fm::testing::Backends;
using fm::testing::clone;
using fm::testing::expect_bitwise_equal;
using fm::testing::expect_close;
using fm::testing::expect_error;
using fm::testing::random;
using fm::testing::rel_for;

Tensor i32_tensor(const std::vector<int32_t>& values, const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::i32);
  EXPECT_EQ(static_cast<int64_t>(values.size()), t.numel());
  std::copy(values.begin(), values.end(), t.data<int32_t>());
  return t;
}

// Uniform ids in [0, bound), repeats allowed.
Tensor random_ids(const Shape& shape, int64_t bound, fm::Rng& rng) {
  std::vector<int32_t> v(static_cast<size_t>(fm::shape_numel(shape)));
  for (int32_t& x : v) x = static_cast<int32_t>(rng.next_below(static_cast<uint64_t>(bound)));
  return i32_tensor(v, shape);
}

// A random permutation of 0 .. n - 1 (Fisher-Yates).
std::vector<int32_t> random_permutation(int64_t n, fm::Rng& rng) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), 0);
  for (int64_t i = n - 1; i > 0; --i)
    std::swap(p[static_cast<size_t>(i)],
              p[static_cast<size_t>(rng.next_below(static_cast<uint64_t>(i + 1)))]);
  return p;
}

// Values in multiples of 1 / steps: many exact ties.
Tensor quantized(const Shape& shape, DType dt, fm::Rng& rng, int steps) {
  Tensor t = random(shape, dt, rng, 0, 1);
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double q = std::floor(at(t, i) * steps) / steps;
    if (dt == DType::f32)
      t.data<float>()[i] = static_cast<float>(q);
    else
      t.data<double>()[i] = q;
  }
  return t;
}

// --- top-k ------------------------------------------------------------------------------

TEST(CudaParity, TopkMatchesCpuWithTiesAndBias) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  struct Case {
    int64_t n, e, k;
  };
  // E = 64 K = 8 and E = 128 K = 2 (the routers), E = 300 K = 10 (E > 256, K > 8: lanes
  // loop several times per pass), and K = E.
  for (const Case c : {Case{67, 64, 8}, Case{50, 128, 2}, Case{9, 300, 10}, Case{5, 5, 5}}) {
    for (DType dt : {DType::f32, DType::f64}) {
      fm::Rng rng(2000 + static_cast<uint64_t>(c.e));
      // Scores in steps of 1/8 and bias in steps of 1/16: keys tie often, with and
      // without the bias; plus continuous scores.
      const Tensor tied = quantized({c.n, c.e}, dt, rng, 8);
      const Tensor smooth = random({c.n, c.e}, dt, rng, -2, 2);
      const Tensor bias = quantized({c.e}, dt, rng, 16);
      for (const Tensor* scores : {&tied, &smooth}) {
        for (bool with_bias : {false, true}) {
          const Tensor bias_cpu = with_bias ? bias : Tensor();
          const Tensor bias_gpu = with_bias ? b.up(bias) : Tensor();
          Tensor ids_cpu = Tensor::empty({c.n, c.k}, DType::i32);
          b.cpu->topk(ids_cpu, *scores, bias_cpu);
          Tensor ids = b.gpu->empty({c.n, c.k}, DType::i32);
          b.gpu->topk(ids, b.up(*scores), bias_gpu);
          expect_bitwise_equal(b.down(ids), ids_cpu,
                               "topk E=" + std::to_string(c.e) + " K=" + std::to_string(c.k) +
                                   (scores == &tied ? " tied" : " smooth") +
                                   (with_bias ? " with bias" : ""));
        }
      }
    }
  }
}

TEST(CudaParity, TopkBreaksTiesToTheLowerExpert) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  const int64_t e = 64, k = 8;
  // Zero scores: without bias all keys tie -> experts 0 .. 7 in order; with bias[e] = e / 64
  // -> experts 63 down to 56.
  Tensor scores = Tensor::zeros({2, e}, DType::f32);
  Tensor bias = Tensor::empty({e}, DType::f32);
  for (int64_t i = 0; i < e; ++i) bias.data<float>()[i] = static_cast<float>(i) / 64.f;
  Tensor ids = b.gpu->empty({2, k}, DType::i32);
  b.gpu->topk(ids, b.up(scores), Tensor());
  const std::vector<int32_t> plain = b.gpu->download_i32(ids);
  b.gpu->topk(ids, b.up(scores), b.up(bias));
  const std::vector<int32_t> biased = b.gpu->download_i32(ids);
  for (size_t i = 0; i < plain.size(); ++i) {
    const int64_t j = static_cast<int64_t>(i) % k;
    EXPECT_EQ(plain[i], j) << "row " << i / k;
    EXPECT_EQ(biased[i], e - 1 - j) << "row " << i / k;
  }
}

TEST(CudaParity, TopkRejectsNanKeys) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(7);
  Tensor scores = random({6, 64}, DType::f32, rng, -1, 1);
  scores.data<float>()[3 * 64 + 17] = std::nanf("");
  Tensor ids = b.gpu->empty({6, 4}, DType::i32);
  expect_error([&] { b.gpu->topk(ids, b.up(scores), Tensor()); }, {"topk", "row 3", "NaN"});
}

// --- router column ops --------------------------------------------------------------------

TEST(CudaParity, GatherColsAndScatterAddColsMatchCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  for (DType dt : {DType::f32, DType::f64}) {
    fm::Rng rng(3000);
    const int64_t n = 77, e = 64, k = 8;
    const Tensor x = random({n, e}, dt, rng, -1, 1);
    const Tensor ids = random_ids({n, k}, e, rng);  // repeats within a row are allowed
    const Tensor dout = random({n, k}, dt, rng, -1, 1);
    const Tensor dx0 = random({n, e}, dt, rng, -1, 1);

    Tensor out_cpu = Tensor::empty({n, k}, dt);
    b.cpu->gather_cols(out_cpu, x, ids);
    Tensor out = b.gpu->empty({n, k}, dt);
    b.gpu->gather_cols(out, b.up(x), b.up(ids));
    expect_bitwise_equal(b.down(out), out_cpu, "gather_cols");

    Tensor dx_cpu = clone(dx0);
    b.cpu->scatter_add_cols(dx_cpu, dout, ids);
    Tensor dx = b.up(dx0);
    b.gpu->scatter_add_cols(dx, b.up(dout), b.up(ids));
    expect_bitwise_equal(b.down(dx), dx_cpu, "scatter_add_cols");
  }
}

TEST(CudaParity, NormalizeRowsForwardBackwardMatchCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  for (DType dt : {DType::f32, DType::f64}) {
    fm::Rng rng(3100);
    const int64_t n = 301, k = 8;
    const Tensor p = random({n, k}, dt, rng, 0.01, 1);
    const Tensor dg = random({n, k}, dt, rng, -1, 1);
    Tensor g_cpu = Tensor::empty({n, k}, dt), dp_cpu = Tensor::empty({n, k}, dt);
    b.cpu->normalize_rows_forward(g_cpu, p);
    b.cpu->normalize_rows_backward(dp_cpu, dg, p);
    Tensor g = b.gpu->empty({n, k}, dt), dp = b.gpu->empty({n, k}, dt);
    b.gpu->normalize_rows_forward(g, b.up(p));
    b.gpu->normalize_rows_backward(dp, b.up(dg), b.up(p));
    const double rel = rel_for(dt, 1e-6);
    // g ~ 1 / K; dp ~ |dg| / S with S ~ K / 2: the magnitude of its two terms.
    expect_close(b.down(g), g_cpu, rel, 1.0 / k, "normalize_rows_forward");
    expect_close(b.down(dp), dp_cpu, rel, 1.0, "normalize_rows_backward");
  }
}

// --- token permutation ----------------------------------------------------------------------

TEST(CudaParity, GatherRowsScatterRowsRoundTrip) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  for (DType dt : {DType::f32, DType::f64}) {
    for (int64_t c : {1, 33, 130}) {
      fm::Rng rng(4000 + static_cast<uint64_t>(c));
      const int64_t r = 150;
      const Tensor src = random({r, c}, dt, rng, -1, 1);
      const std::vector<int32_t> perm = random_permutation(r, rng);
      const Tensor idx = i32_tensor(perm, {r});

      Tensor out_cpu = Tensor::empty({r, c}, dt);
      b.cpu->gather_rows(out_cpu, src, idx);
      Tensor out = b.gpu->empty({r, c}, dt);
      b.gpu->gather_rows(out, b.up(src), b.up(idx));
      expect_bitwise_equal(b.down(out), out_cpu, "gather_rows");

      // Scattering the gathered rows back by the same permutation restores src.
      Tensor back = b.gpu->zeros({r, c}, dt);
      b.gpu->scatter_rows(back, out, b.up(idx));
      expect_bitwise_equal(b.down(back), src, "scatter_rows(gather_rows(src)) == src");

      // A partial scatter (M < R distinct rows) leaves the other rows as they were.
      const int64_t m = 40;
      const Tensor sub_idx = i32_tensor(std::vector<int32_t>(perm.begin(), perm.begin() + m), {m});
      const Tensor rows = random({m, c}, dt, rng, -1, 1);
      const Tensor dst0 = random({r, c}, dt, rng, -1, 1);
      Tensor dst_cpu = clone(dst0);
      b.cpu->scatter_rows(dst_cpu, rows, sub_idx);
      Tensor dst = b.up(dst0);
      b.gpu->scatter_rows(dst, b.up(rows), b.up(sub_idx));
      expect_bitwise_equal(b.down(dst), dst_cpu, "scatter_rows (partial)");
    }
  }
}

TEST(CudaParity, ScatterAddRowsMatchesCpuAndRepeatsBitForBit) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  struct Case {
    int64_t r, m, c;
  };
  // Repeated destinations (M > R) with C = 1 (the gate gradients) and a ragged C; a larger
  // case whose sort key spans more bits; the last rows receive nothing.
  for (const Case cs : {Case{20, 97, 1}, Case{20, 97, 70}, Case{3000, 5000, 40}}) {
    for (DType dt : {DType::f32, DType::f64}) {
      for (bool with_w : {false, true}) {
        fm::Rng rng(5000 + static_cast<uint64_t>(cs.c));
        const Tensor src = random({cs.m, cs.c}, dt, rng, -1, 1);
        const Tensor idx = random_ids({cs.m}, cs.r - 3, rng);
        const Tensor w = random({cs.m}, dt, rng, -2, 2);
        const Tensor dst0 = random({cs.r, cs.c}, dt, rng, -1, 1);
        const std::string what = "scatter_add_rows R=" + std::to_string(cs.r) +
                                 " C=" + std::to_string(cs.c) + (with_w ? " with w" : "");

        Tensor dst_cpu = clone(dst0);
        b.cpu->scatter_add_rows(dst_cpu, src, idx, with_w ? w : Tensor());
        const Tensor src_d = b.up(src), idx_d = b.up(idx);
        const Tensor w_d = with_w ? b.up(w) : Tensor();
        Tensor dst1 = b.up(dst0), dst2 = b.up(dst0);
        b.gpu->scatter_add_rows(dst1, src_d, idx_d, w_d);
        b.gpu->scatter_add_rows(dst2, src_d, idx_d, w_d);
        const Tensor got = b.down(dst1);
        // Sums of ~M / R terms of size |w| <= 2 on top of |dst| <= 1.
        expect_close(got, dst_cpu, rel_for(dt, 1e-6), 1.0, what);
        expect_bitwise_equal(b.down(dst2), got, what + ": second run");
      }
    }
  }
}

// --- LM-head log-prob --------------------------------------------------------------------------

struct LogprobCase {
  int64_t n, v;
  double f32_rel;   // see the file comment
  double dl_scale;  // dlogits scale: ~10x the largest softmax probability
};
const LogprobCase kLogprobCases[] = {{40, 32, 1e-5, 0.3}, {6, 50000, 1e-4, 1e-3}};

// Random logits in U(-3, 3) and targets in [0, V) with rows 0 and 3 at -1 (no target).
std::pair<Tensor, Tensor> logprob_inputs(const LogprobCase& c, DType dt, fm::Rng& rng) {
  Tensor logits = random({c.n, c.v}, dt, rng, -3, 3);
  Tensor targets = random_ids({c.n}, c.v, rng);
  targets.data<int32_t>()[0] = -1;
  targets.data<int32_t>()[3] = -1;
  return {logits, targets};
}

TEST(CudaParity, LogprobForwardMatchesCpu) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  for (const LogprobCase& c : kLogprobCases) {
    for (DType dt : {DType::f32, DType::f64}) {
      fm::Rng rng(6000 + static_cast<uint64_t>(c.v));
      const auto [logits, targets] = logprob_inputs(c, dt, rng);
      Tensor logp_cpu = Tensor::empty({c.n}, dt), ent_cpu = Tensor::empty({c.n}, dt),
             lse_cpu = Tensor::empty({c.n}, dt);
      b.cpu->logprob_forward(logp_cpu, ent_cpu, lse_cpu, logits, targets);
      Tensor logp = b.gpu->empty({c.n}, dt), ent = b.gpu->empty({c.n}, dt),
             lse = b.gpu->empty({c.n}, dt);
      b.gpu->logprob_forward(logp, ent, lse, b.up(logits), b.up(targets));
      const double rel = rel_for(dt, c.f32_rel);
      const std::string what = " V=" + std::to_string(c.v);
      // logp, lse ~ log V + O(1) and entropy ~ log V: scale 1.
      expect_close(b.down(lse), lse_cpu, rel, 1.0, "lse" + what);
      expect_close(b.down(ent), ent_cpu, rel, 1.0, "entropy" + what);
      const Tensor logp_host = b.down(logp);
      expect_close(logp_host, logp_cpu, rel, 1.0, "logp" + what);
      EXPECT_EQ(at(logp_host, 0), 0.0) << "no target: logp 0" << what;
      EXPECT_EQ(at(logp_host, 3), 0.0) << "no target: logp 0" << what;
    }
  }
}

TEST(CudaParity, LogprobBackwardMatchesCpuWithAndWithoutEntropyGradient) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  for (const LogprobCase& c : kLogprobCases) {
    for (DType dt : {DType::f32, DType::f64}) {
      fm::Rng rng(7000 + static_cast<uint64_t>(c.v));
      const auto [logits, targets] = logprob_inputs(c, dt, rng);
      const Tensor dlogp = random({c.n}, dt, rng, -1, 1);
      const Tensor dentropy = random({c.n}, dt, rng, -1, 1);
      Tensor logp = Tensor::empty({c.n}, dt), ent = Tensor::empty({c.n}, dt),
             lse = Tensor::empty({c.n}, dt);
      b.cpu->logprob_forward(logp, ent, lse, logits, targets);
      // Both backends start from the CPU's lse, so the comparison isolates the backward.
      const Tensor logits_d = b.up(logits), lse_d = b.up(lse), targets_d = b.up(targets);
      for (bool with_entropy : {false, true}) {
        Tensor dl_cpu = Tensor::empty({c.n, c.v}, dt);
        b.cpu->logprob_backward(dl_cpu, dlogp, with_entropy ? dentropy : Tensor(), logits, lse,
                                targets);
        Tensor dl = b.gpu->empty({c.n, c.v}, dt);
        b.gpu->logprob_backward(dl, b.up(dlogp), with_entropy ? b.up(dentropy) : Tensor(), logits_d,
                                lse_d, targets_d);
        expect_close(b.down(dl), dl_cpu, rel_for(dt, c.f32_rel), c.dl_scale,
                     "logprob_backward V=" + std::to_string(c.v) +
                         (with_entropy ? " with dentropy" : " without dentropy"));
      }
    }
  }
}

// --- bad input -------------------------------------------------------------------------------

TEST(CudaParity, RoutingOpsRejectBadIndices) {
  FM_SKIP_WITHOUT_GPU();
  Backends b;
  fm::Rng rng(8000);
  const DType dt = DType::f32;
  const int64_t n = 5, e = 16, k = 2;
  const Tensor x = b.up(random({n, e}, dt, rng, -1, 1));
  std::vector<int32_t> bad_cols(static_cast<size_t>(n * k), 1);
  bad_cols[7] = static_cast<int32_t>(e);
  Tensor out = b.gpu->empty({n, k}, dt);
  expect_error(
      [&] {
        b.gpu->gather_cols(out, x, b.up(i32_tensor(bad_cols, {n, k})));
      },
      {"gather_cols", "ids[7] = 16"});
  bad_cols[7] = -1;
  const Tensor dx0 = random({n, e}, dt, rng, -1, 1);
  Tensor dx = b.up(dx0);
  expect_error(
      [&] {
        b.gpu->scatter_add_cols(dx, b.up(random({n, k}, dt, rng, -1, 1)),
                                b.up(i32_tensor(bad_cols, {n, k})));
      },
      {"scatter_add_cols", "ids[7] = -1"});
  expect_bitwise_equal(b.down(dx), dx0, "scatter_add_cols leaves dx unchanged on error");

  const int64_t r = 6, c = 3;
  const Tensor rows = b.up(random({r, c}, dt, rng, -1, 1));
  Tensor gathered = b.gpu->empty({3, c}, dt);
  expect_error(
      [&] {
        b.gpu->gather_rows(gathered, rows, b.up(i32_tensor({0, 6, 1}, {3})));
      },
      {"gather_rows", "idx[1] = 6"});
  Tensor dst = b.gpu->zeros({r, c}, dt);
  const Tensor three = b.up(random({3, c}, dt, rng, -1, 1));
  expect_error(
      [&] {
        b.gpu->scatter_rows(dst, three, b.up(i32_tensor({2, 4, 2}, {3})));
      },
      {"scatter_rows", "idx[2] = 2", "repeats"});
  expect_error(
      [&] {
        b.gpu->scatter_rows(dst, three, b.up(i32_tensor({2, -3, 2}, {3})));
      },
      {"scatter_rows", "idx[1] = -3"});
  const Tensor dst0 = random({r, c}, dt, rng, -1, 1);
  Tensor acc = b.up(dst0);
  expect_error(
      [&] {
        b.gpu->scatter_add_rows(acc, three, b.up(i32_tensor({1, 1, 6}, {3})), Tensor());
      },
      {"scatter_add_rows", "idx[2] = 6"});
  expect_bitwise_equal(b.down(acc), dst0, "scatter_add_rows leaves dst unchanged on error");

  const int64_t v = 10;
  const Tensor logits = b.up(random({4, v}, dt, rng, -1, 1));
  const Tensor targets = b.up(i32_tensor({1, -1, 10, 2}, {4}));
  Tensor logp = b.gpu->empty({4}, dt), ent = b.gpu->empty({4}, dt), lse = b.gpu->empty({4}, dt);
  expect_error([&] { b.gpu->logprob_forward(logp, ent, lse, logits, targets); },
               {"logprob_forward", "targets[2] = 10"});
  Tensor dl = b.gpu->empty({4, v}, dt);
  expect_error([&] { b.gpu->logprob_backward(dl, logp, Tensor(), logits, lse, targets); },
               {"logprob_backward", "targets[2] = 10"});

  // The backend is still usable after the errors.
  Tensor ok = b.gpu->empty({3, c}, dt);
  b.gpu->gather_rows(ok, rows, b.up(i32_tensor({5, 0, 5}, {3})));
  const Tensor ok_host = b.down(ok), rows_host = b.down(rows);
  for (int64_t j = 0; j < c; ++j) EXPECT_EQ(at(ok_host, j), at(rows_host, 5 * c + j));
}

}  // namespace
