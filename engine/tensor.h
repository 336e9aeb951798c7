// Tensor: a shape, a dtype, a device and contiguous row-major storage.
// An owning tensor holds a reference-counted allocation; a view points into
// memory someone else owns (another tensor, a parameter arena, a mapped file).
// Views of owning tensors keep the allocation alive.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/dtype.h"

namespace fm {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[2, 3]"
int64_t shape_numel(const Shape& s);

// Allocation per device kind. The CPU one is built in; the CUDA backend
// registers its own when it is constructed.
struct Allocator {
  virtual ~Allocator() = default;
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* p) = 0;
};
void set_allocator(DeviceKind kind, Allocator* a);
Allocator& allocator_for(DeviceKind kind);

class Tensor {
 public:
  Tensor() = default;

  // Owning, uninitialised (CPU memory is 64-byte aligned).
  static Tensor empty(Shape shape, DType dtype, Device device = Device::cpu());
  // Owning, zero-filled (CPU only).
  static Tensor zeros(Shape shape, DType dtype);
  // Non-owning view of memory the caller keeps alive.
  static Tensor view(void* data, Shape shape, DType dtype, Device device = Device::cpu());

  bool defined() const { return defined_; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const;  // negative i counts from the end
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool is_cpu() const { return device_.kind == DeviceKind::cpu; }
  bool owns_storage() const { return storage_ != nullptr; }

  void* raw() { return data_; }
  const void* raw() const { return data_; }
  // Typed host access; throws when T does not match the dtype or the tensor is not in host
  // memory (device tensors are read through Backend copies: to_host, download_*).
  template <class T>
  T* data();
  template <class T>
  const T* data() const;

  // Views sharing this tensor's storage.
  Tensor reshape(Shape shape) const;               // same numel
  Tensor slice(int64_t begin, int64_t end) const;  // rows [begin, end) of dim 0
  Tensor row(int64_t i) const {
    return slice(i, i + 1).reshape(Shape(shape_.begin() + 1, shape_.end()));
  }

  std::string describe() const;  // "f32[2, 3] on cpu"

 private:
  std::shared_ptr<void> storage_;
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::f32;
  Device device_;
  bool defined_ = false;
};

template <class T>
struct dtype_of;
template <>
struct dtype_of<float> {
  static constexpr DType value = DType::f32;
};
template <>
struct dtype_of<double> {
  static constexpr DType value = DType::f64;
};
template <>
struct dtype_of<int32_t> {
  static constexpr DType value = DType::i32;
};
template <>
struct dtype_of<int64_t> {
  static constexpr DType value = DType::i64;
};
template <>
struct dtype_of<uint8_t> {
  static constexpr DType value = DType::u8;
};
template <>
struct dtype_of<uint16_t> {
  static constexpr DType value = DType::u16;
};

void check_dtype(const Tensor& t, DType expected, const char* what);
// Tensor::data's check: `t` is on the CPU and of dtype `expected`.
void check_host_data(const Tensor& t, DType expected);

template <class T>
T* Tensor::data() {
  check_host_data(*this, dtype_of<T>::value);
  return static_cast<T*>(data_);
}
template <class T>
const T* Tensor::data() const {
  check_host_data(*this, dtype_of<T>::value);
  return static_cast<const T*>(data_);
}

}  // namespace fm
