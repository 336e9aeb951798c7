// The NCCL communicator: one process per rank, device buffers, one CUDA stream it owns.
//
// Setup. The device is env.local_rank modulo the visible devices. Rank 0 draws the NCCL unique
// id and publishes it in the store ("nccl/unique_id"); the others read it within the timeout.
// The communicator is initialised non-blocking (ncclConfig_t::blocking = 0) and polled with
// ncclCommGetAsyncError until it is ready or the deadline passes (then ncclCommAbort).
//
// Calls. Each call enqueues its NCCL operation(s) on the stream (all_to_all: one group of
// ncclSend/ncclRecv per peer with a non-zero count; barrier: a 1-element all-reduce) and then
// waits for the stream by polling cudaStreamQuery and ncclCommGetAsyncError until the call's
// deadline (start + timeout): a peer that never arrives ends the call with an fm::Error and an
// aborted communicator, never a hang. Byte-moving calls pass ncclUint8, so any dtype works.
//
// Host buffers. NCCL moves device memory only, and the trainers' own collectives (metrics,
// expert loads, plans) pass host vectors: a host buffer goes through a device staging buffer
// of this communicator (grown as needed, kept): copied in before the NCCL call is enqueued and
// out once the stream has finished (a synchronous copy of an idle stream, so the timeout
// still bounds every wait for the peers). Where a buffer lives is read from the pointer
// (comm_device.h locate_buffer).
//
// Limits. NCCL pairs send/recv per peer in call order and has no tags: a rank must receive a
// peer's messages in the order they were sent (tags are checked for range only). all_to_all
// trusts the caller's recv_counts (checking them would cost a collective per call).
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>

#include <cstring>
#include <thread>

#include "engine/comm.h"
#include "engine/cuda/check.h"
#include "engine/error.h"
#include "engine/src/comm_device.h"
#include "engine/src/inprocess_comm.h"
#include "engine/src/process_group_backends.h"

namespace fm {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

[[noreturn]] void throw_nccl_error(ncclResult_t result, const char* call, const char* file,
                                   int line) {
  throw Error(fmt::format("{}:{}: {} failed: {} ({})", file, line, call, static_cast<int>(result),
                          ncclGetErrorString(result)));
}

// NCCL calls of a non-blocking communicator may answer ncclInProgress: that is not a failure.
#define FM_NCCL_CHECK(call)                                        \
  do {                                                             \
    const ncclResult_t fm_nccl_r_ = (call);                        \
    if (fm_nccl_r_ != ncclSuccess && fm_nccl_r_ != ncclInProgress) \
      throw_nccl_error(fm_nccl_r_, #call, __FILE__, __LINE__);     \
  } while (0)

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return ncclFloat32;
    case DType::f64:
      return ncclFloat64;
    case DType::i32:
      return ncclInt32;
    case DType::i64:
      return ncclInt64;
    default:
      throw Error(check_reduce_dtype(dtype));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  return op == ReduceOp::sum ? ncclSum : ncclMax;
}

class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(ProcessGroupRendezvous rv)
      : Communicator(rv.timeout),
        rank_(rv.env.rank),
        size_(rv.env.world_size),
        server_(std::move(rv.server)),
        store_(std::move(rv.store)) {
    const auto start = Clock::now();
    guarded("setup", [&] {
      int devices = 0;
      FM_CUDA_CHECK(cudaGetDeviceCount(&devices));
      if (devices <= 0) throw Error("no CUDA device is visible");
      device_ = rv.env.local_rank % devices;
      FM_CUDA_CHECK(cudaSetDevice(device_));

      ncclUniqueId id;
      if (rank_ == 0) {
        FM_NCCL_CHECK(ncclGetUniqueId(&id));
        store_->set("nccl/unique_id", std::string(id.internal, sizeof id.internal));
      } else {
        const std::string bytes = store_->get("nccl/unique_id", timeout());
        if (bytes.size() != sizeof id.internal)
          throw Error(fmt::format("the store's nccl/unique_id has {} bytes, expected {}",
                                  bytes.size(), sizeof id.internal));
        std::memcpy(id.internal, bytes.data(), sizeof id.internal);
      }
      ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
      config.blocking = 0;
      FM_NCCL_CHECK(ncclCommInitRankConfig(&comm_, size_, id, rank_, &config));
      wait_comm_ready("ncclCommInitRankConfig", start + timeout());
      FM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      FM_CUDA_CHECK(cudaMalloc(&scratch_, sizeof(int32_t)));
    });
  }

