// Pinned host staging for host-to-device copies (private to the CUDA backend). An upload from
// ordinary (pageable) host memory would otherwise cost a stream synchronisation: the backend
// must not return before the DMA has read the host buffer, which the caller may free or
// reuse at once. Through the ring the copy becomes a memcpy into pinned memory plus an
// asynchronous DMA from there, so the stream keeps running: the decode loop's per-layer
// uploads (token permutations, cache rows) no longer drain the GPU.
//
// One ring per backend (its stream). Each copy takes the next chunk of the ring and records
// an event after its DMA; a chunk is written again only once the events of every earlier copy
// it overlaps have completed (normally long before: the ring is much larger than a step's
// uploads). A copy larger than kMaxCopyBytes returns false and the caller takes the
// synchronous path.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <deque>
#include <vector>

namespace fm::cuda {

class StagingRing {
 public:
  static constexpr size_t kRingBytes = size_t{64} << 20;
  static constexpr size_t kMaxCopyBytes = size_t{16} << 20;

  StagingRing();  // cudaHostAlloc on the current device
  ~StagingRing();
  StagingRing(const StagingRing&) = delete;
  StagingRing& operator=(const StagingRing&) = delete;

  // Queues device `dst` <- host `src` (`bytes`) on `stream` through the ring; `src` may be
  // reused as soon as this returns. False (nothing queued) when bytes > kMaxCopyBytes.
  bool copy_to_device(void* dst, const void* src, size_t bytes, cudaStream_t stream);

  size_t copies() const { return copies_; }  // copies queued through the ring so far

 private:
  struct Pending {
    size_t begin, end;  // [begin, end) of the ring
    cudaEvent_t done;   // recorded after the DMA out of it
  };
  // Waits for (and recycles) every pending copy whose chunk overlaps [begin, end).
  void wait_for(size_t begin, size_t end);

  char* ring_ = nullptr;
  size_t head_ = 0;  // where the next chunk starts
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> idle_events_;
  size_t copies_ = 0;
};

}  // namespace fm::cuda
