// Shared by the CUDA parity tests (tests/engine/cuda_parity*_test.cpp): the CPU
// reference and CUDA backends side by side, random inputs from fm::Rng, and the
// tolerance check |cuda - cpu| <= rel * (|cpu| + scale) (see cuda_parity_test.cpp
// for how each op family's rel and scale are chosen). Uses only backend.h, so the
// tests build in CPU-only builds and skip without a GPU (FM_SKIP_WITHOUT_GPU).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/error.h"
#include "engine/rng.h"

#define FM_SKIP_WITHOUT_GPU() \
  if (!fm::cuda_available()) GTEST_SKIP() << "no CUDA GPU visible: CUDA parity not run"

namespace fm::testing {

// The two backends and the host <-> device moves between them.
struct Backends {
  std::unique_ptr<fm::Backend> cpu = fm::make_cpu_backend();
  std::unique_ptr<fm::Backend> gpu = fm::make_cuda_backend(0);

  Tensor up(const Tensor& host) {
    Tensor d = gpu->empty(host.shape(), host.dtype());
    gpu->copy(d, host);
    return d;
  }
  Tensor down(const Tensor& dev) { return gpu->to_host(dev); }
};

inline Tensor random(const Shape& shape, DType dtype, fm::Rng& rng, double lo, double hi) {
  Tensor t = Tensor::empty(shape, dtype);
  if (dtype == DType::f32)
    rng.uniform(t.data<float>(), t.numel(), static_cast<float>(lo), static_cast<float>(hi));
  else
    rng.uniform(t.data<double>(), t.numel(), lo, hi);
  return t;
}

// f() throws fm::Error whose message contains every one of `parts` (the op, the tensor...).
template <class F>
void expect_error(F&& f, std::initializer_list<const char*> parts) {
  try {
    f();
    ADD_FAILURE() << "expected an fm::Error mentioning " << *parts.begin();
  } catch (const fm::Error& e) {
    const std::string msg = e.what();
    for (const char* p : parts) EXPECT_NE(msg.find(p), std::string::npos) << msg;
  }
}

inline Tensor clone(const Tensor& host) {
  Tensor t = Tensor::empty(host.shape(), host.dtype());
  std::memcpy(t.raw(), host.raw(), host.nbytes());
  return t;
}

inline double at(const Tensor& t, int64_t i) {
  return t.dtype() == DType::f32 ? static_cast<double>(t.data<float>()[i]) : t.data<double>()[i];
}

// |got - want| <= rel * (|want| + scale) for every element (see the file comment).
inline void expect_close(const Tensor& got, const Tensor& want, double rel, double scale,
                         const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  ASSERT_EQ(got.dtype(), want.dtype()) << what;
  int64_t bad = 0, first_bad = -1;
  double worst = 0.0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    const double g = at(got, i), w = at(want, i);
    const double err = std::abs(g - w);
    const double ratio = err / (rel * (std::abs(w) + scale));
    if (!(ratio <= 1.0)) {  // also catches NaN
      if (bad++ == 0) first_bad = i;
    }
    if (ratio > worst || std::isnan(ratio)) worst = ratio;
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.numel()
                    << " elements outside tolerance; first at flat index " << first_bad << " (cuda "
                    << (first_bad >= 0 ? at(got, first_bad) : 0.0) << ", cpu "
                    << (first_bad >= 0 ? at(want, first_bad) : 0.0)
                    << "); worst error / allowed = " << worst;
}

inline void expect_bitwise_equal(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.shape(), b.shape()) << what;
  ASSERT_EQ(a.dtype(), b.dtype()) << what;
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << what;
}

// f32 and f64 tolerance for an op family: rel for f32 (from the file comment), 1e-12 for f64.
inline double rel_for(DType dt, double f32_rel) {
  return dt == DType::f32 ? f32_rel : 1e-12;
}

// Row offsets of 5 groups over 30 rows, two of them empty: the grouped-GEMM parity cases.
inline std::vector<int64_t> group_offsets() {
  return {0, 5, 5, 17, 30, 30};
}

}  // namespace fm::testing
