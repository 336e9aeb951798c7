// Sampling every row of a logits tensor at once (model/sampling.h's sample_rows): on the
// host it is sample_token row by row; on a GPU (Backend::sample_rows, sampling.cu) it must
// draw the token the CPU draws, except where u lies within rounding of a CDF step, for
// greedy, temperature, top-k, top-p, their mixes and a vocabulary limit, f32 and f64.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "model/sampling.h"
#include "support/cuda_parity.h"

namespace fm {
namespace {

using ::testing::HasSubstr;

struct Case {
  const char* name;
  SamplingConfig cfg;
};

std::vector<Case> cases(int64_t V) {
  auto make = [](double t, int64_t k, double p, int64_t limit) {
    SamplingConfig c;
    c.temperature = t;
    c.top_k = k;
    c.top_p = p;
    c.vocab_limit = limit;
    return c;
  };
  return {{"greedy", make(0.0, 0, 1.0, 0)},
          {"t1", make(1.0, 0, 1.0, 0)},
          {"t0.7_top_k5", make(0.7, 5, 1.0, 0)},
          {"t1.3_top_p0.9", make(1.3, 0, 0.9, 0)},
          {"top_k50_top_p0.8", make(1.0, 50, 0.8, 0)},
          {"vocab_limit", make(1.0, 0, 1.0, V - 7)},
          {"limit_top_k3_greedy_ties", make(0.0, 3, 0.5, V - 2)}};
}

// Logits in [-4, 4] with the row's max repeated in a few rows (ties).
Tensor random_logits(int64_t R, int64_t V, DType dtype, uint64_t seed) {
  Rng rng(seed, 3);
  Tensor t = testing::random({R, V}, dtype, rng, -4.0, 4.0);
  for (int64_t r = 0; r < R; r += 5) {
    const int64_t a = (r * 7) % V, b = (r * 13 + 3) % V;
    if (dtype == DType::f32)
      t.data<float>()[r * V + b] = t.data<float>()[r * V + a] = 5.0f;
    else
      t.data<double>()[r * V + b] = t.data<double>()[r * V + a] = 5.0;
  }
  return t;
}

std::vector<double> row_f64(const Tensor& t, int64_t r) {
  const int64_t V = t.dim(1);
  std::vector<double> out(static_cast<size_t>(V));
  for (int64_t v = 0; v < V; ++v) out[static_cast<size_t>(v)] = testing::at(t, r * V + v);
  return out;
}

std::vector<double> uniforms(int64_t R, uint64_t seed) {
  Rng rng(seed, 9);
  std::vector<double> u(static_cast<size_t>(R));
  rng.uniform(u.data(), R);
  return u;
}

TEST(SampleRows, OnTheHostEqualsSampleTokenRowByRow) {
  auto cpu = make_cpu_backend();
  ASSERT_FALSE(cpu->samples_on_device());
  const int64_t R = 16, V = 40;
  const Tensor logits = random_logits(R, V, DType::f32, 1);
  const std::vector<double> u = uniforms(R, 2);
  for (const Case& c : cases(V)) {
    SCOPED_TRACE(c.name);
    const std::vector<SampledToken> got = sample_rows(*cpu, logits, u, c.cfg);
    ASSERT_EQ(got.size(), static_cast<size_t>(R));
    for (int64_t r = 0; r < R; ++r) {
      const std::vector<double> row = row_f64(logits, r);
      const SampledToken want = sample_token(row.data(), V, c.cfg, u[static_cast<size_t>(r)]);
      EXPECT_EQ(got[static_cast<size_t>(r)].id, want.id);
      EXPECT_EQ(got[static_cast<size_t>(r)].logp, want.logp);
      EXPECT_EQ(got[static_cast<size_t>(r)].model_logp, want.model_logp);
    }
  }
  EXPECT_THAT([&] { sample_rows(*cpu, logits, {0.5}, cases(V)[0].cfg); },
              ::testing::ThrowsMessage<std::exception>(HasSubstr("1 uniforms for logits")));
  Tensor ids = cpu->empty({R}, DType::i32), lp = cpu->empty({R}, DType::f64),
         mlp = cpu->empty({R}, DType::f64);
  EXPECT_THAT([&] { cpu->sample_rows(ids, lp, mlp, logits, logits, {}); },
              ::testing::ThrowsMessage<std::exception>(HasSubstr("no device sampling here")));
}

class CudaSampleRows : public ::testing::TestWithParam<std::tuple<int64_t, DType>> {};

TEST_P(CudaSampleRows, DrawsTheCpusTokenUpToRoundingAtCdfSteps) {
  FM_SKIP_WITHOUT_GPU();
  const auto [V, dtype] = GetParam();
  testing::Backends be;
  ASSERT_TRUE(be.gpu->samples_on_device());
  const int64_t R = 64;
  const Tensor logits = random_logits(R, V, dtype, static_cast<uint64_t>(V));
  const Tensor dev = be.up(logits);
  const std::vector<double> u = uniforms(R, static_cast<uint64_t>(V) + 1);
  for (const Case& c : cases(V)) {
    SCOPED_TRACE(c.name);
    const std::vector<SampledToken> got = sample_rows(*be.gpu, dev, u, c.cfg);
    ASSERT_EQ(got.size(), static_cast<size_t>(R));
    int64_t same = 0;
    for (int64_t r = 0; r < R; ++r) {
      const std::vector<double> row = row_f64(logits, r);
      const double ur = u[static_cast<size_t>(r)];
      const SampledToken want = sample_token(row.data(), V, c.cfg, ur);
      const SampledToken& g = got[static_cast<size_t>(r)];
      same += g.id == want.id;
      // The drawn token's CDF interval in the CPU's distribution must hold u (to rounding).
      const auto dist = sampling_distribution(row.data(), V, c.cfg);
      double before = 0.0, p = -1.0;
      for (const auto& [id, q] : dist) {
        if (id == g.id) {
          p = q;
          break;
        }
        before += q;
      }
      ASSERT_GE(p, 0.0) << "row " << r << ": id " << g.id << " is outside the sampling set";
      EXPECT_GE(ur, before - 1e-9) << "row " << r;
      EXPECT_LT(ur, before + p + 1e-9) << "row " << r;
      EXPECT_NEAR(g.logp, std::log(p), 1e-9 * (1 + std::abs(std::log(p)))) << "row " << r;
      const double lse = want.model_logp - row[static_cast<size_t>(want.id)];
      EXPECT_NEAR(g.model_logp, row[static_cast<size_t>(g.id)] + lse, 1e-9) << "row " << r;
    }
    EXPECT_GE(same, R - 1) << "tokens equal to the CPU's";
  }
  // A non-finite logit below the vocabulary limit is an error naming its row.
  Tensor bad = testing::clone(logits);
  if (dtype == DType::f32)
    bad.data<float>()[3 * V + 1] = NAN;
  else
    bad.data<double>()[3 * V + 1] = NAN;
  const Tensor bad_dev = be.up(bad);
  for (const Case& c : cases(V))
    EXPECT_THAT([&] { sample_rows(*be.gpu, bad_dev, u, c.cfg); },
                ::testing::ThrowsMessage<std::exception>(HasSubstr("row 3")))
        << c.name;
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaSampleRows,
                         ::testing::Combine(::testing::Values<int64_t>(37, 1000, 32000),
                                            ::testing::Values(DType::f32, DType::f64)),
                         [](const auto& info) {
                           return fmt::format(
                               "V{}_{}", std::get<0>(info.param),
                               std::get<1>(info.param) == DType::f32 ? "f32" : "f64");
                         });

}  // namespace
}  // namespace fm
