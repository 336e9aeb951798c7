// Counter-based random numbers (Philox-4x32-10, Salmon et al. 2011).
// Element i of a draw depends only on (seed, stream, offset + i), so a draw
// is identical however many threads fill it, and the generator's whole state
// is two integers (saved in checkpoints).
#pragma once

#include <array>
#include <cstdint>

namespace fm {

std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

class Rng {
 public:
  explicit Rng(uint64_t seed = 0, uint64_t stream = 0) : seed_(seed), stream_(stream) {}

  // Fill out[0..n) and advance the offset by ceil(n / 4) blocks.
  void uniform(float* out, int64_t n, float lo = 0.f, float hi = 1.f);  // [lo, hi)
  void uniform(double* out, int64_t n, double lo = 0., double hi = 1.);
  void normal(float* out, int64_t n, float mean = 0.f, float stddev = 1.f);
  void normal(double* out, int64_t n, double mean = 0., double stddev = 1.);
  uint32_t next_u32();
  double next_double();                 // [0, 1) with 53 random bits
  uint64_t next_below(uint64_t bound);  // uniform integer in [0, bound)

  uint64_t seed() const { return seed_; }
  uint64_t stream() const { return stream_; }
  uint64_t offset() const { return offset_; }
  void set_offset(uint64_t offset) { offset_ = offset; }

 private:
  std::array<uint32_t, 4> block(uint64_t index) const;
  uint64_t seed_;
  uint64_t stream_;
  uint64_t offset_ = 0;  // in 4-word blocks
};

}  // namespace fm
