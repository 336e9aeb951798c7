#include "engine/mixed_precision.h"

#include "engine/backend.h"
#include "engine/error.h"

namespace fm {

double host_float_at(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::f64:
      return static_cast<const double*>(t.raw())[i];
    case DType::f32:
      return static_cast<const float*>(t.raw())[i];
    default:
      return bf16_to_f32(static_cast<const uint16_t*>(t.raw())[i]);
  }
}

void host_float_set(Tensor& t, int64_t i, double v) {
  switch (t.dtype()) {
    case DType::f64:
      static_cast<double*>(t.raw())[i] = v;
      break;
    case DType::f32:
      static_cast<float*>(t.raw())[i] = static_cast<float>(v);
      break;
    default:
      static_cast<uint16_t*>(t.raw())[i] = f32_to_bf16(static_cast<float>(v));
  }
}

void host_convert(Tensor& dst, const Tensor& src) {
  if (src.dtype() == DType::f32 && dst.dtype() == DType::bf16)  // the master-weight copy
    return f32_to_bf16_n(static_cast<uint16_t*>(dst.raw()), static_cast<const float*>(src.raw()),
                         src.numel());
  for (int64_t i = 0; i < src.numel(); ++i) host_float_set(dst, i, host_float_at(src, i));
}

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
