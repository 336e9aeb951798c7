// What every communicator shares: reduce-op names, argument checks and error messages,
// abort_group() dispatch, and run_inprocess() (W threads over one in-process group).
#include "engine/comm.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <exception>
#include <thread>

#include "engine/error.h"
#include "engine/src/inprocess_comm.h"

namespace fm {

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
      return "sum";
    case ReduceOp::max:
      return "max";
  }
  return "?";
}

bool reduce_dtype_supported(DType dtype) {
  return dtype == DType::f32 || dtype == DType::f64 || dtype == DType::i32 || dtype == DType::i64;
}

std::string check_reduce_dtype(DType dtype) {
  if (reduce_dtype_supported(dtype)) return "";
  return fmt::format("dtype {} cannot be reduced (f32, f64, i32 or i64 can)", dtype_name(dtype));
}

std::string check_buffer(const char* name, const void* buffer, int64_t count) {
  if (count < 0) return fmt::format("count {} is negative", count);
  if (count > 0 && buffer == nullptr) return fmt::format("{} is null for count {}", name, count);
  return "";
}

std::string check_rank_arg(const char* name, int value, int size) {
  if (value >= 0 && value < size) return "";
  return fmt::format("{} {} is not a rank of a group of {}", name, value, size);
}

std::string check_all_to_all_counts(const std::vector<int64_t>& send_counts,
                                    const std::vector<int64_t>& recv_counts, int size) {
  const auto check = [size](const char* name, const std::vector<int64_t>& counts) -> std::string {
    if (static_cast<int64_t>(counts.size()) != size)
      return fmt::format("{} has {} entries, expected one per rank ({})", name, counts.size(),
                         size);
    for (int p = 0; p < size; ++p)
      if (counts[p] < 0) return fmt::format("{}[{}] = {} is negative", name, p, counts[p]);
    return "";
  };
  std::string bad = check("send_counts", send_counts);
  return bad.empty() ? check("recv_counts", recv_counts) : bad;
}

std::string check_all_to_all_args(const void* send, const std::vector<int64_t>& send_counts,
                                  const void* recv, const std::vector<int64_t>& recv_counts,
                                  int size, int64_t& send_total, int64_t& recv_total) {
  std::string bad = check_all_to_all_counts(send_counts, recv_counts, size);
  if (!bad.empty()) return bad;
  send_total = recv_total = 0;
  for (int p = 0; p < size; ++p) {
    send_total += send_counts[p];
    recv_total += recv_counts[p];
  }
  bad = check_buffer("send", send, send_total);
  return bad.empty() ? check_buffer("recv", recv, recv_total) : bad;
}

std::string all_to_all_count_mismatch(int size, const std::vector<int64_t>& send_counts_by_rank,
                                      const std::vector<int64_t>& recv_counts_by_rank) {
  for (int receiver = 0; receiver < size; ++receiver) {
    for (int sender = 0; sender < size; ++sender) {
      const int64_t expects = recv_counts_by_rank[receiver * size + sender];
      const int64_t sends = send_counts_by_rank[sender * size + receiver];
      if (expects != sends)
        return fmt::format(
            "rank {} expects {} elements from rank {}, but rank {} sends {} to rank {} "
            "(recv_counts[{}] of rank {} must equal send_counts[{}] of rank {})",
            receiver, expects, sender, sender, sends, receiver, sender, receiver, receiver, sender);
    }
  }
  return "";
}

std::string format_ranks(const std::vector<int>& ranks) {
  return fmt::format("{}", fmt::join(ranks, ", "));
}

std::string wait_timeout_message(std::string_view backend, std::string_view what, int rank,
                                 std::chrono::milliseconds waited, const std::vector<int>& missing,
                                 std::chrono::milliseconds timeout) {
  return fmt::format("{} {}: rank {} waited {} ms for rank(s) {} (timeout {} ms)", backend, what,
                     rank, waited.count(), format_ranks(missing), timeout.count());
}

void abort_group(Communicator& comm, const std::string& reason) {
  abort_inprocess_group(comm, reason);  // other implementations have no group to mark
}

void run_inprocess(int world_size, std::chrono::milliseconds timeout,
                   const std::function<void(int rank, Communicator& comm)>& fn) {
  auto comms = make_inprocess_group(world_size, timeout);
  // A rank's own failure is a root cause; the GroupAbortedError it causes in its peers is not.
  std::vector<std::exception_ptr> root_causes(world_size), aborted(world_size);
  const auto run_rank = [&](int rank) {
    Communicator& comm = *comms[rank];
    try {
      fn(rank, comm);
    } catch (const GroupAbortedError&) {
      aborted[rank] = std::current_exception();
    } catch (const std::exception& e) {
      root_causes[rank] = std::current_exception();
      abort_group(comm, fmt::format("rank {} failed: {}", rank, e.what()));
    } catch (...) {
      root_causes[rank] = std::current_exception();
      abort_group(comm, fmt::format("rank {} failed (not a std::exception)", rank));
    }
  };

  std::vector<std::thread> threads;
  threads.reserve(world_size);
  try {
    for (int rank = 0; rank < world_size; ++rank) threads.emplace_back(run_rank, rank);
  } catch (const std::exception& e) {  // could not start a thread: release the started ones
    abort_group(*comms[0], fmt::format("run_inprocess could not start a thread: {}", e.what()));
    for (auto& t : threads) t.join();
    throw;
  }
  for (auto& t : threads) t.join();

  for (const auto& error : root_causes)
    if (error) std::rethrow_exception(error);
  for (const auto& error : aborted)
    if (error) std::rethrow_exception(error);
}

}  // namespace fm
