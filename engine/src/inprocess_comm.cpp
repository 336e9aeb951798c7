// The in-process communicator: the ranks of a group are threads of one process sharing an
// InProcessGroup (one mutex, one condition variable).
//
// Collectives. The k-th collective call of every rank meets in slot k (each rank counts its
// calls: the generation). A rank deposits its arguments in the slot and waits until every rank
// has arrived; the last to arrive checks that the calls agree (collective, count, dtype, op,
// root, all_to_all counts), so every rank sees the same verdict. Then each rank moves data
// directly between the callers' buffers -- it writes only its own output and reads its peers'
// inputs -- and waits until every rank has finished, so that no buffer is released while a peer
// reads it. all_reduce is in place: rank r reduces its share of the elements into a scratch
// buffer of the slot, and copies the whole result into its buffer once every rank has finished
// reading. Reductions run over ranks in rank order, out = ((x_0 op x_1) op x_2) ..., so results
// are bit-identical whatever the thread timing.
//
// Memory. Buffers may be host memory or, in CUDA builds, device memory (several virtual
// ranks sharing a GPU): the place is read from each pointer (engine/src/comm_device.h). One
// call's buffers share one place, and every rank of a collective passes the same kind of
// memory (a reduction: the same device); otherwise the call fails like any disagreement.
// Device data moves with cudaMemcpy (any direction, peer included) and a rank-order
// reduction kernel on the rank thread's own stream, and each rank waits for its device work
// before it reports its share finished; all_reduce then reduces into a device scratch buffer
// the group keeps (grown, never shrunk). Results are bit-identical to the host path.
// Device buffers must be ready when the call is made (the caller synchronizes the stream
// that wrote them); the results are in place when the call returns.
//
// send/recv. send copies the data into the mailbox of (src, dst, tag) and returns; recv takes
// the oldest message of its mailbox, waiting for one until its deadline.
//
// Failure. Every wait ends at the call's deadline (start + timeout) with an error naming the
// ranks waited for. A timeout, disagreeing calls or bad arguments abort the group: waiters wake,
// and every pending and later call throws GroupAbortedError naming the first reason.
#include "engine/src/inprocess_comm.h"

#include <fmt/format.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "engine/comm.h"
#include "engine/error.h"
#include "engine/src/comm_device.h"

namespace fm {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

enum class Kind : uint8_t {
  all_reduce,
  all_gather,
  reduce_scatter,
  broadcast,
  all_to_all,
  barrier
};

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::all_reduce:
      return "all_reduce";
    case Kind::all_gather:
      return "all_gather";
    case Kind::reduce_scatter:
      return "reduce_scatter";
    case Kind::broadcast:
      return "broadcast";
    case Kind::all_to_all:
      return "all_to_all";
    case Kind::barrier:
      return "barrier";
  }
  return "?";
}

// One rank's arguments to one collective. all_reduce and broadcast pass their one buffer as
// both send and recv.
struct Call {
  Kind kind = Kind::barrier;
  const void* send = nullptr;
  void* recv = nullptr;
  int64_t count = 0;
  DType dtype = DType::f32;
  ReduceOp op = ReduceOp::sum;
  int root = 0;
  const std::vector<int64_t>* send_counts = nullptr;  // all_to_all
  const std::vector<int64_t>* recv_counts = nullptr;
  BufferPlace place{};  // where the call's buffers (those with elements) live
};

// Where the k-th collective of every rank meets.
struct Slot {
  explicit Slot(int world) : calls(world), arrived(world, 0), finished(world, 0) {}
  std::vector<Call> calls;  // by rank
  std::vector<char> arrived, finished;
  int n_arrived = 0, n_finished = 0, n_left = 0;
  std::string error;               // set by the last rank to arrive when the calls disagree
  std::string move_error;          // set by a rank whose data movement failed
  BufferPlace place;               // the ranks' common place (device: a device collective)
  std::vector<uint64_t> scratch;   // host all_reduce: the reduced elements (8-byte aligned)
  void* device_scratch = nullptr;  // device all_reduce: the group's device scratch
};

struct Message {
  std::vector<std::byte> data;
  int64_t count = 0;
  DType dtype = DType::f32;
};

