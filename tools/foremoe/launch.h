// `foremoe launch --nproc N -- <subcommand> [args...]`: N local processes of one job, each
// with the torchrun-style rendezvous variables (engine/rendezvous reads them). The spawning is
// launch_local(), which runs any program, so tests can drive it with e.g. /bin/sh -c '...'.
#pragma once

#include <string>
#include <vector>

#include "tools/foremoe/commands.h"

namespace fm::cli {

struct LaunchOptions {
  int nproc = 1;                          // ranks to start (WORLD_SIZE = LOCAL_WORLD_SIZE)
  std::string master_addr = "127.0.0.1";  // MASTER_ADDR
  int master_port = 0;                    // MASTER_PORT; 0: a free port picked by pick_free_port
  double timeout_s = 0;                   // the whole job is stopped after this; 0: no limit
  double grace_s = 5;                     // SIGTERM/SIGINT to SIGKILL when stopping ranks
  bool prefix_output = false;             // "[rank r] " before every line of a rank's output
};

// Exit status of a job stopped by timeout_s (as timeout(1)).
constexpr int kLaunchTimeoutStatus = 124;

// Starts options.nproc copies of argv (argv[0] searched on PATH when it has no '/') with
// MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and
// FOREMOE_LAUNCHED=1 set, and waits for them. Returns the job's exit status: 0 when every rank
// exits 0; else the first failing rank's status (128 + signal for a signal death), the others
// being stopped (SIGTERM, SIGKILL after grace_s); 128 + signal when the launcher gets SIGINT or
// SIGTERM (forwarded to the ranks, a second one kills them); kLaunchTimeoutStatus on timeout.
// Throws fm::Error for bad options or a program that cannot be executed.
int launch_local(const LaunchOptions& options, const std::vector<std::string>& argv);

// A TCP port that was free on `addr` just now (bind port 0, read it, close). Another process
// may take it before the job binds it; a rendezvous that cannot bind then fails clearly.
int pick_free_port(const std::string& addr);

// The `launch` subcommand, and the hidden `launch-selftest` that tests/tools/launch_test.sh
// runs under it (prints the variables a rank sees, then exits, fails or sleeps as asked).
Runner add_launch(CLI::App& app);
Runner add_launch_selftest(CLI::App& app);

}  // namespace fm::cli
