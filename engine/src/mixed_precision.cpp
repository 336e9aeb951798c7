#include "engine/mixed_precision.h"

#include "engine/backend.h"
#include "engine/error.h"

namespace fm {

WidenedArgs::WidenedArgs(Backend& b, const char* op, std::initializer_list<Arg> args) : b_(b) {
  bool f64 = false;
  for (const Arg& a : args) {
    const Tensor& t = *a.tensor;
    any_ = any_ || (t.defined() && t.dtype() == DType::bf16);
    f64 = f64 || (t.defined() && t.dtype() == DType::f64);
  }
  if (!any_) return;
  size_t i = 0;
  for (const Arg& a : args) {
    const Tensor& t = *a.tensor;
    FM_CHECK(!(f64 && t.defined() && t.dtype() == DType::bf16),
             "{}: argument {} is {} but another argument is f64; bf16 mixes only with f32", op, i,
             t.describe());
    original_.push_back(t);
    roles_.push_back(a.role);
    if (!t.defined() || t.dtype() != DType::bf16) {
      widened_.push_back(t);
    } else {
      widened_.push_back(b.empty(t.shape(), DType::f32));
      if (a.role != out) b.convert(widened_.back(), t);
    }
    ++i;
  }
}

void WidenedArgs::finish() {
  for (size_t i = 0; i < original_.size(); ++i)
    if (roles_[i] != in && original_[i].defined() && original_[i].dtype() == DType::bf16)
      b_.convert(original_[i], widened_[i]);
}

}  // namespace fm
