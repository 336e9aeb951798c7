// attention_cached and scatter_rows: the cached attention of a token equals the
// packed causal attention row for the same keys, bit for bit.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "engine/error.h"
#include "tests/engine/cpu_test_support.h"

namespace fm {
namespace {

TEST(CpuCachedAttention, MatchesPackedAttentionRowsExactly) {
  auto b = make_cpu_backend();
  Rng rng(31, 0);
  const int64_t L = 9, Hq = 4, Hkv = 2, D = 8, S = 3, T = 12;
  const double scale = 0.35;
  // One sequence of L tokens, attended the packed way.
  Tensor q = test::random_normal({L, Hq, D}, rng), k = test::random_normal({L, Hkv, D}, rng);
  Tensor v = test::random_normal({L, Hkv, D}, rng);
  Tensor out = b->empty({L, Hq, D}, DType::f64), lse = b->empty({L, Hq}, DType::f64);
  b->attention_forward(out, lse, q, k, v, test::int_tensor({2}, {0, static_cast<int32_t>(L)}),
                       scale);
  // The same keys written into slot 1 of a cache (rows 1 * T + j), then every query
  // attends from the cache.
  Tensor kc = b->zeros({S, T, Hkv, D}, DType::f64), vc = b->zeros({S, T, Hkv, D}, DType::f64);
  std::vector<int32_t> rows(L), slot(L, 1), pos(L);
  for (int64_t j = 0; j < L; ++j)
    rows[j] = static_cast<int32_t>(T + j), pos[j] = static_cast<int32_t>(j);
  Tensor kc2 = kc.reshape({S * T, Hkv * D}), vc2 = vc.reshape({S * T, Hkv * D});
  b->scatter_rows(kc2, k.reshape({L, Hkv * D}), test::int_tensor({L}, rows));
  b->scatter_rows(vc2, v.reshape({L, Hkv * D}), test::int_tensor({L}, rows));
  Tensor got = b->empty({L, Hq, D}, DType::f64);
  b->attention_cached(got, q, kc, vc, test::int_tensor({L}, slot), test::int_tensor({L}, pos),
                      scale);
  for (int64_t i = 0; i < got.numel(); ++i)
    ASSERT_EQ(got.data<double>()[i], out.data<double>()[i]) << "element " << i;
}

TEST(CpuCachedAttention, RejectsBadArguments) {
  auto b = make_cpu_backend();
  Rng rng(1, 0);
  Tensor q = test::random_normal({2, 2, 4}, rng);
  Tensor kc = b->zeros({2, 5, 1, 4}, DType::f64), vc = b->zeros({2, 5, 1, 4}, DType::f64);
  Tensor out = b->empty({2, 2, 4}, DType::f64);
  using ::testing::HasSubstr;
  EXPECT_THAT(
      [&] {
        b->attention_cached(out, q, kc, vc, test::int_tensor({2}, {0, 2}),
                            test::int_tensor({2}, {0, 1}), 1.0);
      },
      ::testing::ThrowsMessage<Error>(HasSubstr("slot[1] = 2 is out of range")));
  EXPECT_THAT(
      [&] {
        b->attention_cached(out, q, kc, vc, test::int_tensor({2}, {0, 1}),
                            test::int_tensor({2}, {0, 5}), 1.0);
      },
      ::testing::ThrowsMessage<Error>(HasSubstr("pos[1] = 5 is out of range")));
  Tensor dst = b->zeros({4, 3}, DType::f64);
  EXPECT_THAT(
      [&] {
        b->scatter_rows(dst, test::random_normal({2, 3}, rng), test::int_tensor({2}, {1, 1}));
      },
      ::testing::ThrowsMessage<Error>(HasSubstr("repeats an earlier destination")));
}

TEST(CpuScatterRows, OverwritesOnlyTheIndexedRows) {
  auto b = make_cpu_backend();
  Rng rng(2, 0);
  Tensor dst = test::random_normal({5, 3}, rng), before = test::clone(dst);
  Tensor src = test::random_normal({2, 3}, rng);
  b->scatter_rows(dst, src, test::int_tensor({2}, {3, 0}));
  for (int64_t c = 0; c < 3; ++c) {
    EXPECT_EQ(dst.data<double>()[3 * 3 + c], src.data<double>()[c]);
    EXPECT_EQ(dst.data<double>()[0 * 3 + c], src.data<double>()[3 + c]);
    for (int64_t r : {1, 2, 4})
      EXPECT_EQ(dst.data<double>()[r * 3 + c], before.data<double>()[r * 3 + c]);
  }
}

}  // namespace
}  // namespace fm