std::vector<int> ranks_without(const std::vector<char>& flags) {
  std::vector<int> ranks;
  for (int r = 0; r < static_cast<int>(flags.size()); ++r)
    if (!flags[r]) ranks.push_back(r);
  return ranks;
}

int64_t sum_counts(const std::vector<int64_t>& counts, size_t end) {
  int64_t total = 0;
  for (size_t i = 0; i < end && i < counts.size(); ++i) total += counts[i];
  return total;
}

// What is wrong with one rank's arguments on their own ("" when nothing).
std::string check_call(const Call& call, int world) {
  const bool reduces = call.kind == Kind::all_reduce || call.kind == Kind::reduce_scatter;
  if (reduces) {
    if (std::string bad = check_reduce_dtype(call.dtype); !bad.empty()) return bad;
  }
  switch (call.kind) {
    case Kind::all_reduce:
      return check_buffer("data", call.recv, call.count);
    case Kind::broadcast: {
      std::string bad = check_rank_arg("root", call.root, world);
      return bad.empty() ? check_buffer("data", call.recv, call.count) : bad;
    }
    case Kind::all_gather:
    case Kind::reduce_scatter: {
      const bool gathers = call.kind == Kind::all_gather;
      const int64_t send_count = gathers ? call.count : call.count * world;
      const int64_t recv_count = gathers ? call.count * world : call.count;
      std::string bad = check_buffer("send", call.send, send_count);
      return bad.empty() ? check_buffer("recv", call.recv, recv_count) : bad;
    }
    case Kind::all_to_all: {
      std::string bad = check_all_to_all_counts(*call.send_counts, *call.recv_counts, world);
      if (bad.empty()) bad = check_buffer("send", call.send, sum_counts(*call.send_counts, world));
      if (bad.empty()) bad = check_buffer("recv", call.recv, sum_counts(*call.recv_counts, world));
      return bad;
    }
    case Kind::barrier:
      return "";
  }
  return "";
}

const char* place_name(const BufferPlace& place) {
  switch (place.kind) {
    case BufferPlace::Kind::none:
      return "no";
    case BufferPlace::Kind::host:
      return "host";
    case BufferPlace::Kind::device:
      return "device";
  }
  return "?";
}

std::string describe_place(const BufferPlace& place) {
  return place.kind == BufferPlace::Kind::device
             ? fmt::format("device memory (cuda:{})", place.device)
             : fmt::format("{} memory", place_name(place));
}

// Locates the call's buffers that hold elements into call.place; "" or what is wrong (send
// and recv in different places).
std::string locate_call(Call& call, int world) {
  int64_t send_elements = call.count, recv_elements = call.count;
  if (call.kind == Kind::all_gather) recv_elements = call.count * world;
  if (call.kind == Kind::reduce_scatter) send_elements = call.count * world;
  if (call.kind == Kind::all_to_all) {
    send_elements = sum_counts(*call.send_counts, world);
    recv_elements = sum_counts(*call.recv_counts, world);
  }
  const BufferPlace send = send_elements > 0 ? locate_buffer(call.send) : BufferPlace{};
  const BufferPlace recv =
      recv_elements > 0 && call.recv != call.send ? locate_buffer(call.recv) : BufferPlace{};
  if (send.kind != BufferPlace::Kind::none && recv.kind != BufferPlace::Kind::none && send != recv)
    return fmt::format("send is in {} and recv in {}; pass both in the same memory",
                       describe_place(send), describe_place(recv));
  call.place = send.kind != BufferPlace::Kind::none ? send : recv;
  return "";
}

