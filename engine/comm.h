// Communicator: the collectives of the distributed runtime behind one interface.
//
// Implementations (see ../shared/design/DESIGN.md, "Distributed runtime"):
//   inprocess  ranks are threads of one process (tests, the CPU demo, several virtual ranks
//              on one GPU): make_inprocess_group()
//   gloo       CPU, one process per rank, TCP; built when Debian's libgloo-dev is installed
//   nccl       GPU, one process per rank; built whenever CUDA is
//
// Buffers are raw pointers to `count` elements of `dtype` in the memory the implementation
// works on: host for gloo, device for nccl, either for inprocess (host memory, or in CUDA
// builds device memory -- several virtual ranks sharing a GPU -- as long as every rank of a
// collective passes the same kind; device buffers must be ready when the call is made, i.e.
// the stream that wrote them synchronized). Every call blocks until this
// rank's part is done, and every call is bounded by the communicator's timeout: a peer that
// never arrives (dead, hung, or calling a different collective) ends the call with an
// fm::Error naming the collective, this rank, the peer(s) waited for and the timeout, never
// a hang. After such an error the communicator is broken: every later call throws at once.
//
// Ordering: all ranks call the collectives in the same order (as with MPI/NCCL). send/recv
// pair up by (peer, tag) in call order.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/dtype.h"

namespace fm {

enum class ReduceOp { sum, max };
const char* reduce_op_name(ReduceOp op);

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* backend_name() const = 0;  // "inprocess", "gloo", "nccl"
  std::chrono::milliseconds timeout() const { return timeout_; }

  // In place: data[i] = op over ranks of data[i]. dtype f32, f64, i32 or i64.
  virtual void all_reduce(void* data, int64_t count, DType dtype, ReduceOp op) = 0;
  // recv[r * count + i] = rank r's send[i]; recv holds size() * count elements.
  virtual void all_gather(const void* send, void* recv, int64_t count, DType dtype) = 0;
  // send holds size() * count elements; recv[i] = op over ranks of send[rank() * count + i].
  virtual void reduce_scatter(const void* send, void* recv, int64_t count, DType dtype,
                              ReduceOp op) = 0;
  // data (count elements) from `root` to every rank.
  virtual void broadcast(void* data, int64_t count, DType dtype, int root) = 0;
  // All-to-all with per-peer counts (elements). send holds sum(send_counts) elements laid out
  // by destination rank (peer p's block starts at the prefix sum of send_counts[0..p)), recv
  // holds sum(recv_counts) laid out by source rank. recv_counts[p] must equal peer p's
  // send_counts[rank()]; a mismatch is an error (never silent corruption) where the
  // implementation can see it (inprocess and gloo check; nccl trusts the caller).
  virtual void all_to_all(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                          const std::vector<int64_t>& recv_counts, DType dtype) = 0;
  virtual void send(const void* data, int64_t count, DType dtype, int peer, int tag) = 0;
  virtual void recv(void* data, int64_t count, DType dtype, int peer, int tag) = 0;
  virtual void barrier() = 0;

 protected:
  explicit Communicator(std::chrono::milliseconds timeout) : timeout_(timeout) {}

 private:
  std::chrono::milliseconds timeout_;
};

// W communicators over one shared in-process group: give communicator r to thread r.
// A rank whose thread throws should call abort_group() (run_inprocess does) so that its
// peers fail at once instead of waiting for their timeout.
std::vector<std::unique_ptr<Communicator>> make_inprocess_group(int world_size,
                                                                std::chrono::milliseconds timeout);

// Marks the in-process group of `comm` failed: every pending and later call of every rank
// throws, naming `reason`. No-op for other implementations.
void abort_group(Communicator& comm, const std::string& reason);

// Runs fn(rank, comm) on world_size threads of an in-process group and rethrows the first
// exception (by rank order) after all threads have ended; a throwing rank aborts the group.
void run_inprocess(int world_size, std::chrono::milliseconds timeout,
                   const std::function<void(int rank, Communicator& comm)>& fn);

}  // namespace fm
