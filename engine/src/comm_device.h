// Private to engine/: the device side of the in-process communicator (inprocess_comm.cpp), so
// that several virtual ranks (threads) sharing one GPU exchange device buffers directly.
//
// Where a buffer lives is read from the pointer itself (CUDA's unified addressing): a build
// without CUDA, or a machine without a visible GPU, has host buffers only. Device work runs
// on the calling thread's per-thread default stream (every rank is its own thread), on the
// device of the buffer it writes; *_async calls only enqueue, device_sync() waits for all of
// this thread's enqueued work and reports any asynchronous fault.
//
// Defined in engine/cuda/comm_device.cpp (CUDA builds) or engine/cuda/no_cuda.cpp (others,
// where every device_* call throws: no device pointer can exist there).
#pragma once

#include <cstddef>
#include <cstdint>

#include "engine/comm.h"
#include "engine/dtype.h"

namespace fm {

struct BufferPlace {
  enum class Kind : uint8_t { none, host, device };  // none: a null pointer (no elements)
  Kind kind = Kind::none;
  int device = -1;  // the CUDA device index of a device buffer

  bool operator==(const BufferPlace&) const = default;
};

BufferPlace locate_buffer(const void* p);

// dst <- src, `bytes` bytes; either side may be host or device memory.
void device_copy_async(void* dst, const void* src, size_t bytes);
// out[i] = inputs[0][offset + i] op inputs[1][offset + i] op ... op inputs[n - 1][offset + i]
// for i in [0, count), in input order (so results are bit-identical to the host reduction of
// inputs in the same order); every pointer is device memory of out's device. Integer sums
// wrap. dtype f32, f64, i32 or i64.
void device_reduce_async(void* out, const void* const* inputs, int n_inputs, int64_t offset,
                         int64_t count, DType dtype, ReduceOp op);
void device_sync();
void* device_alloc(size_t bytes, int device);
void device_free(void* p, int device) noexcept;

}  // namespace fm
