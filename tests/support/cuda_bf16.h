// The bf16 side of the CUDA parity tests (tests/engine/cuda_bf16_parity_test.cpp and
// cuda_gemm_lt_test.cpp): host bf16 <-> f32, the tolerance |cuda - ref| <= ulp + rel * (|ref| +
// scale) with one bf16 spacing for a bf16 output, and check_op, which runs an op on the CUDA
// backend with the arguments as given and on the CPU with them widened to f32.
#pragma once

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "support/cuda_parity.h"

namespace fm::testing {

inline uint16_t* bits(Tensor& t) {
  return static_cast<uint16_t*>(t.raw());
}
inline const uint16_t* bits(const Tensor& t) {
  return static_cast<const uint16_t*>(t.raw());
}

// Host f32 -> host bf16, each value rounded to nearest even.
inline Tensor to_bf16(const Tensor& f32) {
  Tensor t = Tensor::empty(f32.shape(), DType::bf16);
  for (int64_t i = 0; i < f32.numel(); ++i) bits(t)[i] = fm::f32_to_bf16(f32.data<float>()[i]);
  return t;
}

// Host bf16 -> host f32 (exact); any other tensor is cloned; undefined stays undefined.
inline Tensor widened(const Tensor& t) {
  if (!t.defined()) return Tensor();
  if (t.dtype() != DType::bf16) return clone(t);
  Tensor f = Tensor::empty(t.shape(), DType::f32);
  for (int64_t i = 0; i < t.numel(); ++i) f.data<float>()[i] = fm::bf16_to_f32(bits(t)[i]);
  return f;
}

inline Tensor random_bf16(const Shape& shape, fm::Rng& rng, double lo, double hi) {
  return to_bf16(random(shape, DType::f32, rng, lo, hi));
}

inline Tensor i32_tensor(const std::vector<int32_t>& v) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::i32);
  std::copy(v.begin(), v.end(), t.data<int32_t>());
  return t;
}

inline double value(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::bf16:
      return fm::bf16_to_f32(bits(t)[i]);
    case DType::f32:
      return t.data<float>()[i];
    default:
      return t.data<double>()[i];
  }
}

// One bf16 spacing at |w| (8 significant bits; subnormals down to 2^-133).
inline double bf16_ulp(double w) {
  int e = 0;
  std::frexp(w, &e);  // |w| in [2^(e-1), 2^e)
  return w == 0.0 ? std::ldexp(1.0, -133) : std::ldexp(1.0, std::max(e - 8, -133));
}

// |got - want| <= ulp + rel * (|want| + scale), ulp as in the file comment.
inline void expect_near(const Tensor& got, const Tensor& want, double rel, double scale,
                        const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  ASSERT_EQ(got.dtype(), want.dtype()) << what;
  const bool bf16 = got.dtype() == DType::bf16;
  int64_t bad = 0, first = -1;
  for (int64_t i = 0; i < want.numel(); ++i) {
    const double g = value(got, i), w = value(want, i);
    const double allowed = (bf16 ? bf16_ulp(w) : 0.0) + rel * (std::abs(w) + scale);
    if (!(std::abs(g - w) <= allowed) && bad++ == 0) first = i;
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.numel()
                    << " elements outside tolerance; first at " << first << " (cuda "
                    << (first >= 0 ? value(got, first) : 0.0) << ", reference "
                    << (first >= 0 ? value(want, first) : 0.0) << ")";
}

// An output of an op under test: argument index, name, the f32 tolerance (rel, scale).
struct Out {
  size_t index;
  const char* name;
  double rel;
  double scale;
};
using Op = std::function<void(fm::Backend&, std::vector<Tensor>&)>;

// The reference for a CUDA output of dtype `dt` from the CPU's f32 result.
inline Tensor reference(const Tensor& f32, DType dt) {
  return dt == DType::bf16 ? to_bf16(f32) : clone(f32);
}

// Runs `op` on the CUDA backend with `args` as given (host tensors, uploaded: bf16, f32, i32
// or undefined) and on the CPU with the float ones widened to f32; compares each output.
inline void check_op(Backends& b, const std::string& what, const std::vector<Tensor>& args,
                     const std::vector<Out>& outs, const Op& op) {
  std::vector<Tensor> cpu, gpu;
  for (const Tensor& a : args) {
    cpu.push_back(widened(a));
    gpu.push_back(a.defined() ? b.up(a) : Tensor());
  }
  op(*b.cpu, cpu);
  op(*b.gpu, gpu);
  for (const Out& o : outs)
    expect_near(b.down(gpu[o.index]), reference(cpu[o.index], args[o.index].dtype()), o.rel,
                o.scale, what + " " + o.name);
}

// A native bf16 kernel must give the bits of the CUDA f32 kernel on the widened values.
inline void check_native_is_widened(Backends& b, const std::string& what,
                                    const std::vector<Tensor>& args,
                                    const std::vector<size_t>& outs, const Op& op) {
  std::vector<Tensor> narrow, wide;
  for (const Tensor& a : args) {
    narrow.push_back(a.defined() ? b.up(a) : Tensor());
    wide.push_back(a.defined() ? b.up(widened(a)) : Tensor());
  }
  op(*b.gpu, narrow);
  op(*b.gpu, wide);
  for (size_t i : outs)
    expect_bitwise_equal(b.down(narrow[i]), reference(b.down(wide[i]), args[i].dtype()),
                         what + ": native bf16 vs widened f32, argument " + std::to_string(i));
}

}  // namespace fm::testing
