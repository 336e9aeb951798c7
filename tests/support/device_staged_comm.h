// DeviceStaged: a Communicator that runs another one on device buffers. Every call's buffers
// are copied to device memory (current contents included, so elements a collective must leave
// alone are checked too), the wrapped communicator is called with the device pointers, and the
// outputs are copied back: the conformance checks (support/comm_conformance.h), written on host
// vectors, then exercise a communicator's device path. Needs a visible CUDA device.
#pragma once

#include <memory>
#include <vector>

#include "engine/backend.h"
#include "engine/comm.h"
#include "engine/tensor.h"

namespace fm::testing {

// Forwards to `inner`; this rank's own CUDA backend (device 0) stages the buffers.
class DeviceStaged final : public Communicator {
 public:
  explicit DeviceStaged(Communicator& inner)
      : Communicator(inner.timeout()), inner_(inner), gpu_(make_cuda_backend(0)) {}

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  const char* backend_name() const override { return "inprocess (device buffers)"; }

  void all_reduce(void* data, int64_t count, DType dtype, ReduceOp op) override {
    Tensor d = up(data, count, dtype);
    inner_.all_reduce(ptr(d, count), count, dtype, op);
    down(data, d, count);
  }
  void all_gather(const void* send, void* recv, int64_t count, DType dtype) override {
    Tensor s = up(send, count, dtype), r = up(recv, count * size(), dtype);
    inner_.all_gather(ptr(s, count), ptr(r, count * size()), count, dtype);
    down(recv, r, count * size());
  }
  void reduce_scatter(const void* send, void* recv, int64_t count, DType dtype,
                      ReduceOp op) override {
    Tensor s = up(send, count * size(), dtype), r = up(recv, count, dtype);
    inner_.reduce_scatter(ptr(s, count * size()), ptr(r, count), count, dtype, op);
    down(recv, r, count);
  }
  void broadcast(void* data, int64_t count, DType dtype, int root) override {
    Tensor d = up(data, count, dtype);
    inner_.broadcast(ptr(d, count), count, dtype, root);
    down(data, d, count);
  }
  void all_to_all(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                  const std::vector<int64_t>& recv_counts, DType dtype) override {
    const int64_t n_send = total(send_counts), n_recv = total(recv_counts);
    Tensor s = up(send, n_send, dtype), r = up(recv, n_recv, dtype);
    inner_.all_to_all(ptr(s, n_send), send_counts, ptr(r, n_recv), recv_counts, dtype);
    down(recv, r, n_recv);
  }
  void send(const void* data, int64_t count, DType dtype, int peer, int tag) override {
    Tensor d = up(data, count, dtype);
    inner_.send(ptr(d, count), count, dtype, peer, tag);
  }
  void recv(void* data, int64_t count, DType dtype, int peer, int tag) override {
    Tensor d = up(data, count, dtype);
    inner_.recv(ptr(d, count), count, dtype, peer, tag);
    down(data, d, count);
  }
  void barrier() override { inner_.barrier(); }

 private:
  static int64_t total(const std::vector<int64_t>& counts) {
    int64_t n = 0;
    for (int64_t c : counts) n += c;
    return n;
  }
  static void* ptr(Tensor& t, int64_t count) { return count > 0 ? t.raw() : nullptr; }
  // A device copy of `count` host elements (its current contents, so elements a collective
  // must leave alone are checked too); one element when count is 0.
  Tensor up(const void* host, int64_t count, DType dtype) {
    Tensor d = gpu_->empty({count > 0 ? count : 1}, dtype);
    if (count > 0) {
      gpu_->copy(d, Tensor::view(const_cast<void*>(host), {count}, dtype));
      gpu_->synchronize();  // the communicator reads device buffers once they are ready
    }
    return d;
  }
  void down(void* host, const Tensor& d, int64_t count) {
    if (count <= 0) return;
    Tensor h = Tensor::view(host, {count}, d.dtype());  // a view: writes land in `host`
    gpu_->copy(h, d);
    gpu_->synchronize();
  }

  Communicator& inner_;
  std::unique_ptr<Backend> gpu_;
};

}  // namespace fm::testing
