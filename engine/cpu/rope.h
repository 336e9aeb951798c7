// Rotary position embedding in place on x [N, H, D], the "rotate_half" layout:
// the pair (i, i + D/2) of every head rotates by angle pos[n] * theta^(-2i/D).
// Angles are computed in f64; rows are independent.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "engine/cpu/vec.h"

namespace fm::cpu {

// (x_i, x_{i+D/2}) <- (x_i cos a - x_{i+D/2} sin a, x_{i+D/2} cos a + x_i sin a);
// inverse rotates by -a (the transpose, hence the backward).
template <class T>
void rope(T* x, const int32_t* pos, int64_t N, int64_t H, int64_t D, double theta, bool inverse) {
  const int64_t half = D / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[i] = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(D));
  const double sign = inverse ? -1.0 : 1.0;
#pragma omp parallel for schedule(static) if (N * H * D > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = sign * static_cast<double>(pos[n]) * inv_freq[i];
      const T c = static_cast<T>(std::cos(angle)), s = static_cast<T>(std::sin(angle));
      for (int64_t h = 0; h < H; ++h) {
        T* row = x + (n * H + h) * D;
        const T x1 = row[i], x2 = row[i + half];
        row[i] = x1 * c - x2 * s;
        row[i + half] = x2 * c + x1 * s;
      }
    }
  }
}

}  // namespace fm::cpu
