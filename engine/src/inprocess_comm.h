// Private to engine/: what comm.cpp and inprocess_comm.cpp share behind engine/comm.h.
//   - GroupAbortedError, the error of calls on an aborted group (run_inprocess reports the
//     failure that caused an abort before these);
//   - abort_inprocess_group(), which abort_group() dispatches to;
//   - argument checks and messages that every communicator gives the same way (comm.cpp).
// The checks return "" when the arguments are fine, else what is wrong, so that a caller
// can abort its group with the message before throwing it.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/comm.h"
#include "engine/error.h"

namespace fm {

// Thrown by every call of a group that was aborted, pending or later: "group aborted: <why>".
class GroupAbortedError : public Error {
 public:
  using Error::Error;
};

// Aborts the group of `comm` when it is an in-process communicator; false otherwise.
bool abort_inprocess_group(Communicator& comm, const std::string& reason);

// f32, f64, i32 and i64 can be reduced.
bool reduce_dtype_supported(DType dtype);
std::string check_reduce_dtype(DType dtype);
// `count` elements at `buffer` (named `name` in the message): count >= 0, buffer set if count > 0.
std::string check_buffer(const char* name, const void* buffer, int64_t count);
// `value` (a root or a peer, named `name`) is a rank of a group of `size`.
std::string check_rank_arg(const char* name, int value, int size);
// Both count vectors have `size` non-negative entries.
std::string check_all_to_all_counts(const std::vector<int64_t>& send_counts,
                                    const std::vector<int64_t>& recv_counts, int size);
// check_all_to_all_counts, then the send and recv buffers against the counts' sums, which
// it returns in send_total and recv_total (elements).
std::string check_all_to_all_args(const void* send, const std::vector<int64_t>& send_counts,
                                  const void* recv, const std::vector<int64_t>& recv_counts,
                                  int size, int64_t& send_total, int64_t& recv_total);
// The counts of all ranks agree: entry [r * size + p] of send_counts_by_rank is rank r's
// send_counts[p], of recv_counts_by_rank rank r's recv_counts[p]. Names the first pair
// (receiver, sender) in rank order that disagrees, so every rank reports the same one.
std::string all_to_all_count_mismatch(int size, const std::vector<int64_t>& send_counts_by_rank,
                                      const std::vector<int64_t>& recv_counts_by_rank);

// "1, 3"
std::string format_ranks(const std::vector<int>& ranks);
// "<backend> <what>: rank <rank> waited <waited> ms for rank(s) <missing> (timeout <timeout> ms)"
std::string wait_timeout_message(std::string_view backend, std::string_view what, int rank,
                                 std::chrono::milliseconds waited, const std::vector<int>& missing,
                                 std::chrono::milliseconds timeout);

}  // namespace fm