// Whether the calls of all ranks to collective #id agree ("" when they do). Depends only on the
// calls, so every rank reports the same disagreement.
std::string check_calls(uint64_t id, const std::vector<Call>& calls) {
  const int world = static_cast<int>(calls.size());
  const Call& first = calls[0];
  for (int r = 1; r < world; ++r) {
    if (calls[r].kind != first.kind)
      return fmt::format(
          "inprocess: ranks called different collectives as collective #{} of the group: "
          "rank 0 called {}, rank {} called {}",
          id, kind_name(first.kind), r, kind_name(calls[r].kind));
  }
  const std::string where = fmt::format("inprocess {} (collective #{})", kind_name(first.kind), id);
  for (int r = 1; r < world; ++r) {
    const Call& other = calls[r];
    if (other.dtype != first.dtype && first.kind != Kind::barrier)
      return fmt::format("{}: rank 0 passes dtype {}, rank {} passes {}", where,
                         dtype_name(first.dtype), r, dtype_name(other.dtype));
    const bool counted = first.kind != Kind::all_to_all && first.kind != Kind::barrier;
    if (counted && other.count != first.count)
      return fmt::format("{}: rank 0 passes count {}, rank {} passes count {}", where, first.count,
                         r, other.count);
    const bool reduces = first.kind == Kind::all_reduce || first.kind == Kind::reduce_scatter;
    if (reduces && other.op != first.op)
      return fmt::format("{}: rank 0 reduces with {}, rank {} with {}", where,
                         reduce_op_name(first.op), r, reduce_op_name(other.op));
    if (first.kind == Kind::broadcast && other.root != first.root)
      return fmt::format("{}: rank 0 broadcasts from root {}, rank {} from root {}", where,
                         first.root, r, other.root);
  }
  // Every rank passes the same kind of memory; a reduction, the same device.
  const bool reduces = first.kind == Kind::all_reduce || first.kind == Kind::reduce_scatter;
  int placed = -1;
  for (int r = 0; r < world; ++r) {
    const BufferPlace& place = calls[r].place;
    if (place.kind == BufferPlace::Kind::none) continue;
    if (placed < 0) {
      placed = r;
      continue;
    }
    const BufferPlace& ref = calls[placed].place;
    if (place.kind != ref.kind || (reduces && place != ref))
      return fmt::format("{}: rank {} passes {}, rank {} passes {}", where, placed,
                         describe_place(ref), r, describe_place(place));
  }
  if (first.kind == Kind::all_to_all) {
    std::vector<int64_t> sends(static_cast<size_t>(world) * world);
    std::vector<int64_t> recvs(sends.size());
    for (int r = 0; r < world; ++r) {
      for (int p = 0; p < world; ++p) {
        sends[r * world + p] = (*calls[r].send_counts)[p];
        recvs[r * world + p] = (*calls[r].recv_counts)[p];
      }
    }
    if (std::string bad = all_to_all_count_mismatch(world, sends, recvs); !bad.empty())
      return fmt::format("{}: {}", where, bad);
  }
  return "";
}

// out[i] = in_0[offset + i] op in_1[offset + i] op ... op in_{W-1}[offset + i], ranks in order.
// Integer sums wrap (two's complement) instead of overflowing.
template <class T>
void reduce_over_ranks(const std::vector<Call>& calls, int64_t offset, int64_t n, ReduceOp op,
                       T* out) {
  if (n == 0) return;
  std::memcpy(out, static_cast<const T*>(calls[0].send) + offset, n * sizeof(T));
  for (size_t p = 1; p < calls.size(); ++p) {
    const T* in = static_cast<const T*>(calls[p].send) + offset;
    if (op == ReduceOp::max) {
      for (int64_t i = 0; i < n; ++i) out[i] = in[i] > out[i] ? in[i] : out[i];
    } else if constexpr (std::is_integral_v<T>) {
      using U = std::make_unsigned_t<T>;
      for (int64_t i = 0; i < n; ++i)
        out[i] = static_cast<T>(static_cast<U>(out[i]) + static_cast<U>(in[i]));
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] += in[i];
    }
  }
}

void reduce_over_ranks(const std::vector<Call>& calls, int64_t offset, int64_t n, DType dtype,
                       ReduceOp op, void* out) {
  switch (dtype) {
    case DType::f32:
      return reduce_over_ranks(calls, offset, n, op, static_cast<float*>(out));
    case DType::f64:
      return reduce_over_ranks(calls, offset, n, op, static_cast<double*>(out));
    case DType::i32:
      return reduce_over_ranks(calls, offset, n, op, static_cast<int32_t*>(out));
    case DType::i64:
      return reduce_over_ranks(calls, offset, n, op, static_cast<int64_t*>(out));
    default:
      throw Error(check_reduce_dtype(dtype));  // check_call lets none of these through
  }
}

