// bf16 storage, f32 arithmetic: the rule every backend follows for bf16 tensors.
//
// An op called with bf16 tensors computes exactly what its f32 form computes on the
// same values widened to f32 (widening is exact), and rounds each output to bf16 once,
// to nearest even. An accumulated output (dw += ...) is widened, accumulated in f32 and
// rounded once. The float tensors of one call may mix f32 and bf16 freely (logits bf16
// with f32 log-probs, f32 weight gradients from bf16 activations); f64 never mixes.
//
// WidenedArgs is that rule as code: an op whose kernel has no bf16 form lists its float
// arguments, runs its f32 form on the widened copies, and narrows the outputs back.
// The CPU backend (the reference) runs every bf16 op this way; the CUDA backend does for
// ops without a native bf16 kernel, so both give the same bits wherever f32 does.
#pragma once

#include <initializer_list>
#include <vector>

#include "engine/tensor.h"

namespace fm {

class Backend;

// Element i of a host f32, f64 or bf16 tensor, exactly, as a double.
double host_float_at(const Tensor& t, int64_t i);
// Stores v into element i of a host f32, f64 or bf16 tensor, rounding to nearest even (to
// bf16 through f32: exact for every f32 value).
void host_float_set(Tensor& t, int64_t i, double v);
// dst = src on the host, element by element with the rounding above (shapes checked by the
// caller).
void host_convert(Tensor& dst, const Tensor& src);

class WidenedArgs {
 public:
  enum Role { in, out, inout };  // read; written; read and written (accumulated, in place)
  struct Arg {
    const Tensor* tensor;  // may be undefined (an optional argument): passed through
    Role role;
  };

  // Widens every bf16 argument to a new f32 tensor on b's device (inputs and inout
  // arguments converted, outputs left uninitialised). Throws, naming `op` and the tensor,
  // when bf16 meets f64 in one call.
  WidenedArgs(Backend& b, const char* op, std::initializer_list<Arg> args);

  // True when some argument is bf16: the caller then runs its f32 form on (*this)[i].
  bool any() const { return any_; }
  // Argument i as the f32 form sees it: the widened copy, or the argument itself.
  Tensor& operator[](size_t i) { return widened_[i]; }
  // Narrows each widened out / inout argument back into the caller's tensor.
  void finish();

 private:
  Backend& b_;
  bool any_ = false;
  std::vector<Tensor> original_, widened_;
  std::vector<Role> roles_;
};

}  // namespace fm
