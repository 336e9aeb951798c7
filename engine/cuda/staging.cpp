// StagingRing (staging.h): chunks are taken in ring order, so pending copies sit in the
// deque in the order of their chunks around the ring; a new chunk waits only for the pending
// copies it overlaps, and completed ones are recycled as they are found.
#include "engine/cuda/staging.h"

#include <cstring>

#include "engine/cuda/check.h"

namespace fm::cuda {

namespace {
constexpr size_t kAlign = 256;  // chunk starts: DMA-friendly alignment
size_t align_up(size_t n) {
  return (n + kAlign - 1) / kAlign * kAlign;
}
}  // namespace

StagingRing::StagingRing() {
  FM_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&ring_), kRingBytes, cudaHostAllocDefault));
}

StagingRing::~StagingRing() {
  for (Pending& p : pending_) {
    (void)cudaEventSynchronize(p.done);
    (void)cudaEventDestroy(p.done);
  }
  for (cudaEvent_t e : idle_events_) (void)cudaEventDestroy(e);
  if (ring_ != nullptr) (void)cudaFreeHost(ring_);
}

void StagingRing::wait_for(size_t begin, size_t end) {
  for (auto it = pending_.begin(); it != pending_.end();) {
    const bool overlaps = it->begin < end && begin < it->end;
    const cudaError_t state = overlaps ? cudaEventSynchronize(it->done) : cudaEventQuery(it->done);
    if (state == cudaErrorNotReady) {
      ++it;
      continue;
    }
    FM_CUDA_CHECK(state);
    idle_events_.push_back(it->done);
    it = pending_.erase(it);
  }
}

bool StagingRing::copy_to_device(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  if (bytes > kMaxCopyBytes) return false;
  if (bytes == 0) return true;
  size_t begin = head_;
  if (begin + bytes > kRingBytes) begin = 0;  // wrap: the chunk must be contiguous
  const size_t end = begin + bytes;
  wait_for(begin, end);
  std::memcpy(ring_ + begin, src, bytes);
  FM_CUDA_CHECK(cudaMemcpyAsync(dst, ring_ + begin, bytes, cudaMemcpyHostToDevice, stream));
  cudaEvent_t done = nullptr;
  if (idle_events_.empty()) {
    FM_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  } else {
    done = idle_events_.back();
    idle_events_.pop_back();
  }
  const cudaError_t recorded = cudaEventRecord(done, stream);
  if (recorded != cudaSuccess) {
    // The DMA is queued but unguarded: wait for it so the chunk is not overwritten under it.
    (void)cudaStreamSynchronize(stream);
    idle_events_.push_back(done);
    FM_CUDA_CHECK(recorded);
  }
  pending_.push_back({begin, end, done});
  head_ = align_up(end) >= kRingBytes ? 0 : align_up(end);
  ++copies_;
  return true;
}

}  // namespace fm::cuda
