// Argument and index checks shared by the CUDA backend's op families
// (backend_attention.cpp, backend_routing.cpp). Index tensors live on the
// device, so a range check is a kernel (launch_find_bad_id) plus one small
// read back and one stream sync per op; the bad value itself is read only on
// the error path. Messages are the CPU backend's, prefixed "CUDA backend:".
// Host compiler only.
#pragma once

#include <initializer_list>
#include <vector>

#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/routing_kernels.h"

namespace fm::cuda {

// bf16 reaches the checks only on an op's native bf16 path (the others widen it first).
inline void check_float(const Tensor& t, int rank, const char* op, const char* name) {
  FM_CHECK((t.dtype() == DType::f32 || t.dtype() == DType::f64 || t.dtype() == DType::bf16) &&
               t.rank() == rank,
           "CUDA backend: {}: {} must be an f32, f64 or bf16 tensor of rank {} but is {}", op, name,
           rank, t.describe());
}

// The device int64 status words of `status`, on the host: one copy, one sync.
inline std::vector<int64_t> read_status(cudaStream_t stream, const Tensor& status) {
  std::vector<int64_t> host(static_cast<size_t>(status.numel()));
  FM_CUDA_CHECK(cudaMemcpyAsync(host.data(), status.raw(), sizeof(int64_t) * host.size(),
                                cudaMemcpyDeviceToHost, stream));
  FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host;
}

// ids[i], one element read back (error path only).
inline int32_t read_id(cudaStream_t stream, const Tensor& ids, int64_t i) {
  int32_t value = 0;
  FM_CUDA_CHECK(
      cudaMemcpyAsync(&value, ptr<int32_t>(ids) + i, sizeof value, cudaMemcpyDeviceToHost, stream));
  FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  return value;
}

// Throws the CPU's message (ArgCheck::ids_below) when `bad`, a launch_find_bad_id result,
// names a position of ids (not ids.numel()).
inline void throw_if_bad_id(cudaStream_t stream, int64_t bad, const char* op, const char* name,
                            const Tensor& ids, int64_t bound) {
  if (bad == ids.numel()) return;
  throw Error(fmt::format("CUDA backend: {}: {}[{}] = {} is out of range [0, {})", op, name, bad,
                          read_id(stream, ids, bad), bound));
}

// One index tensor whose entries must lie in [0, bound).
struct IndexCheck {
  const char* name;
  const Tensor* ids;  // i32, on the device
  int64_t bound;
};

// Every entry of every tensor in its range: one kernel per tensor, one read back and one
// sync for all of them; throws for the first tensor (in list order) with a bad entry. Nothing
// while the backend's device index checks are off (Backend::set_device_index_checks).
inline void check_indices(Backend& backend, cudaStream_t stream, const char* op,
                          std::initializer_list<IndexCheck> checks) {
  if (!backend.device_index_checks()) return;
  Tensor status = backend.empty({static_cast<int64_t>(checks.size())}, DType::i64);
  int64_t k = 0;
  for (const IndexCheck& c : checks)
    launch_find_bad_id(ptr<int64_t>(status) + k++, ptr<int32_t>(*c.ids), c.ids->numel(), c.bound,
                       stream);
  const std::vector<int64_t> bad = read_status(stream, status);
  k = 0;
  for (const IndexCheck& c : checks)
    throw_if_bad_id(stream, bad[static_cast<size_t>(k++)], op, c.name, *c.ids, c.bound);
}

}  // namespace fm::cuda