void copy_elements(void* dst, const void* src, int64_t count, size_t element_size) {
  if (count > 0) std::memcpy(dst, src, static_cast<size_t>(count) * element_size);
}

// The data movement of one rank in one collective: host memcpy and loops, or device copies
// and kernels on the rank thread's stream (finish() waits for them).
class Mover {
 public:
  explicit Mover(bool device) : device_(device) {}
  void copy(void* dst, const void* src, int64_t count, size_t element_size) const {
    if (!device_) return copy_elements(dst, src, count, element_size);
    if (count > 0) device_copy_async(dst, src, static_cast<size_t>(count) * element_size);
  }
  void reduce(const std::vector<Call>& calls, int64_t offset, int64_t n, DType dtype, ReduceOp op,
              void* out) const {
    if (!device_) return reduce_over_ranks(calls, offset, n, dtype, op, out);
    std::vector<const void*> inputs(calls.size());
    for (size_t p = 0; p < calls.size(); ++p) inputs[p] = calls[p].send;
    device_reduce_async(out, inputs.data(), static_cast<int>(inputs.size()), offset, n, dtype, op);
  }
  void finish() const {
    if (device_) device_sync();
  }

 private:
  bool device_;
};

std::byte* byte_ptr(void* p, int64_t elements, size_t element_size) {
  return static_cast<std::byte*>(p) + elements * static_cast<int64_t>(element_size);
}
const std::byte* byte_ptr(const void* p, int64_t elements, size_t element_size) {
  return static_cast<const std::byte*>(p) + elements * static_cast<int64_t>(element_size);
}

// send/recv: one side is the host mailbox, the other the caller's buffer at `place`.
void copy_to_or_from_device(void* dst, const void* src, int64_t count, size_t element_size,
                            const BufferPlace& place) {
  const Mover mover(place.kind == BufferPlace::Kind::device);
  mover.copy(dst, src, count, element_size);
  mover.finish();
}

class InProcessGroup {
 public:
  InProcessGroup(int world_size, milliseconds timeout)
      : world_(world_size), timeout_(timeout), next_call_(world_size, 0) {}
  ~InProcessGroup() { device_free(device_scratch_, device_scratch_place_.device); }
  InProcessGroup(const InProcessGroup&) = delete;
  InProcessGroup& operator=(const InProcessGroup&) = delete;

  int size() const { return world_; }
  void collective(int rank, const Call& call);
  void send(int rank, const void* data, int64_t count, DType dtype, int peer, int tag);
  void recv(int rank, void* data, int64_t count, DType dtype, int peer, int tag);
  void abort(const std::string& reason) {
    std::lock_guard<std::mutex> lock(mu_);
    abort_locked(reason);
  }

 private:
  using SlotIt = std::map<uint64_t, Slot>::iterator;

  void abort_locked(const std::string& reason) {
    if (!aborted_) {
      aborted_ = true;
      abort_reason_ = reason;
    }
    cv_.notify_all();
  }
  [[noreturn]] void fail_locked(const std::string& message) {
    abort_locked(message);
    throw Error(message);
  }
  void throw_if_aborted_locked() const {
    if (aborted_) throw GroupAbortedError("group aborted: " + abort_reason_);
  }
  // Waits until ready(); throws at `deadline` naming missing() (and aborts the group), or at
  // once when the group is aborted and `abortable`.
  template <class Ready, class Missing>
  void wait_locked(std::unique_lock<std::mutex>& lock, std::string_view what, int rank,
                   Clock::time_point start, Clock::time_point deadline, bool abortable,
                   const Ready& ready, const Missing& missing);
  void leave_locked(SlotIt it) {
    if (++it->second.n_left == world_) slots_.erase(it);
  }
  // Prepares a complete slot whose calls agree: its common place, its scratch buffer.
  void prepare_slot_locked(Slot& slot);
  // This rank's share of the data movement of a complete slot (no lock held).
  void move_data(int rank, Slot& slot);
  std::string check_point_to_point(const char* what, int rank, const void* data, int64_t count,
                                   int peer) const;

