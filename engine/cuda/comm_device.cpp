// The device side of the in-process communicator (engine/src/comm_device.h) on the CUDA
// runtime: pointer attributes, copies with cudaMemcpyDefault (either side host or device,
// peer copies between GPUs included) and the rank-order reduction kernel (comm_reduce.cu),
// all on the calling thread's per-thread default stream.
#include "engine/src/comm_device.h"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "engine/backend.h"
#include "engine/cuda/check.h"
#include "engine/cuda/kernels.h"
#include "engine/error.h"
#include "engine/src/inprocess_comm.h"

namespace fm {
namespace {

// Makes `device` current for the scope (the rank thread's current device is its own).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    FM_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) FM_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

// Devices this thread has enqueued work on since its last device_sync().
thread_local std::vector<int> pending_devices;

void note_pending(int device) {
  if (std::find(pending_devices.begin(), pending_devices.end(), device) == pending_devices.end())
    pending_devices.push_back(device);
}

template <class T>
void reduce_chained(void* out, const void* const* inputs, int n, int64_t offset, int64_t count,
                    bool max) {
  T* o = static_cast<T*>(out);
  std::vector<const T*> in;
  in.reserve(cuda::kReduceMaxInputs);
  // The first launch reduces inputs [0, 32) into out; each later one reduces out and the
  // next 31 inputs into out, so the order stays ((x0 op x1) op ...) op x_{n-1}.
  for (int p = 0; p < n;) {
    in.clear();
    if (p > 0) in.push_back(o);
    while (p < n && static_cast<int>(in.size()) < cuda::kReduceMaxInputs)
      in.push_back(static_cast<const T*>(inputs[p++]) + offset);
    cuda::launch_reduce_inputs<T>(o, in.data(), static_cast<int>(in.size()), count, max,
                                  cudaStreamPerThread);
  }
}

}  // namespace

BufferPlace locate_buffer(const void* p) {
  if (p == nullptr) return {};
  static const bool have_gpu = cuda_available();
  if (!have_gpu) return {BufferPlace::Kind::host, -1};
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return {BufferPlace::Kind::host, -1};
  }
  if (attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged)
    return {BufferPlace::Kind::device, attributes.device};
  return {BufferPlace::Kind::host, -1};  // pageable or pinned host memory
}

void device_copy_async(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  BufferPlace where = locate_buffer(dst);
  if (where.kind != BufferPlace::Kind::device) where = locate_buffer(src);
  FM_CHECK(where.kind == BufferPlace::Kind::device,
           "inprocess device copy: neither buffer is device memory");
  DeviceScope scope(where.device);
  note_pending(where.device);
  FM_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, cudaStreamPerThread));
}

void device_reduce_async(void* out, const void* const* inputs, int n_inputs, int64_t offset,
                         int64_t count, DType dtype, ReduceOp op) {
  if (count <= 0 || n_inputs <= 0) return;
  const BufferPlace where = locate_buffer(out);
  FM_CHECK(where.kind == BufferPlace::Kind::device,
           "inprocess device reduction: the output is not device memory");
  DeviceScope scope(where.device);
  note_pending(where.device);
  const bool max = op == ReduceOp::max;
  switch (dtype) {
    case DType::f32:
      return reduce_chained<float>(out, inputs, n_inputs, offset, count, max);
    case DType::f64:
      return reduce_chained<double>(out, inputs, n_inputs, offset, count, max);
    case DType::i32:
      return reduce_chained<int32_t>(out, inputs, n_inputs, offset, count, max);
    case DType::i64:
      return reduce_chained<int64_t>(out, inputs, n_inputs, offset, count, max);
    default:
      throw Error(check_reduce_dtype(dtype));
  }
}

void device_sync() {
  std::vector<int> devices;
  devices.swap(pending_devices);
  for (int device : devices) {
    DeviceScope scope(device);
    FM_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
  }
}

void* device_alloc(size_t bytes, int device) {
  DeviceScope scope(device);
  void* p = nullptr;
  FM_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 1)));
  return p;
}

void device_free(void* p, int device) noexcept {
  if (p == nullptr) return;
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return;
  cudaSetDevice(device);
  cudaFree(p);
  cudaSetDevice(previous);
}

}  // namespace fm
