// CachingAllocator (engine/caching_allocator.h) over a counting host source: reuse within a
// pool, never across pools, size rounding and the large-block fit limit, the release-and-retry
// path on a failing source, and the statistics (peak memory per preset is read from them).
#include "engine/caching_allocator.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "engine/error.h"

namespace {

using fm::CachingAllocator;

// Host memory with counts; refuses once `limit` bytes are outstanding.
struct CountingSource final : fm::Allocator {
  size_t outstanding = 0, limit = SIZE_MAX;
  int allocs = 0, frees = 0;
  std::map<void*, size_t> live;
  std::vector<size_t> sizes;
  void* allocate(size_t bytes) override {
    if (outstanding + bytes > limit) throw fm::Error("source: out of memory");
    void* p = std::malloc(bytes);
    outstanding += bytes;
    ++allocs;
    live[p] = bytes;
    sizes.push_back(bytes);
    return p;
  }
  void deallocate(void* p) override {
    auto it = live.find(p);
    ASSERT_NE(it, live.end()) << "freed a block the source never gave";
    outstanding -= it->second;
    live.erase(it);
    std::free(p);
    ++frees;
  }
};

thread_local CachingAllocator::PoolKey t_pool = 1;  // the "current stream" of the test thread

struct Fixture {
  CountingSource source;
  CachingAllocator cache{source, [] { return t_pool; }};
};

TEST(CachingAllocator, FreedBlockIsReusedWithoutTheSource) {
  Fixture f;
  void* a = f.cache.allocate(1000);
  f.cache.deallocate(a);
  void* b = f.cache.allocate(900);  // same 512-byte class (1024)
  EXPECT_EQ(b, a);
  EXPECT_EQ(f.source.allocs, 1);
  EXPECT_EQ(f.cache.stats().reuses, 1);
  f.cache.deallocate(b);
}

TEST(CachingAllocator, RoundsSmallTo512AndLargeTo2MiB) {
  EXPECT_EQ(CachingAllocator::rounded_size(1), 512u);
  EXPECT_EQ(CachingAllocator::rounded_size(512), 512u);
  EXPECT_EQ(CachingAllocator::rounded_size(513), 1024u);
  EXPECT_EQ(CachingAllocator::rounded_size(1u << 20), 1u << 20);
  EXPECT_EQ(CachingAllocator::rounded_size((1u << 20) + 1), 2u << 20);
  EXPECT_EQ(CachingAllocator::rounded_size((5u << 20) + 7), 6u << 20);
  Fixture f;
  void* p = f.cache.allocate(513);
  ASSERT_EQ(f.source.sizes.size(), 1u);
  EXPECT_EQ(f.source.sizes[0], 1024u);  // the source sees the rounded size
  f.cache.deallocate(p);
}

TEST(CachingAllocator, SmallClassesDoNotMix) {
  Fixture f;
  void* a = f.cache.allocate(512);
  f.cache.deallocate(a);
  void* b = f.cache.allocate(1024);  // a larger class: the 512-byte block does not fit
  EXPECT_NE(b, a);
  void* c = f.cache.allocate(100);  // a small request takes a block of its own class only
  EXPECT_EQ(c, a);
  EXPECT_EQ(f.source.allocs, 2);
  f.cache.deallocate(b);
  f.cache.deallocate(c);
}

TEST(CachingAllocator, LargeRequestTakesABlockAtMostAnEighthLarger) {
  Fixture f;
  void* big = f.cache.allocate(16u << 20);  // 16 MiB
  f.cache.deallocate(big);
  void* too_small_for_it = f.cache.allocate(8u << 20);  // 16 > 8 * 9/8: not reused
  EXPECT_NE(too_small_for_it, big);
  void* close = f.cache.allocate((15u << 20) + 1);  // rounds to 16 MiB: reused
  EXPECT_EQ(close, big);
  f.cache.deallocate(too_small_for_it);
  f.cache.deallocate(close);
}

TEST(CachingAllocator, NeverReusesAcrossPools) {
  Fixture f;
  t_pool = 1;
  void* a = f.cache.allocate(4096);
  f.cache.deallocate(a);
  t_pool = 2;  // another stream: must not receive a block stream 1 may still be using
  void* b = f.cache.allocate(4096);
  EXPECT_NE(b, a);
  f.cache.deallocate(b);
  t_pool = 1;
  void* c = f.cache.allocate(4096);
  EXPECT_EQ(c, a);
  f.cache.deallocate(c);
}

TEST(CachingAllocator, BlockReturnsToThePoolThatAllocatedItWhoeverFreesIt) {
  Fixture f;
  t_pool = 1;
  void* a = f.cache.allocate(4096);
  std::thread([&] {
    t_pool = 7;  // freed from a thread whose stream is another one
    f.cache.deallocate(a);
  }).join();
  t_pool = 7;
  void* b = f.cache.allocate(4096);
  EXPECT_NE(b, a);
  t_pool = 1;
  EXPECT_EQ(f.cache.allocate(4096), a);
  f.cache.deallocate(a);
  t_pool = 7;
  f.cache.deallocate(b);
  t_pool = 1;
}

TEST(CachingAllocator, FailingSourceReleasesTheCacheAndRetries) {
  Fixture f;
  f.source.limit = 3u << 20;
  void* a = f.cache.allocate(2u << 20);  // 2 MiB, then cached
  f.cache.deallocate(a);
  // 3 MiB rounds to 4 MiB: the cached 2 MiB block is too small and the source, holding
  // 2 MiB of its 3, refuses; even after the release 4 MiB > 3 MiB, so it fails with figures.
  try {
    f.cache.allocate(3u << 20);
    FAIL() << "expected an out-of-memory error";
  } catch (const fm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("source: out of memory"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("cache released"), std::string::npos) << e.what();
  }
  EXPECT_EQ(f.source.frees, 1);  // the cached block went back
  // A request that fits once the cache is empty succeeds on the retry.
  f.source.limit = 2u << 20;
  void* b = f.cache.allocate(1u << 20);
  f.cache.deallocate(b);
  void* c = f.cache.allocate(2u << 20);  // source holds the 1 MiB block: release, retry
  EXPECT_NE(c, nullptr);
  EXPECT_EQ(f.cache.stats().reserved, 2u << 20);
  f.cache.deallocate(c);
}

TEST(CachingAllocator, StatsTrackInUseReservedAndPeaks) {
  Fixture f;
  void* a = f.cache.allocate(1000);      // 1024
  void* b = f.cache.allocate(3u << 20);  // 4 MiB
  fm::CacheStats s = f.cache.stats();
  EXPECT_EQ(s.in_use, 1024u + (4u << 20));
  EXPECT_EQ(s.reserved, s.in_use);
  f.cache.deallocate(b);
  s = f.cache.stats();
  EXPECT_EQ(s.in_use, 1024u);
  EXPECT_EQ(s.reserved, 1024u + (4u << 20));
  EXPECT_EQ(s.peak_in_use, 1024u + (4u << 20));
  f.cache.reset_peak();
  EXPECT_EQ(f.cache.stats().peak_in_use, 1024u);
  f.cache.release_cached();
  s = f.cache.stats();
  EXPECT_EQ(s.reserved, 1024u);
  EXPECT_EQ(s.source_frees, 1);
  f.cache.deallocate(a);
}

TEST(CachingAllocator, ZeroBytesIsNullAndFreeOfNullIsANoOp) {
  Fixture f;
  EXPECT_EQ(f.cache.allocate(0), nullptr);
  f.cache.deallocate(nullptr);
  EXPECT_EQ(f.source.allocs, 0);
}

TEST(CachingAllocator, ConcurrentThreadsEachReuseTheirOwnBlocks) {
  Fixture f;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&f, t] {
      t_pool = 100 + static_cast<CachingAllocator::PoolKey>(t);
      for (int i = 0; i < 200; ++i) {
        void* p = f.cache.allocate(static_cast<size_t>(1 + (i % 3)) * 4096);
        f.cache.deallocate(p);
      }
    });
  for (std::thread& th : threads) th.join();
  // Each thread needs one block per size class (3), so 12 source allocations in all.
  EXPECT_EQ(f.source.allocs, 12);
  EXPECT_EQ(f.cache.stats().in_use, 0u);
  EXPECT_EQ(f.cache.stats().reuses, 4 * 200 - 12);
}

}  // namespace