  const int world_;
  const milliseconds timeout_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool aborted_ = false;
  std::string abort_reason_;
  std::vector<uint64_t> next_call_;  // by rank: the slot of its next collective
  std::map<uint64_t, Slot> slots_;
  std::map<std::tuple<int, int, int>, std::deque<Message>> mailboxes_;  // (src, dst, tag)
  // The device all_reduce scratch: reused by consecutive collectives (a slot's scratch is
  // reallocated only once every rank has left the previous slot).
  void* device_scratch_ = nullptr;
  size_t device_scratch_bytes_ = 0;
  BufferPlace device_scratch_place_;
};

template <class Ready, class Missing>
void InProcessGroup::wait_locked(std::unique_lock<std::mutex>& lock, std::string_view what,
                                 int rank, Clock::time_point start, Clock::time_point deadline,
                                 bool abortable, const Ready& ready, const Missing& missing) {
  while (!ready()) {
    if (abortable) throw_if_aborted_locked();
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && !ready()) {
      if (abortable) throw_if_aborted_locked();
      const auto waited = std::chrono::duration_cast<milliseconds>(Clock::now() - start);
      fail_locked(wait_timeout_message("inprocess", what, rank, waited, missing(), timeout_));
    }
  }
}

void InProcessGroup::collective(int rank, const Call& call) {
  const auto start = Clock::now();
  const char* what = kind_name(call.kind);
  Call mine = call;
  std::string bad = check_call(mine, world_);
  if (bad.empty()) bad = locate_call(mine, world_);  // pointer queries: outside the lock
  std::unique_lock<std::mutex> lock(mu_);
  throw_if_aborted_locked();
  if (!bad.empty()) fail_locked(fmt::format("inprocess {} on rank {}: {}", what, rank, bad));

  const uint64_t id = next_call_[rank]++;
  const SlotIt it = slots_.try_emplace(id, world_).first;
  Slot& slot = it->second;
  slot.calls[rank] = mine;
  slot.arrived[rank] = 1;
  if (++slot.n_arrived == world_) {
    slot.error = check_calls(id, slot.calls);
    if (slot.error.empty()) prepare_slot_locked(slot);
    cv_.notify_all();
  }
  wait_locked(
      lock, what, rank, start, start + timeout_, /*abortable=*/true,
      [&] { return slot.n_arrived == world_; }, [&] { return ranks_without(slot.arrived); });
  if (!slot.error.empty()) {
    const std::string error = slot.error;
    leave_locked(it);
    fail_locked(error);
  }
  if (call.kind == Kind::barrier) return leave_locked(it);

  lock.unlock();
  std::string move_error;
  try {
    move_data(rank, slot);
  } catch (const std::exception& e) {
    move_error =
        fmt::format("inprocess {} on rank {}: moving the data failed: {}", what, rank, e.what());
  }
  lock.lock();
  if (!move_error.empty() && slot.move_error.empty()) {
    slot.move_error = move_error;
    abort_locked(move_error);
  }
  slot.finished[rank] = 1;
  if (++slot.n_finished == world_) cv_.notify_all();
  // Peers may still be reading this rank's buffers: wait for them even if the group is aborted
  // meanwhile. Their share is a bounded copy, so the deadline starts afresh.
  const auto moved = Clock::now();
  wait_locked(
      lock, what, rank, start, moved + timeout_, /*abortable=*/false,
      [&] { return slot.n_finished == world_; }, [&] { return ranks_without(slot.finished); });
  if (!slot.move_error.empty()) {
    const std::string error = slot.move_error;
    leave_locked(it);
    throw Error(error);
  }
  if (call.kind == Kind::all_reduce) {
    lock.unlock();
    try {
      const Mover mover(slot.place.kind == BufferPlace::Kind::device);
      mover.copy(call.recv, slot.device_scratch ? slot.device_scratch : slot.scratch.data(),
                 call.count, dtype_size(call.dtype));
      mover.finish();
    } catch (const std::exception& e) {
      lock.lock();
      leave_locked(it);
      fail_locked(fmt::format("inprocess all_reduce on rank {}: copying the result failed: {}",
                              rank, e.what()));
    }
    lock.lock();
  }
  leave_locked(it);
}

