// Process groups: a Communicator over one process per rank, met through the rendezvous store.
//
// make_process_group(env, backend, timeout):
//   1. rank 0 serves a StoreServer on env.master_addr:env.master_port (the returned
//      communicator owns it, so it lives as long as rank 0's group);
//   2. every rank connects a StoreClient to it and waits at a store barrier until all
//      env.world_size ranks have arrived;
//   3. the backend builds its communicator over the store:
//        "gloo"  CPU buffers, TCP (Debian's libgloo-dev; FOREMOE_HAVE_GLOO)
//        "nccl"  device buffers (the CUDA toolkit's NCCL; FOREMOE_HAVE_NCCL); the device is
//                env.local_rank modulo the visible devices.
// Every step is bounded by `timeout`: a rank that never arrives makes every rank present fail
// with an fm::Error naming the rendezvous, the store address and how many ranks arrived (a
// rank whose store vanishes because rank 0 gave up first may take up to twice the timeout: its
// client retries the connection to report the count). A backend this build lacks is an
// fm::Error naming the Debian package or build option needed.
// The communicator's calls are bounded by the same timeout (see engine/comm.h).
//
// master_port 0 is allowed for a group of one rank (the store picks a free port); larger
// groups need the port every rank was given.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "engine/comm.h"
#include "engine/dist_env.h"

namespace fm {

std::unique_ptr<Communicator> make_process_group(const DistEnv& env, const std::string& backend,
                                                 std::chrono::milliseconds timeout);

// Whether this build has the backend ("gloo", "nccl"); false for any other name.
bool process_group_backend_built(const std::string& backend);

}  // namespace fm
