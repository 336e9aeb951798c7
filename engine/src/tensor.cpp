#include "engine/tensor.h"

#include <cstdlib>
#include <cstring>

#include "engine/error.h"

namespace fm {

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

namespace {

struct CpuAllocator final : Allocator {
  void* allocate(size_t bytes) override {
    const size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    FM_CHECK(p != nullptr, "out of host memory allocating {} bytes", bytes);
    return p;
  }
  void deallocate(void* p) override { std::free(p); }
};

CpuAllocator g_cpu_allocator;
Allocator* g_allocators[2] = {&g_cpu_allocator, nullptr};

}  // namespace

void set_allocator(DeviceKind kind, Allocator* a) {
  g_allocators[static_cast<int>(kind)] = a;
}

Allocator& allocator_for(DeviceKind kind) {
  Allocator* a = g_allocators[static_cast<int>(kind)];
  FM_CHECK(a != nullptr, "no allocator for device kind {} (is the CUDA backend built and created?)",
           static_cast<int>(kind));
  return *a;
}

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  for (int64_t d : shape)
    FM_CHECK(d >= 0, "Tensor::empty: negative dimension in {}", shape_str(shape));
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  t.defined_ = true;
  Allocator* a = &allocator_for(device.kind);
  void* p = a->allocate(t.nbytes());
  t.storage_ = std::shared_ptr<void>(p, [a](void* q) { a->deallocate(q); });
  t.data_ = p;
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype) {
  Tensor t = empty(std::move(shape), dtype, Device::cpu());
  std::memset(t.data_, 0, t.nbytes());
  return t;
}

Tensor Tensor::view(void* data, Shape shape, DType dtype, Device device) {
  Tensor t;
  t.data_ = data;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  t.defined_ = true;
  return t;
}

int64_t Tensor::dim(int i) const {
  const int r = rank();
  const int j = i < 0 ? i + r : i;
  FM_CHECK(j >= 0 && j < r, "Tensor::dim({}) out of range for {}", i, describe());
  return shape_[j];
}

Tensor Tensor::reshape(Shape shape) const {
  FM_CHECK(shape_numel(shape) == numel(), "reshape {} -> {}: element counts differ", describe(),
           shape_str(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::slice(int64_t begin, int64_t end) const {
  FM_CHECK(rank() >= 1 && 0 <= begin && begin <= end && end <= shape_[0],
           "slice [{}, {}) out of range for {}", begin, end, describe());
  Tensor t = *this;
  const size_t row_bytes = shape_[0] == 0 ? 0 : nbytes() / static_cast<size_t>(shape_[0]);
  t.data_ = static_cast<char*>(data_) + row_bytes * static_cast<size_t>(begin);
  t.shape_[0] = end - begin;
  return t;
}

std::string Tensor::describe() const {
  return fmt::format("{}{} on {}", dtype_name(dtype_), shape_str(shape_), device_name(device_));
}

void check_dtype(const Tensor& t, DType expected, const char* what) {
  FM_CHECK(t.dtype() == expected, "{}: expected {} but the tensor is {}", what,
           dtype_name(expected), t.describe());
}

void check_host_data(const Tensor& t, DType expected) {
  FM_CHECK(t.is_cpu(),
           "Tensor::data: {} is not in host memory; read it through its backend (to_host, "
           "download_f64, download_i32)",
           t.describe());
  check_dtype(t, expected, "Tensor::data");
}

}  // namespace fm
