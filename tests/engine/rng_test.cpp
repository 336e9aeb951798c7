// Philox RNG: the published known-answer vectors, thread-count independence,
// and the offset bookkeeping checkpoints rely on.
#include "engine/rng.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <vector>

namespace fm {
namespace {

TEST(Philox, MatchesRandom123KnownAnswers) {
  // Known-answer vectors of Philox-4x32-10 from the Random123 distribution (kat_vectors).
  EXPECT_EQ(philox4x32({0, 0, 0, 0}, {0, 0}),
            (std::array<uint32_t, 4>{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  EXPECT_EQ(philox4x32({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}),
            (std::array<uint32_t, 4>{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

std::vector<float> draw(int threads) {
  omp_set_num_threads(threads);
  Rng rng(42, 3);
  std::vector<float> v(200003);
  rng.normal(v.data(), static_cast<int64_t>(v.size()));
  omp_set_num_threads(omp_get_num_procs());
  return v;
}

TEST(Rng, DrawsAreIdenticalWhateverTheThreadCount) {
  EXPECT_EQ(draw(1), draw(2));
}

TEST(Rng, OffsetResumesTheStream) {
  Rng a(5, 1);
  std::vector<double> first(10), second(10), resumed(10);
  a.uniform(first.data(), 10);
  const uint64_t offset = a.offset();
  a.uniform(second.data(), 10);
  Rng b(5, 1);
  b.set_offset(offset);
  b.uniform(resumed.data(), 10);
  EXPECT_EQ(second, resumed);
  EXPECT_NE(first, second);
  EXPECT_EQ(offset, 3u);  // ceil(10 / 4) blocks
}

TEST(Rng, NormalAndUniformHaveTheRightMoments) {
  Rng rng(7);
  std::vector<double> n(100000), u(100000);
  rng.normal(n.data(), 100000, 1.0, 2.0);
  rng.uniform(u.data(), 100000, -1.0, 3.0);
  double mn = 0, vn = 0, mu = 0;
  for (double x : n) mn += x / 1e5;
  for (double x : n) vn += (x - mn) * (x - mn) / 1e5;
  for (double x : u) {
    mu += x / 1e5;
    ASSERT_GE(x, -1.0);
    ASSERT_LT(x, 3.0);
  }
  // Standard errors: mean 2/sqrt(1e5) = 0.006, variance ~0.018; bounds at ~5 sigma.
  EXPECT_NEAR(mn, 1.0, 0.03);
  EXPECT_NEAR(vn, 4.0, 0.1);
  EXPECT_NEAR(mu, 1.0, 0.03);
  EXPECT_LT(rng.next_below(7), 7u);
}

}  // namespace
}  // namespace fm
