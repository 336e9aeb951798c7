// CachingAllocator: keeps freed blocks for reuse instead of returning them to
// the device, so a training step's many short-lived activations cost no
// cudaMalloc / cudaFree (cudaFree also waits for the whole device) once the
// first step has warmed the cache.
//
// Reuse is stream-ordered: every block belongs to the pool of the stream that
// was current (pool_of_caller) when it was allocated, and a freed block is
// only handed out again to an allocation from the same pool. Work queued on
// one stream runs in order, so a block freed while kernels still use it is
// only rewritten by kernels queued after them. Memory shared with another
// stream (a communicator's) must be synchronised by that user before it lets
// go of the tensor.
//
// Sizes are rounded: up to 1 MiB to a multiple of 512 bytes (reuse needs the
// same rounded size), above that to a multiple of 2 MiB (reuse takes the
// smallest cached block of at least the size and at most 1/8 larger). When
// the source allocator fails, every cached block is released and the
// allocation tried once more; the error then carries the cache's figures.
// Thread-safe (in-process ranks free each other's tensors).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <unordered_map>

#include "engine/tensor.h"

namespace fm {

struct CacheStats {
  size_t in_use = 0;         // bytes in blocks handed out (rounded sizes)
  size_t reserved = 0;       // bytes held from the source: in use + cached
  size_t peak_in_use = 0;    // since construction or reset_peak()
  size_t peak_reserved = 0;  // since construction or reset_peak()
  int64_t source_allocs = 0;
  int64_t source_frees = 0;
  int64_t reuses = 0;  // allocations served from the cache
};

class CachingAllocator final : public Allocator {
 public:
  using PoolKey = uintptr_t;
  // source: the uncached allocator (kept alive by the caller); pool_of_caller: the
  // calling thread's current stream (or any key naming an in-order queue).
  CachingAllocator(Allocator& source, std::function<PoolKey()> pool_of_caller);
  ~CachingAllocator() override;

  void* allocate(size_t bytes) override;
  void deallocate(void* p) override;

  void release_cached();  // returns every cached (free) block to the source
  CacheStats stats() const;
  void reset_peak();

  static size_t rounded_size(size_t bytes);

 private:
  struct Block {
    size_t size;
    PoolKey pool;
  };
  void* take_cached(size_t size, PoolKey pool);  // under mu_; nullptr if none fits
  void release_cached_locked();

  Allocator& source_;
  std::function<PoolKey()> pool_of_caller_;
  mutable std::mutex mu_;
  std::unordered_map<void*, Block> live_;                 // handed out
  std::map<PoolKey, std::multimap<size_t, void*>> free_;  // cached, by pool then size
  CacheStats stats_;
};

}  // namespace fm
