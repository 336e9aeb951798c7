// Private to engine/: what make_process_group() hands a backend once the rendezvous is done,
// and the backends' entry points (engine/gloo/gloo_comm.cpp, engine/cuda/nccl_comm.cpp; a
// stand-in in process_group.cpp when a backend is not built).
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <exception>
#include <memory>
#include <string>

#include "engine/comm.h"
#include "engine/dist_env.h"
#include "engine/error.h"
#include "engine/src/inprocess_comm.h"
#include "engine/store.h"

namespace fm {

struct ProcessGroupRendezvous {
  DistEnv env;
  std::chrono::milliseconds timeout{0};
  std::string local_address;            // this host's IP on the interface toward the store
  std::unique_ptr<StoreServer> server;  // rank 0 only; the communicator keeps it alive
  std::unique_ptr<StoreClient> store;   // connected; every rank passed the store barrier
};

// One call of a process-group communicator, which breaks for good at its first failure: fn
// runs unless `broken` already holds an earlier error (then GroupAbortedError quotes it);
// if fn throws, `broken` records "<backend> <what> on rank r of n<where> failed after t ms
// (timeout T ms): <cause>", on_break runs (NCCL aborts its communicator there) and an
// fm::Error with that text is thrown. `where` adds detail, e.g. " with rank 2".
struct CommCall {
  const char* backend;  // "gloo", "nccl"
  const char* what;     // "all_reduce", ...
  int rank, size;
  std::string where;
  std::chrono::milliseconds timeout;
};

template <class Fn, class OnBreak>
void run_comm_call(std::string& broken, const CommCall& call, const Fn& fn,
                   const OnBreak& on_break) {
  if (!broken.empty())
    throw GroupAbortedError(
        fmt::format("{} {} on rank {}: the communicator is broken by an earlier error: {}",
                    call.backend, call.what, call.rank, broken));
  const auto start = std::chrono::steady_clock::now();
  try {
    fn();
  } catch (const std::exception& e) {
    const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(
        std::chrono::steady_clock::now() - start);
    broken = fmt::format("{} {} on rank {} of {}{} failed after {} ms (timeout {} ms): {}",
                         call.backend, call.what, call.rank, call.size, call.where, waited.count(),
                         call.timeout.count(), e.what());
    on_break();
    throw Error(broken);
  }
}

std::unique_ptr<Communicator> make_gloo_communicator(ProcessGroupRendezvous rendezvous);
std::unique_ptr<Communicator> make_nccl_communicator(ProcessGroupRendezvous rendezvous);

}  // namespace fm
