// Rank discovery: where this process sits in the job and where the rendezvous store is, read
// from the launcher's environment variables. Sources, first match wins:
//
//   torchrun  any of RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE is set; then all six of
//             MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE are
//             required (as torchrun and `foremoe launch` set them).
//   openmpi   any OMPI_COMM_WORLD_* variable below is set (mpirun): OMPI_COMM_WORLD_RANK,
//             _SIZE, _LOCAL_RANK, _LOCAL_SIZE, plus MASTER_ADDR and MASTER_PORT for the store.
//   slurm     SLURM_PROCID is set (srun): SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID.
//             Tasks on this node: SLURM_NTASKS_PER_NODE, else this node's entry (SLURM_NODEID)
//             of SLURM_TASKS_PER_NODE ("4(x2),3" form), else SLURM_NTASKS / SLURM_NNODES when
//             it divides evenly. Store host: MASTER_ADDR, else the first host of
//             SLURM_JOB_NODELIST (or SLURM_NODELIST): a plain name, a comma list, or a name
//             with one bracket range ("gpu[03-08,11]" -> "gpu03"); anything else needs
//             MASTER_ADDR. Store port: MASTER_PORT, else 20000 + SLURM_JOB_ID % 10000 (the
//             same on every task of the job).
//   none      nothing of the above: a single process, rank 0 of 1; MASTER_ADDR/MASTER_PORT
//             are used when set, else 127.0.0.1 and port 0 (no store is needed).
//
// A value that is not a decimal integer, out of range (rank >= world size, negative, port
// outside 1..65535) or a partial set of a source's variables is an fm::Error naming the
// variable and its value (or the variable that is missing).
#pragma once

#include <functional>
#include <string>

namespace fm {

struct DistEnv {
  std::string master_addr = "127.0.0.1";  // the rendezvous store's host
  int master_port = 0;                    // its port; 0 only for source "none"
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;           // rank among the processes of this node
  int local_world_size = 1;     // processes on this node
  std::string source = "none";  // "torchrun", "openmpi", "slurm" or "none"
};

// getenv: returns the variable's value, or nullptr when it is not set.
DistEnv dist_env_from(const std::function<const char*(const char*)>& getenv);
DistEnv dist_env_from_environment();

}  // namespace fm
