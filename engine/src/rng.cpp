#include "engine/rng.h"

#include <cmath>

namespace fm {

namespace {
constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;

inline void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

inline float u32_to_unit_float(uint32_t x) {
  return static_cast<float>(x >> 8) * 0x1.0p-24f;
}
inline double u32_to_unit_double(uint32_t x) {
  return static_cast<double>(x) * 0x1.0p-32;
}
}  // namespace

std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kMul0, c[0], &hi0, &lo0);
    mulhilo(kMul1, c[2], &hi1, &lo1);
    c = {hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0};
    k[0] += kWeyl0;
    k[1] += kWeyl1;
  }
  return c;
}

std::array<uint32_t, 4> Rng::block(uint64_t index) const {
  return philox4x32({static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                     static_cast<uint32_t>(stream_), static_cast<uint32_t>(stream_ >> 32)},
                    {static_cast<uint32_t>(seed_), static_cast<uint32_t>(seed_ >> 32)});
}

// One block of four words gives four uniforms.
template <class T, class BlockFn, class ToUnit>
static void uniform_fill(BlockFn block, uint64_t offset, T* out, int64_t n, T lo, T hi,
                         ToUnit to_unit) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t b = 0; b < (n + 3) / 4; ++b) {
    const auto r = block(offset + static_cast<uint64_t>(b));
    for (int j = 0; j < 4 && 4 * b + j < n; ++j) out[4 * b + j] = lo + (hi - lo) * to_unit(r[j]);
  }
}

void Rng::uniform(float* out, int64_t n, float lo, float hi) {
  uniform_fill([this](uint64_t i) { return block(i); }, offset_, out, n, lo, hi, u32_to_unit_float);
  offset_ += static_cast<uint64_t>((n + 3) / 4);
}

void Rng::uniform(double* out, int64_t n, double lo, double hi) {
  uniform_fill([this](uint64_t i) { return block(i); }, offset_, out, n, lo, hi,
               u32_to_unit_double);
  offset_ += static_cast<uint64_t>((n + 3) / 4);
}

// Box-Muller: each block of four words gives two pairs -> four normals.
template <class T, class BlockFn>
static void normal_fill(BlockFn block, uint64_t offset, T* out, int64_t n, T mean, T stddev) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t b = 0; b < (n + 3) / 4; ++b) {
    const auto r = block(offset + static_cast<uint64_t>(b));
    for (int pair = 0; pair < 2; ++pair) {
      const double u1 = (static_cast<double>(r[2 * pair]) + 1.0) * 0x1.0p-32;  // (0, 1]
      const double u2 = static_cast<double>(r[2 * pair + 1]) * 0x1.0p-32;
      const double rad = std::sqrt(-2.0 * std::log(u1));
      const double z[2] = {rad * std::cos(2.0 * M_PI * u2), rad * std::sin(2.0 * M_PI * u2)};
      for (int j = 0; j < 2; ++j) {
        const int64_t i = 4 * b + 2 * pair + j;
        if (i < n) out[i] = mean + stddev * static_cast<T>(z[j]);
      }
    }
  }
}

void Rng::normal(float* out, int64_t n, float mean, float stddev) {
  normal_fill([this](uint64_t i) { return block(i); }, offset_, out, n, mean, stddev);
  offset_ += static_cast<uint64_t>((n + 3) / 4);
}

void Rng::normal(double* out, int64_t n, double mean, double stddev) {
  normal_fill([this](uint64_t i) { return block(i); }, offset_, out, n, mean, stddev);
  offset_ += static_cast<uint64_t>((n + 3) / 4);
}

uint32_t Rng::next_u32() {
  return block(offset_++)[0];
}

double Rng::next_double() {
  const auto r = block(offset_++);
  const uint64_t bits = ((static_cast<uint64_t>(r[0]) << 32) | r[1]) >> 11;  // 53 bits
  return static_cast<double>(bits) * 0x1.0p-53;
}

uint64_t Rng::next_below(uint64_t bound) {
  // Rejection sampling on 64-bit draws: unbiased for every bound.
  const uint64_t limit = bound == 0 ? 0 : UINT64_MAX - UINT64_MAX % bound;
  while (true) {
    const auto r = block(offset_++);
    const uint64_t x = (static_cast<uint64_t>(r[0]) << 32) | r[1];
    if (bound == 0) return 0;
    if (x < limit) return x % bound;
  }
}

}  // namespace fm