  ~NcclCommunicator() override {
    if (comm_) {
      if (broken_.empty()) {
        ncclCommFinalize(comm_);
        wait_comm_quiet(Clock::now() + timeout());
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
    }
    if (scratch_) cudaFree(scratch_);
    if (stage_) cudaFree(stage_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend_name() const override { return "nccl"; }

  void all_reduce(void* data, int64_t count, DType dtype, ReduceOp op) override {
    run("all_reduce", [&] {
      check_args(check_reduce_dtype(dtype));
      check_args(check_buffer("data", data, count));
      if (count == 0) return false;
      void* d = stage_in_place(data, bytes(count, dtype));
      FM_NCCL_CHECK(ncclAllReduce(d, d, static_cast<size_t>(count), nccl_type(dtype), nccl_op(op),
                                  comm_, stream_));
      return true;
    });
  }

  void all_gather(const void* send, void* recv, int64_t count, DType dtype) override {
    run("all_gather", [&] {
      check_args(check_buffer("send", send, count));
      check_args(check_buffer("recv", recv, count * size_));
      if (count == 0) return false;
      const auto [d_send, d_recv] =
          stage(send, bytes(count, dtype), recv, bytes(count * size_, dtype));
      FM_NCCL_CHECK(ncclAllGather(d_send, d_recv, bytes(count, dtype), ncclUint8, comm_, stream_));
      return true;
    });
  }

  void reduce_scatter(const void* send, void* recv, int64_t count, DType dtype,
                      ReduceOp op) override {
    run("reduce_scatter", [&] {
      check_args(check_reduce_dtype(dtype));
      check_args(check_buffer("send", send, count * size_));
      check_args(check_buffer("recv", recv, count));
      if (count == 0) return false;
      const auto [d_send, d_recv] =
          stage(send, bytes(count * size_, dtype), recv, bytes(count, dtype));
      FM_NCCL_CHECK(ncclReduceScatter(d_send, d_recv, static_cast<size_t>(count), nccl_type(dtype),
                                      nccl_op(op), comm_, stream_));
      return true;
    });
  }

  void broadcast(void* data, int64_t count, DType dtype, int root) override {
    run("broadcast", [&] {
      check_args(check_rank_arg("root", root, size_));
      check_args(check_buffer("data", data, count));
      if (count == 0) return false;
      void* d = stage_in_place(data, bytes(count, dtype));
      FM_NCCL_CHECK(ncclBroadcast(d, d, bytes(count, dtype), ncclUint8, root, comm_, stream_));
      return true;
    });
  }

  void all_to_all(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                  const std::vector<int64_t>& recv_counts, DType dtype) override {
    run("all_to_all", [&] {
      int64_t send_total = 0, recv_total = 0;
      check_args(check_all_to_all_args(send, send_counts, recv, recv_counts, size_, send_total,
                                       recv_total));
      if (send_total == 0 && recv_total == 0) return false;
      const size_t esize = dtype_size(dtype);
      const auto [d_send, d_recv] =
          stage(send, bytes(send_total, dtype), recv, bytes(recv_total, dtype));
      const auto* src = static_cast<const char*>(d_send);
      auto* dst = static_cast<char*>(d_recv);
      FM_NCCL_CHECK(ncclGroupStart());
      size_t send_at = 0, recv_at = 0;
      for (int p = 0; p < size_; ++p) {
        const size_t send_bytes = static_cast<size_t>(send_counts[p]) * esize;
        const size_t recv_bytes = static_cast<size_t>(recv_counts[p]) * esize;
        if (send_bytes > 0)
          FM_NCCL_CHECK(ncclSend(src + send_at, send_bytes, ncclUint8, p, comm_, stream_));
        if (recv_bytes > 0)
          FM_NCCL_CHECK(ncclRecv(dst + recv_at, recv_bytes, ncclUint8, p, comm_, stream_));
        send_at += send_bytes;
        recv_at += recv_bytes;
      }
      FM_NCCL_CHECK(ncclGroupEnd());
      return true;
    });
  }

  void send(const void* data, int64_t count, DType dtype, int peer, int /*tag*/) override {
    run("send", [&] {
      check_point_to_point(data, count, peer);
      if (count == 0) return false;
      const void* d = stage(data, bytes(count, dtype), nullptr, 0).send;
      FM_NCCL_CHECK(ncclSend(d, bytes(count, dtype), ncclUint8, peer, comm_, stream_));
      return true;
    });
  }

  void recv(void* data, int64_t count, DType dtype, int peer, int /*tag*/) override {
    run("recv", [&] {
      check_point_to_point(data, count, peer);
      if (count == 0) return false;
      void* d = stage(nullptr, 0, data, bytes(count, dtype)).recv;
      FM_NCCL_CHECK(ncclRecv(d, bytes(count, dtype), ncclUint8, peer, comm_, stream_));
      return true;
    });
  }

  void barrier() override {
    run("barrier", [&] {
      FM_NCCL_CHECK(ncclAllReduce(scratch_, scratch_, 1, ncclInt32, ncclSum, comm_, stream_));
      return true;
    });
  }

 private:
  // Runs fn (which enqueues work and returns whether it did) and waits for the stream, all
  // within the timeout; any error aborts and breaks the communicator.
  template <class Fn>
  void run(const char* what, const Fn& fn) {
    const auto start = Clock::now();
    guarded(what, [&] {
      FM_CUDA_CHECK(cudaSetDevice(device_));
      copy_out_ = {};
      const bool enqueued = fn();
      wait_comm_ready(what, start + timeout());  // a non-blocking enqueue may still be running
      if (enqueued) wait_stream(what, start + timeout());
      if (copy_out_.bytes > 0)  // the stream is idle: this copy waits for no peer
        FM_CUDA_CHECK(
            cudaMemcpy(copy_out_.host, copy_out_.device, copy_out_.bytes, cudaMemcpyDeviceToHost));
    });
  }

  static size_t bytes(int64_t count, DType dtype) {
    return static_cast<size_t>(count) * dtype_size(dtype);
  }
  static bool on_host(const void* p) {
    return p != nullptr && locate_buffer(p).kind != BufferPlace::Kind::device;
  }

  // The device pointers a call passes to NCCL for its send buffer (send_bytes, read) and recv
  // buffer (recv_bytes, written): the buffers themselves when they are device memory, else
  // regions of stage_ (send: filled now; recv: copied back to the host buffer by run()).
  struct DevicePointers {
    const void* send;
    void* recv;
  };
  DevicePointers stage(const void* send, size_t send_bytes, void* recv, size_t recv_bytes) {
    const bool host_send = on_host(send), host_recv = on_host(recv);
    const size_t send_at = 0, recv_at = host_send ? round_up(send_bytes) : 0;
    reserve_stage(recv_at + (host_recv ? recv_bytes : 0));
    DevicePointers d{send, recv};
    if (host_send) {
      FM_CUDA_CHECK(
          cudaMemcpyAsync(stage_ + send_at, send, send_bytes, cudaMemcpyHostToDevice, stream_));
      d.send = stage_ + send_at;
    }
    if (host_recv) {
      d.recv = stage_ + recv_at;
      copy_out_ = {recv, stage_ + recv_at, recv_bytes};
    }
    return d;
  }
  // An in-place call's buffer (all_reduce, broadcast).
  void* stage_in_place(void* data, size_t n) {
    if (!on_host(data)) return data;
    reserve_stage(n);
    FM_CUDA_CHECK(cudaMemcpyAsync(stage_, data, n, cudaMemcpyHostToDevice, stream_));
    copy_out_ = {data, stage_, n};
    return stage_;
  }
  static size_t round_up(size_t n) { return (n + 255) / 256 * 256; }
  // stage_ holds at least n bytes (grown in MiB steps; the stream is idle between calls).
  void reserve_stage(size_t n) {
    if (n <= stage_bytes_) return;
    if (stage_) FM_CUDA_CHECK(cudaFree(stage_));
    stage_ = nullptr;
    stage_bytes_ = 0;
    const size_t mib = size_t{1} << 20;
    const size_t want = (n + mib - 1) / mib * mib;
    void* p = nullptr;
    FM_CUDA_CHECK(cudaMalloc(&p, want));
    stage_ = static_cast<char*>(p);
    stage_bytes_ = want;
  }

  template <class Fn>
  void guarded(const char* what, const Fn& fn) {
    run_comm_call(broken_,
                  {"nccl", what, rank_, size_, fmt::format(" (device {})", device_), timeout()}, fn,
                  [this] {
                    if (comm_) ncclCommAbort(comm_);
                    comm_ = nullptr;
                  });
  }

  // Polls the communicator's asynchronous state until it is not ncclInProgress.
  void wait_comm_ready(const char* what, Clock::time_point deadline) {
    for (;;) {
      ncclResult_t state = ncclSuccess;
      FM_NCCL_CHECK(ncclCommGetAsyncError(comm_, &state));
      if (state == ncclSuccess) return;
      if (state != ncclInProgress)
        throw Error(fmt::format("{}: NCCL reports {} ({}): {}", what, static_cast<int>(state),
                                ncclGetErrorString(state), ncclGetLastError(comm_)));
      if (Clock::now() > deadline)
        throw Error(fmt::format("{}: timed out waiting for the peers (timeout {} ms)", what,
                                timeout().count()));
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }

  // Polls the stream (and NCCL's error state) until the enqueued work is done.
  void wait_stream(const char* what, Clock::time_point deadline) {
    for (int spins = 0;; ++spins) {
      const cudaError_t query = cudaStreamQuery(stream_);
      if (query == cudaSuccess) return;
      if (query != cudaErrorNotReady) FM_CUDA_CHECK(query);
      ncclResult_t state = ncclSuccess;
      FM_NCCL_CHECK(ncclCommGetAsyncError(comm_, &state));
      if (state != ncclSuccess && state != ncclInProgress)
        throw Error(fmt::format("{}: NCCL reports {} ({}): {}", what, static_cast<int>(state),
                                ncclGetErrorString(state), ncclGetLastError(comm_)));
      if (Clock::now() > deadline)
        throw Error(fmt::format(
            "{}: the stream did not finish within the timeout ({} ms): a peer never arrived", what,
            timeout().count()));
      if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  // Destructor: waits (bounded, errors ignored) for ncclCommFinalize to flush.
  void wait_comm_quiet(Clock::time_point deadline) {
    ncclResult_t state = ncclInProgress;
    while (ncclCommGetAsyncError(comm_, &state) == ncclSuccess && state == ncclInProgress &&
           Clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::microseconds(100));
  }

  static void check_args(const std::string& bad) {
    if (!bad.empty()) throw Error(bad);
  }
  void check_point_to_point(const void* data, int64_t count, int peer) const {
    check_args(check_rank_arg("peer", peer, size_));
    if (peer == rank_) throw Error(fmt::format("peer {} is this rank", peer));
    check_args(check_buffer("data", data, count));
  }

  const int rank_, size_;
  int device_ = -1;
  std::unique_ptr<StoreServer> server_;  // rank 0: the store the group met at
  std::unique_ptr<StoreClient> store_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  void* scratch_ = nullptr;  // the barrier's one int32
  char* stage_ = nullptr;    // device staging of host buffers
  size_t stage_bytes_ = 0;
  struct CopyOut {
    void* host = nullptr;
    const void* device = nullptr;
    size_t bytes = 0;
  } copy_out_;          // the current call's staged recv buffer, copied back by run()
  std::string broken_;  // the first error; non-empty = broken
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(ProcessGroupRendezvous rendezvous) {
  return std::make_unique<NcclCommunicator>(std::move(rendezvous));
}

}  // namespace fm
