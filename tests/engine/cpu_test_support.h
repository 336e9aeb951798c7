// Helpers for the CPU backend tests: random host tensors, dtype conversion, and
// the finite-difference gradient check used for every op with a backward.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/rng.h"
#include "engine/tensor.h"

namespace fm::test {

// Standard-normal f64 (or f32) tensor.
inline Tensor random_normal(Shape shape, Rng& rng, DType dtype = DType::f64) {
  Tensor t = Tensor::empty(std::move(shape), dtype);
  if (dtype == DType::f32)
    rng.normal(t.data<float>(), t.numel());
  else
    rng.normal(t.data<double>(), t.numel());
  return t;
}

inline Tensor random_uniform(Shape shape, Rng& rng, double lo, double hi) {
  Tensor t = Tensor::empty(std::move(shape), DType::f64);
  rng.uniform(t.data<double>(), t.numel(), lo, hi);
  return t;
}

inline Tensor int_tensor(Shape shape, const std::vector<int32_t>& values) {
  Tensor t = Tensor::empty(std::move(shape), DType::i32);
  EXPECT_EQ(static_cast<size_t>(t.numel()), values.size());
  std::copy(values.begin(), values.end(), t.data<int32_t>());
  return t;
}

// Uniform ids in [0, bound).
inline Tensor random_ids(Shape shape, Rng& rng, int64_t bound) {
  Tensor t = Tensor::empty(std::move(shape), DType::i32);
  for (int64_t i = 0; i < t.numel(); ++i)
    t.data<int32_t>()[i] = static_cast<int32_t>(rng.next_below(static_cast<uint64_t>(bound)));
  return t;
}

inline Tensor clone(const Tensor& x) {
  Tensor t = Tensor::empty(x.shape(), x.dtype());
  if (x.nbytes() > 0) std::memcpy(t.raw(), x.raw(), x.nbytes());
  return t;
}

// Element i of an f32 or f64 tensor, as double.
inline double at(const Tensor& x, int64_t i) {
  return x.dtype() == DType::f32 ? static_cast<double>(x.data<float>()[i]) : x.data<double>()[i];
}

// f32 <-> f64 conversion on the host; other tensors (ids) pass through.
inline Tensor to_dtype(const Tensor& x, DType dtype) {
  if (!x.defined() || x.dtype() == dtype || !(x.dtype() == DType::f32 || x.dtype() == DType::f64))
    return x;
  Tensor t = Tensor::empty(x.shape(), dtype);
  for (int64_t i = 0; i < x.numel(); ++i) {
    if (dtype == DType::f32)
      t.data<float>()[i] = static_cast<float>(at(x, i));
    else
      t.data<double>()[i] = at(x, i);
  }
  return t;
}

inline bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

inline double max_abs(const Tensor& x) {
  double m = 0;
  for (int64_t i = 0; i < x.numel(); ++i) m = std::max(m, std::abs(at(x, i)));
  return m;
}

// Every element within rtol * (|expected| + max |expected|): relative, with a floor set by
// the tensor's scale (rounding errors scale with the largest terms that were summed).
inline void expect_close(const Tensor& actual, const Tensor& expected, double rtol,
                         const std::string& what) {
  ASSERT_EQ(actual.shape(), expected.shape()) << what;
  const double scale = max_abs(expected);
  int64_t worst = -1;
  double worst_excess = 0;
  for (int64_t i = 0; i < expected.numel(); ++i) {
    const double err = std::abs(at(actual, i) - at(expected, i));
    const double excess = err / (rtol * (std::abs(at(expected, i)) + scale));
    if (!(excess <= 1) && (worst < 0 || excess > worst_excess)) worst = i, worst_excess = excess;
  }
  if (worst >= 0)
    ADD_FAILURE() << what << "[" << worst << "] = " << at(actual, worst) << " but expected "
                  << at(expected, worst) << " (rtol " << rtol << ", scale " << scale << ")";
}

// A forward op under test: float inputs (f32 or f64, all one dtype) -> float outputs.
// Index tensors are captured by the lambda.
using Tensors = std::vector<Tensor>;
using Forward = std::function<Tensors(const Tensors&)>;

// One random weight tensor per output of f(inputs); the scalar objective is
// L = sum over outputs of sum(weights * output), so dL/d output = weights.
inline Tensors random_weights_for(const Forward& f, const Tensors& inputs, Rng& rng) {
  Tensors w;
  for (const Tensor& out : f(inputs)) w.push_back(random_normal(out.shape(), rng));
  return w;
}

inline double objective(const Forward& f, const Tensors& inputs, const Tensors& weights) {
  const Tensors outs = f(inputs);
  double l = 0;
  for (size_t o = 0; o < outs.size(); ++o)
    for (int64_t i = 0; i < outs[o].numel(); ++i) l += at(weights[o], i) * at(outs[o], i);
  return l;
}

// Compares grads[i] (analytic dL/d inputs[i], f64; undefined = not checked) with central
// differences of the f64 objective.
// Tolerance: with h = 1e-6, truncation error is ~h^2 |L'''| / 6 ~ 1e-12 and rounding error
// ~1e-16 |L| / h ~ 1e-10 |L| (|L| < 100 in these tests), both far below 1e-6 relative
// (absolute for gradients below 1), while any wrong term in a backward shows up at ~1e-1.
inline void expect_gradients_match_finite_differences(const Forward& f, const Tensors& inputs,
                                                      const Tensors& weights, const Tensors& grads,
                                                      const std::vector<std::string>& names) {
  constexpr double h = 1e-6, tol = 1e-6;
  Tensors x;
  for (const Tensor& t : inputs) x.push_back(clone(t));
  for (size_t k = 0; k < x.size(); ++k) {
    if (!grads[k].defined()) continue;
    ASSERT_EQ(grads[k].shape(), x[k].shape()) << names[k];
    double* p = x[k].data<double>();
    double worst_excess = 0, worst_fd = 0;
    int64_t worst = -1;
    for (int64_t i = 0; i < x[k].numel(); ++i) {
      const double orig = p[i];
      p[i] = orig + h;
      const double up = objective(f, x, weights);
      p[i] = orig - h;
      const double down = objective(f, x, weights);
      p[i] = orig;
      const double fd = (up - down) / (2 * h);
      const double excess = std::abs(at(grads[k], i) - fd) / (tol * std::max(1.0, std::abs(fd)));
      if (!(excess <= 1) && (worst < 0 || excess > worst_excess))
        worst = i, worst_excess = excess, worst_fd = fd;
    }
    if (worst >= 0)
      ADD_FAILURE() << "d" << names[k] << "[" << worst << "] = " << at(grads[k], worst)
                    << " but finite differences give " << worst_fd;
  }
}

// The forward in f32 agrees with the forward in f64 to rtol. f32 rounds at ~6e-8 per
// operation; the sums here are short (< 100 terms), so 1e-5 leaves a wide margin.
inline void expect_f32_forward_matches_f64(const Forward& f, const Tensors& inputs64,
                                           double rtol = 1e-5) {
  Tensors inputs32;
  for (const Tensor& t : inputs64) inputs32.push_back(to_dtype(t, DType::f32));
  const Tensors out64 = f(inputs64), out32 = f(inputs32);
  ASSERT_EQ(out64.size(), out32.size());
  for (size_t o = 0; o < out64.size(); ++o) {
    EXPECT_EQ(out32[o].dtype(), DType::f32);
    expect_close(out32[o], out64[o], rtol, "output " + std::to_string(o));
  }
}

}  // namespace fm::test