void InProcessGroup::prepare_slot_locked(Slot& slot) {
  for (const Call& call : slot.calls)
    if (call.place.kind != BufferPlace::Kind::none) {
      slot.place = call.place;
      break;
    }
  const Call& first = slot.calls[0];
  if (first.kind != Kind::all_reduce) return;
  const size_t bytes = static_cast<size_t>(first.count) * dtype_size(first.dtype);
  if (slot.place.kind != BufferPlace::Kind::device) {
    slot.scratch.resize((bytes + 7) / 8);
    return;
  }
  try {
    if (device_scratch_bytes_ < bytes || device_scratch_place_ != slot.place) {
      device_free(device_scratch_, device_scratch_place_.device);
      device_scratch_ = nullptr;
      device_scratch_bytes_ = 0;
      device_scratch_ = device_alloc(bytes, slot.place.device);
      device_scratch_bytes_ = bytes;
      device_scratch_place_ = slot.place;
    }
    slot.device_scratch = device_scratch_;
  } catch (const std::exception& e) {
    slot.error = fmt::format("inprocess all_reduce: allocating {} bytes of device scratch: {}",
                             bytes, e.what());
  }
}

void InProcessGroup::move_data(int rank, Slot& slot) {
  const Call& mine = slot.calls[rank];
  const size_t esize = dtype_size(mine.dtype);
  const Mover mover(slot.place.kind == BufferPlace::Kind::device);
  switch (mine.kind) {
    case Kind::all_reduce: {  // this rank's share [lo, hi) of the elements
      const int64_t lo = mine.count * rank / world_, hi = mine.count * (rank + 1) / world_;
      void* scratch = slot.device_scratch ? slot.device_scratch : slot.scratch.data();
      mover.reduce(slot.calls, lo, hi - lo, mine.dtype, mine.op, byte_ptr(scratch, lo, esize));
      break;
    }
    case Kind::reduce_scatter:
      mover.reduce(slot.calls, rank * mine.count, mine.count, mine.dtype, mine.op, mine.recv);
      break;
    case Kind::all_gather:
      for (int p = 0; p < world_; ++p)
        mover.copy(byte_ptr(mine.recv, p * mine.count, esize), slot.calls[p].send, mine.count,
                   esize);
      break;
    case Kind::broadcast:
      if (rank != mine.root) mover.copy(mine.recv, slot.calls[mine.root].send, mine.count, esize);
      break;
    case Kind::all_to_all: {
      int64_t recv_offset = 0;
      for (int p = 0; p < world_; ++p) {
        const Call& peer = slot.calls[p];
        const int64_t n = (*mine.recv_counts)[p];
        const int64_t send_offset = sum_counts(*peer.send_counts, rank);
        mover.copy(byte_ptr(mine.recv, recv_offset, esize), byte_ptr(peer.send, send_offset, esize),
                   n, esize);
        recv_offset += n;
      }
      break;
    }
    case Kind::barrier:
      break;
  }
  mover.finish();
}

std::string InProcessGroup::check_point_to_point(const char* what, int rank, const void* data,
                                                 int64_t count, int peer) const {
  std::string bad = check_rank_arg("peer", peer, world_);
  if (bad.empty() && peer == rank) bad = fmt::format("peer {} is this rank itself", peer);
  if (bad.empty()) bad = check_buffer("data", data, count);
  return bad.empty() ? "" : fmt::format("inprocess {} on rank {}: {}", what, rank, bad);
}

void InProcessGroup::send(int rank, const void* data, int64_t count, DType dtype, int peer,
                          int tag) {
  if (std::string bad = check_point_to_point("send", rank, data, count, peer); !bad.empty()) {
    std::lock_guard<std::mutex> lock(mu_);
    throw_if_aborted_locked();
    fail_locked(bad);
  }
  Message message;
  message.count = count;
  message.dtype = dtype;
  message.data.resize(static_cast<size_t>(count) * dtype_size(dtype));
  copy_to_or_from_device(message.data.data(), data, count, dtype_size(dtype), locate_buffer(data));
  std::lock_guard<std::mutex> lock(mu_);
  throw_if_aborted_locked();
  mailboxes_[{rank, peer, tag}].push_back(std::move(message));
  cv_.notify_all();
}

