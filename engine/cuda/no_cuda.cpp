// Built when the CUDA toolkit is absent: the CUDA backend entry points say so.
#include <fmt/format.h>

#include "engine/backend.h"
#include "engine/error.h"
#include "engine/src/comm_device.h"

namespace fm {

std::unique_ptr<Backend> make_cuda_backend(int /*device_index*/) {
  throw Error("this foremoe build has no CUDA backend (configured without a CUDA toolkit)");
}

bool cuda_available() {
  return false;
}
int cuda_device_count() {
  return 0;
}

CacheStats cuda_memory_stats() {
  return {};
}
void reset_cuda_memory_peak() {}

void set_cuda_dense_gemm(Backend&, CudaDenseGemm) {
  throw Error("set_cuda_dense_gemm: this foremoe build has no CUDA backend");
}
void set_cuda_grouped_wgrad(Backend&, CudaGroupedWgrad) {
  throw Error("set_cuda_grouped_wgrad: this foremoe build has no CUDA backend");
}
CudaGemmStats cuda_gemm_stats(const Backend&) {
  throw Error("cuda_gemm_stats: this foremoe build has no CUDA backend");
}
void set_cuda_attention(Backend&, CudaAttention) {
  throw Error("set_cuda_attention: this foremoe build has no CUDA backend");
}
bool cuda_has_cudnn() {
  return false;
}
CudaAttentionStats cuda_attention_stats(const Backend&) {
  throw Error("cuda_attention_stats: this foremoe build has no CUDA backend");
}
int64_t cuda_staged_uploads(const Backend&) {
  throw Error("cuda_staged_uploads: this foremoe build has no CUDA backend");
}

// Without CUDA every pointer is host memory, so the in-process communicator never calls the
// device_* functions; they throw should that change.
BufferPlace locate_buffer(const void* p) {
  return p == nullptr ? BufferPlace{} : BufferPlace{BufferPlace::Kind::host, -1};
}

namespace {
[[noreturn]] void no_device(const char* what) {
  throw Error(fmt::format("{}: this foremoe build has no CUDA (no device memory exists)", what));
}
}  // namespace

void device_copy_async(void*, const void*, size_t) {
  no_device("device_copy_async");
}
void device_reduce_async(void*, const void* const*, int, int64_t, int64_t, DType, ReduceOp) {
  no_device("device_reduce_async");
}
void device_sync() {}
void* device_alloc(size_t, int) {
  no_device("device_alloc");
}
void device_free(void*, int) noexcept {}

}  // namespace fm
