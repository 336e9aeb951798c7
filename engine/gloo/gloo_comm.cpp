// The Gloo communicator: one process per rank, host buffers, Gloo's TCP transport.
//
// Setup. Gloo's rendezvous (gloo::rendezvous::Context::connectFullMesh) runs over our store
// through GlooStore (keys under "gloo/"), on a TCP device bound to this host's address on the
// interface toward the store (loopback when the store is on 127.0.0.1). A Gloo barrier ends the
// setup, so no rank returns while a peer still reads the store that rank 0 serves.
//
// Calls. Collectives use Gloo's algorithms with the communicator's timeout and a fresh tag per
// call (every rank counts its collectives alike): allreduce (ring), allgather, broadcast,
// alltoallv, barrier. reduce_scatter is an allreduce of a copy of the whole send buffer and a
// slice of it (Gloo's ReduceScatterHalvingDoubling is the old algorithm API with its own
// buffer layout; the copy costs size() times the traffic of a true reduce-scatter).
// all_to_all first all-gathers every rank's send and recv counts, so every rank sees the same
// mismatch and throws it before any data moves. send/recv are Gloo unbound buffers on slot
// (kPointToPointSlotPrefix, tag); a send returns once the peer has received the data.
//
// Failure. A Gloo error (timeout, a peer that closed its connection) or bad arguments end the
// call with an fm::Error naming the collective, this rank and the timeout; the communicator is
// then broken and every later call throws GroupAbortedError at once.
#include <fmt/format.h>
#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/alltoallv.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>
#include <gloo/types.h>

#include <cstring>
#include <type_traits>

#include "engine/comm.h"
#include "engine/error.h"
#include "engine/src/inprocess_comm.h"
#include "engine/src/process_group_backends.h"

namespace fm {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// Gloo's collectives use slot prefixes 0x01..0x08; point-to-point messages use their own.
constexpr uint8_t kPointToPointSlotPrefix = 0x40;

// gloo::rendezvous::Store over our StoreClient. Waits are bounded by the group's timeout.
class GlooStore final : public gloo::rendezvous::Store {
 public:
  GlooStore(StoreClient& store, milliseconds timeout) : store_(store), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    store_.set(kPrefix + key, std::string(data.begin(), data.end()));
  }
  std::vector<char> get(const std::string& key) override {
    const std::string value = store_.get(kPrefix + key, timeout_);
    return std::vector<char>(value.begin(), value.end());
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const milliseconds& timeout) override {
    std::vector<std::string> prefixed;
    prefixed.reserve(keys.size());
    for (const auto& key : keys) prefixed.push_back(kPrefix + key);
    const milliseconds bound = timeout.count() > 0 ? std::min(timeout, timeout_) : timeout_;
    store_.wait(prefixed, bound);
  }

 private:
  static inline const std::string kPrefix = "gloo/";
  StoreClient& store_;
  milliseconds timeout_;
};

// Gloo reduction functions: out[i] = a[i] op b[i]. Integer sums wrap (two's complement).
template <class T>
void reduce_sum(void* out, const void* a, const void* b, size_t n) {
  auto* o = static_cast<T*>(out);
  const auto* x = static_cast<const T*>(a);
  const auto* y = static_cast<const T*>(b);
  if constexpr (std::is_integral_v<T>) {
    using U = std::make_unsigned_t<T>;
    for (size_t i = 0; i < n; ++i)
      o[i] = static_cast<T>(static_cast<U>(x[i]) + static_cast<U>(y[i]));
  } else {
    for (size_t i = 0; i < n; ++i) o[i] = x[i] + y[i];
  }
}
template <class T>
void reduce_max(void* out, const void* a, const void* b, size_t n) {
  auto* o = static_cast<T*>(out);
  const auto* x = static_cast<const T*>(a);
  const auto* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; ++i) o[i] = y[i] > x[i] ? y[i] : x[i];
}

template <class T>
void gloo_allreduce(const std::shared_ptr<gloo::Context>& context, void* data, int64_t count,
                    ReduceOp op, uint32_t tag, milliseconds timeout) {
  gloo::AllreduceOptions opts(context);
  opts.setOutput(static_cast<T*>(data), static_cast<size_t>(count));  // in place
  opts.setReduceFunction(op == ReduceOp::sum ? &reduce_sum<T> : &reduce_max<T>);
  opts.setTag(tag);
  opts.setTimeout(timeout);
  gloo::allreduce(opts);
}