void InProcessGroup::recv(int rank, void* data, int64_t count, DType dtype, int peer, int tag) {
  const auto start = Clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  throw_if_aborted_locked();
  if (std::string bad = check_point_to_point("recv", rank, data, count, peer); !bad.empty())
    fail_locked(bad);
  std::deque<Message>& box = mailboxes_[{peer, rank, tag}];
  wait_locked(
      lock, fmt::format("recv from rank {} (tag {})", peer, tag), rank, start, start + timeout_,
      /*abortable=*/true, [&] { return !box.empty(); }, [&] { return std::vector<int>{peer}; });
  Message message = std::move(box.front());
  box.pop_front();
  if (message.count != count || message.dtype != dtype)
    fail_locked(fmt::format(
        "inprocess recv: rank {} expects {} {} elements from rank {} (tag {}), but rank {} sent "
        "{} {}",
        rank, count, dtype_name(dtype), peer, tag, peer, message.count, dtype_name(message.dtype)));
  lock.unlock();
  copy_to_or_from_device(data, message.data.data(), count, dtype_size(dtype), locate_buffer(data));
}

class InProcessComm final : public Communicator {
 public:
  InProcessComm(std::shared_ptr<InProcessGroup> group, int rank, milliseconds timeout)
      : Communicator(timeout), group_(std::move(group)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }
  const char* backend_name() const override { return "inprocess"; }

  void all_reduce(void* data, int64_t count, DType dtype, ReduceOp op) override {
    group_->collective(rank_, Call{.kind = Kind::all_reduce,
                                   .send = data,
                                   .recv = data,
                                   .count = count,
                                   .dtype = dtype,
                                   .op = op});
  }
  void all_gather(const void* send, void* recv, int64_t count, DType dtype) override {
    group_->collective(
        rank_,
        Call{.kind = Kind::all_gather, .send = send, .recv = recv, .count = count, .dtype = dtype});
  }
  void reduce_scatter(const void* send, void* recv, int64_t count, DType dtype,
                      ReduceOp op) override {
    group_->collective(rank_, Call{.kind = Kind::reduce_scatter,
                                   .send = send,
                                   .recv = recv,
                                   .count = count,
                                   .dtype = dtype,
                                   .op = op});
  }
  void broadcast(void* data, int64_t count, DType dtype, int root) override {
    group_->collective(rank_, Call{.kind = Kind::broadcast,
                                   .send = data,
                                   .recv = data,
                                   .count = count,
                                   .dtype = dtype,
                                   .root = root});
  }
  void all_to_all(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                  const std::vector<int64_t>& recv_counts, DType dtype) override {
    group_->collective(rank_, Call{.kind = Kind::all_to_all,
                                   .send = send,
                                   .recv = recv,
                                   .dtype = dtype,
                                   .send_counts = &send_counts,
                                   .recv_counts = &recv_counts});
  }
  void send(const void* data, int64_t count, DType dtype, int peer, int tag) override {
    group_->send(rank_, data, count, dtype, peer, tag);
  }
  void recv(void* data, int64_t count, DType dtype, int peer, int tag) override {
    group_->recv(rank_, data, count, dtype, peer, tag);
  }
  void barrier() override { group_->collective(rank_, Call{.kind = Kind::barrier}); }

  InProcessGroup& group() { return *group_; }

 private:
  std::shared_ptr<InProcessGroup> group_;
  int rank_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_inprocess_group(int world_size,
                                                                milliseconds timeout) {
  FM_CHECK(world_size >= 1, "make_inprocess_group: world_size {} must be at least 1", world_size);
  FM_CHECK(timeout.count() > 0, "make_inprocess_group: timeout {} ms must be positive",
           timeout.count());
  auto group = std::make_shared<InProcessGroup>(world_size, timeout);
  std::vector<std::unique_ptr<Communicator>> comms;
  comms.reserve(world_size);
  for (int rank = 0; rank < world_size; ++rank)
    comms.push_back(std::make_unique<InProcessComm>(group, rank, timeout));
  return comms;
}

bool abort_inprocess_group(Communicator& comm, const std::string& reason) {
  auto* inprocess = dynamic_cast<InProcessComm*>(&comm);
  if (inprocess == nullptr) return false;
  inprocess->group().abort(reason);
  return true;
}

}  // namespace fm
