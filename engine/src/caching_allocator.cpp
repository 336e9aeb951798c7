#include "engine/caching_allocator.h"

#include <algorithm>
#include <cstdio>

#include "engine/error.h"

namespace fm {

namespace {

constexpr size_t kSmallLimit = size_t{1} << 20;  // 1 MiB
constexpr size_t kSmallRound = 512;
constexpr size_t kLargeRound = size_t{2} << 20;  // 2 MiB

size_t round_up(size_t n, size_t to) {
  return (n + to - 1) / to * to;
}

}  // namespace

CachingAllocator::CachingAllocator(Allocator& source, std::function<PoolKey()> pool_of_caller)
    : source_(source), pool_of_caller_(std::move(pool_of_caller)) {}

CachingAllocator::~CachingAllocator() {
  std::lock_guard<std::mutex> lock(mu_);
  release_cached_locked();  // blocks still handed out stay with their tensors
}

size_t CachingAllocator::rounded_size(size_t bytes) {
  if (bytes <= kSmallLimit) return round_up(std::max<size_t>(bytes, 1), kSmallRound);
  return round_up(bytes, kLargeRound);
}

void* CachingAllocator::take_cached(size_t size, PoolKey pool) {
  auto pit = free_.find(pool);
  if (pit == free_.end()) return nullptr;
  std::multimap<size_t, void*>& blocks = pit->second;
  auto it = blocks.lower_bound(size);
  if (it == blocks.end()) return nullptr;
  const size_t limit = size <= kSmallLimit ? size : size + size / 8;
  if (it->first > limit) return nullptr;
  void* p = it->second;
  live_[p] = Block{it->first, pool};
  blocks.erase(it);
  return p;
}

void* CachingAllocator::allocate(size_t bytes) {
  if (bytes == 0) return nullptr;
  const size_t size = rounded_size(bytes);
  const PoolKey pool = pool_of_caller_();
  std::lock_guard<std::mutex> lock(mu_);
  void* p = take_cached(size, pool);
  if (p != nullptr) {
    ++stats_.reuses;
  } else {
    try {
      p = source_.allocate(size);
    } catch (const Error&) {
      release_cached_locked();  // one more try with every cached block given back
      try {
        p = source_.allocate(size);
      } catch (const Error& e) {
        throw Error(
            fmt::format("{} (caching allocator: {} bytes requested, {} bytes in use, {} reserved, "
                        "cache released before the retry)",
                        e.what(), bytes, stats_.in_use, stats_.reserved));
      }
    }
    ++stats_.source_allocs;
    live_[p] = Block{size, pool};
    stats_.reserved += size;
    stats_.peak_reserved = std::max(stats_.peak_reserved, stats_.reserved);
  }
  stats_.in_use += live_[p].size;
  stats_.peak_in_use = std::max(stats_.peak_in_use, stats_.in_use);
  return p;
}

// Called from tensor destructors: must not throw.
void CachingAllocator::deallocate(void* p) {
  if (p == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(p);
  if (it == live_.end()) {
    std::fprintf(stderr, "foremoe: caching allocator: free of %p, which it did not hand out\n", p);
    return;
  }
  const Block b = it->second;
  live_.erase(it);
  stats_.in_use -= b.size;
  free_[b.pool].emplace(b.size, p);
}

void CachingAllocator::release_cached_locked() {
  for (auto& [pool, blocks] : free_)
    for (auto& [size, p] : blocks) {
      source_.deallocate(p);
      stats_.reserved -= size;
      ++stats_.source_frees;
    }
  free_.clear();
}

void CachingAllocator::release_cached() {
  std::lock_guard<std::mutex> lock(mu_);
  release_cached_locked();
}

CacheStats CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void CachingAllocator::reset_peak() {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.peak_in_use = stats_.in_use;
  stats_.peak_reserved = stats_.reserved;
}

}  // namespace fm
