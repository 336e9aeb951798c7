// Private to engine/: what make_process_group() hands a backend once the rendezvous is done,
// and the backends' entry points (engine/gloo/gloo_comm.cpp, engine/cuda/nccl_comm.cpp; a
// stand-in in process_group.cpp when a backend is not built).
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "engine/comm.h"
#include "engine/dist_env.h"
#include "engine/store.h"

namespace fm {

struct ProcessGroupRendezvous {
  DistEnv env;
  std::chrono::milliseconds timeout{0};
  std::string local_address;            // this host's IP on the interface toward the store
  std::unique_ptr<StoreServer> server;  // rank 0 only; the communicator keeps it alive
  std::unique_ptr<StoreClient> store;   // connected; every rank passed the store barrier
};

std::unique_ptr<Communicator> make_gloo_communicator(ProcessGroupRendezvous rendezvous);
std::unique_ptr<Communicator> make_nccl_communicator(ProcessGroupRendezvous rendezvous);

}  // namespace fm
