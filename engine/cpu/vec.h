// Loops over one contiguous row, shared by the CPU kernels. Each runs in index
// order, so a row's result never depends on how the caller split the work.
#pragma once

#include <cstdint>

namespace fm::cpu {

// Loops with less work than this (roughly, multiply-adds) run on one thread. The
// result is the same either way -- no kernel's order depends on the thread count --
// this only avoids waking threads for tiny tensors.
inline constexpr int64_t kParallelMinWork = int64_t{1} << 14;

// sum_i a[i] * b[i]
template <class T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += alpha * x
template <class T>
void add_scaled(T* y, T alpha, const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <class T>
void set_zero(T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = T(0);
}

template <class T>
T max_of(const T* x, int64_t n) {
  T m = x[0];
  for (int64_t i = 1; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

}  // namespace fm::cpu