class GlooCommunicator final : public Communicator {
 public:
  explicit GlooCommunicator(ProcessGroupRendezvous rv)
      : Communicator(rv.timeout),
        rank_(rv.env.rank),
        size_(rv.env.world_size),
        server_(std::move(rv.server)),
        store_(std::move(rv.store)) {
    guarded("setup", [&] {
      gloo::transport::tcp::attr attr;
      attr.hostname = rv.local_address;
      auto device = gloo::transport::tcp::CreateDevice(attr);
      auto context = std::make_shared<gloo::rendezvous::Context>(rank_, size_);
      context->setTimeout(timeout());
      GlooStore store(*store_, timeout());
      context->connectFullMesh(store, device);
      context_ = context;
      barrier_now();
    });
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend_name() const override { return "gloo"; }

  void all_reduce(void* data, int64_t count, DType dtype, ReduceOp op) override {
    guarded("all_reduce", [&] {
      check_args(check_reduce_dtype(dtype));
      check_args(check_buffer("data", data, count));
      if (count == 0) return;
      all_reduce_now(data, count, dtype, op);
    });
  }

  void all_gather(const void* send, void* recv, int64_t count, DType dtype) override {
    guarded("all_gather", [&] {
      check_args(check_buffer("send", send, count));
      check_args(check_buffer("recv", recv, count * size_));
      const size_t bytes = static_cast<size_t>(count) * dtype_size(dtype);
      if (bytes == 0) return;
      gloo::AllgatherOptions opts(context_);
      opts.setInput(static_cast<char*>(const_cast<void*>(send)), bytes);
      opts.setOutput(static_cast<char*>(recv), bytes * size_);
      opts.setTag(next_tag());
      opts.setTimeout(timeout());
      gloo::allgather(opts);
    });
  }

  void reduce_scatter(const void* send, void* recv, int64_t count, DType dtype,
                      ReduceOp op) override {
    guarded("reduce_scatter", [&] {
      check_args(check_reduce_dtype(dtype));
      check_args(check_buffer("send", send, count * size_));
      check_args(check_buffer("recv", recv, count));
      if (count == 0) return;
      const size_t esize = dtype_size(dtype);
      std::vector<uint64_t> all((count * size_ * esize + 7) / 8);  // 8-byte aligned
      std::memcpy(all.data(), send, count * size_ * esize);
      all_reduce_now(all.data(), count * size_, dtype, op);
      std::memcpy(recv, reinterpret_cast<const char*>(all.data()) + rank_ * count * esize,
                  count * esize);
    });
  }

  void broadcast(void* data, int64_t count, DType dtype, int root) override {
    guarded("broadcast", [&] {
      check_args(check_rank_arg("root", root, size_));
      check_args(check_buffer("data", data, count));
      const size_t bytes = static_cast<size_t>(count) * dtype_size(dtype);
      if (bytes == 0) return;
      gloo::BroadcastOptions opts(context_);
      if (rank_ == root) opts.setInput(static_cast<char*>(data), bytes);
      opts.setOutput(static_cast<char*>(data), bytes);
      opts.setRoot(root);
      opts.setTag(next_tag());
      opts.setTimeout(timeout());
      gloo::broadcast(opts);
    });
  }

  void all_to_all(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                  const std::vector<int64_t>& recv_counts, DType dtype) override {
    guarded("all_to_all", [&] {
      int64_t send_total = 0, recv_total = 0;
      check_args(check_all_to_all_args(send, send_counts, recv, recv_counts, size_, send_total,
                                       recv_total));

      // Every rank's counts, so that every rank sees the same mismatch.
      std::vector<int64_t> mine(send_counts);
      mine.insert(mine.end(), recv_counts.begin(), recv_counts.end());
      std::vector<int64_t> all(mine.size() * size_);
      gloo::AllgatherOptions counts(context_);
      counts.setInput(mine.data(), mine.size());
      counts.setOutput(all.data(), all.size());
      counts.setTag(next_tag());
      counts.setTimeout(timeout());
      gloo::allgather(counts);
      std::vector<int64_t> sends(static_cast<size_t>(size_) * size_), recvs(sends.size());
      for (int r = 0; r < size_; ++r) {
        for (int p = 0; p < size_; ++p) {
          sends[r * size_ + p] = all[r * 2 * size_ + p];
          recvs[r * size_ + p] = all[r * 2 * size_ + size_ + p];
        }
      }
      if (std::string bad = all_to_all_count_mismatch(size_, sends, recvs); !bad.empty())
        throw Error(bad);

      const auto esize = static_cast<int64_t>(dtype_size(dtype));
      std::vector<int64_t> send_bytes(size_), recv_bytes(size_);
      for (int p = 0; p < size_; ++p) {
        send_bytes[p] = send_counts[p] * esize;
        recv_bytes[p] = recv_counts[p] * esize;
      }
      char dummy[1] = {};  // Gloo wants a buffer even for nothing
      gloo::AlltoallvOptions opts(context_);
      opts.setInput(send_total > 0 ? static_cast<char*>(const_cast<void*>(send)) : dummy,
                    send_bytes);
      opts.setOutput(recv_total > 0 ? static_cast<char*>(recv) : dummy, recv_bytes);
      opts.setTag(next_tag());
      opts.setTimeout(timeout());
      gloo::alltoallv(opts);
    });
  }

  void send(const void* data, int64_t count, DType dtype, int peer, int tag) override {
    guarded(
        "send",
        [&] {
          check_point_to_point(data, count, peer);
          const size_t bytes = static_cast<size_t>(count) * dtype_size(dtype);
          char dummy[1] = {};
          auto buffer = context_->createUnboundBuffer(
              bytes > 0 ? const_cast<void*>(data) : static_cast<void*>(dummy), bytes);
          buffer->send(peer, p2p_slot(tag), 0, bytes);
          if (!buffer->waitSend(timeout()))
            throw Error(fmt::format("send to rank {} (tag {}) was aborted", peer, tag));
        },
        peer);
  }

  void recv(void* data, int64_t count, DType dtype, int peer, int tag) override {
    guarded(
        "recv",
        [&] {
          check_point_to_point(data, count, peer);
          const size_t bytes = static_cast<size_t>(count) * dtype_size(dtype);
          char dummy[1] = {};
          auto buffer =
              context_->createUnboundBuffer(bytes > 0 ? data : static_cast<void*>(dummy), bytes);
          buffer->recv(peer, p2p_slot(tag), 0, bytes);
          if (!buffer->waitRecv(timeout()))
            throw Error(fmt::format("recv from rank {} (tag {}) was aborted", peer, tag));
        },
        peer);
  }

  void barrier() override {
    guarded("barrier", [&] { barrier_now(); });
  }

 private:
  // Runs fn; any error breaks the communicator and is rethrown as an fm::Error naming the call.
  template <class Fn>
  void guarded(const char* what, const Fn& fn, int peer = -1) {
    const std::string where = peer >= 0 ? fmt::format(" with rank {}", peer) : "";
    run_comm_call(broken_, {"gloo", what, rank_, size_, where, timeout()}, fn, [] {});
  }
  static void check_args(const std::string& bad) {
    if (!bad.empty()) throw Error(bad);
  }
  void check_point_to_point(const void* data, int64_t count, int peer) const {
    check_args(check_rank_arg("peer", peer, size_));
    if (peer == rank_) throw Error(fmt::format("peer {} is this rank", peer));
    check_args(check_buffer("data", data, count));
  }
  uint32_t next_tag() { return next_tag_++; }
  static uint64_t p2p_slot(int tag) {
    return gloo::Slot::build(kPointToPointSlotPrefix, static_cast<uint32_t>(tag));
  }
  void barrier_now() {
    gloo::BarrierOptions opts(context_);
    opts.setTag(next_tag());
    opts.setTimeout(timeout());
    gloo::barrier(opts);
  }
  void all_reduce_now(void* data, int64_t count, DType dtype, ReduceOp op) {
    const uint32_t tag = next_tag();
    switch (dtype) {
      case DType::f32:
        return gloo_allreduce<float>(context_, data, count, op, tag, timeout());
      case DType::f64:
        return gloo_allreduce<double>(context_, data, count, op, tag, timeout());
      case DType::i32:
        return gloo_allreduce<int32_t>(context_, data, count, op, tag, timeout());
      case DType::i64:
        return gloo_allreduce<int64_t>(context_, data, count, op, tag, timeout());
      default:
        throw Error(check_reduce_dtype(dtype));
    }
  }

  const int rank_, size_;
  std::unique_ptr<StoreServer> server_;  // rank 0: the store the group met at
  std::unique_ptr<StoreClient> store_;
  std::shared_ptr<gloo::Context> context_;
  uint32_t next_tag_ = 0;
  std::string broken_;  // the first error; non-empty = broken
};

}  // namespace

std::unique_ptr<Communicator> make_gloo_communicator(ProcessGroupRendezvous rendezvous) {
  return std::make_unique<GlooCommunicator>(std::move(rendezvous));
}

}  // namespace fm
