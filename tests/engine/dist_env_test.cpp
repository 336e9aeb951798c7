// Rank discovery from torchrun, Open MPI and Slurm variables (through a fake getenv), the
// single-process default, and the errors for bad or partial variable sets.
#include "engine/dist_env.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "engine/error.h"

namespace fm {
namespace {

using ::testing::HasSubstr;
using Env = std::map<std::string, std::string>;

DistEnv discover(const Env& env) {
  return dist_env_from([&](const char* name) -> const char* {
    const auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  });
}

// The fm::Error message of discover(env); fails the test when nothing is thrown.
std::string error_of(const Env& env) {
  try {
    const DistEnv got = discover(env);
    ADD_FAILURE() << "no error; got rank " << got.rank << " of " << got.world_size << " from "
                  << got.source;
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

const Env kTorchrun = {
    {"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "29500"}, {"RANK", "5"},
    {"WORLD_SIZE", "8"},         {"LOCAL_RANK", "1"},      {"LOCAL_WORLD_SIZE", "4"}};

Env with(Env env, const std::string& name, const std::string& value) {
  env[name] = value;
  return env;
}
Env without(Env env, const std::string& name) {
  env.erase(name);
  return env;
}

TEST(DistEnv, NoVariablesMeansOneProcess) {
  const DistEnv e = discover({});
  EXPECT_EQ(e.source, "none");
  EXPECT_EQ(e.rank, 0);
  EXPECT_EQ(e.world_size, 1);
  EXPECT_EQ(e.local_rank, 0);
  EXPECT_EQ(e.local_world_size, 1);
  EXPECT_EQ(e.master_addr, "127.0.0.1");
  EXPECT_EQ(e.master_port, 0);
  const DistEnv m = discover({{"MASTER_ADDR", "h"}, {"MASTER_PORT", "1234"}});
  EXPECT_EQ(m.source, "none");
  EXPECT_EQ(m.master_addr, "h");
  EXPECT_EQ(m.master_port, 1234);
  EXPECT_THAT(error_of({{"MASTER_PORT", "http"}}), HasSubstr("MASTER_PORT='http'"));
}

TEST(DistEnv, ReadsTorchrunVariables) {
  const DistEnv e = discover(kTorchrun);
  EXPECT_EQ(e.source, "torchrun");
  EXPECT_EQ(e.master_addr, "10.0.0.1");
  EXPECT_EQ(e.master_port, 29500);
  EXPECT_EQ(e.rank, 5);
  EXPECT_EQ(e.world_size, 8);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.local_world_size, 4);
}

TEST(DistEnv, TorchrunWinsOverOpenMpiAndSlurm) {
  Env env = kTorchrun;
  env["OMPI_COMM_WORLD_RANK"] = "0";
  env["SLURM_PROCID"] = "0";
  EXPECT_EQ(discover(env).source, "torchrun");
}

TEST(DistEnv, TorchrunErrorsNameTheVariable) {
  EXPECT_THAT(error_of(without(kTorchrun, "WORLD_SIZE")), HasSubstr("WORLD_SIZE is not set"));
  EXPECT_THAT(error_of(without(kTorchrun, "MASTER_ADDR")), HasSubstr("MASTER_ADDR is not set"));
  EXPECT_THAT(error_of(without(kTorchrun, "MASTER_PORT")), HasSubstr("MASTER_PORT is not set"));
  EXPECT_THAT(error_of(without(kTorchrun, "LOCAL_RANK")), HasSubstr("LOCAL_RANK is not set"));
  EXPECT_THAT(error_of(without(kTorchrun, "LOCAL_WORLD_SIZE")),
              HasSubstr("LOCAL_WORLD_SIZE is not set"));
  EXPECT_THAT(error_of({{"RANK", "0"}}), HasSubstr("WORLD_SIZE is not set"));
  EXPECT_THAT(error_of(with(kTorchrun, "RANK", "abc")),
              HasSubstr("RANK='abc' is not a decimal integer"));
  EXPECT_THAT(error_of(with(kTorchrun, "RANK", "3x")), HasSubstr("RANK='3x'"));
  EXPECT_THAT(error_of(with(kTorchrun, "RANK", "")), HasSubstr("RANK is set but empty"));
  EXPECT_THAT(error_of(with(kTorchrun, "RANK", "8")),
              HasSubstr("RANK=8 is out of range (must be below WORLD_SIZE=8)"));
  EXPECT_THAT(error_of(with(kTorchrun, "RANK", "-1")), HasSubstr("RANK=-1 is negative"));
  EXPECT_THAT(error_of(with(kTorchrun, "WORLD_SIZE", "0")), HasSubstr("WORLD_SIZE=0"));
  EXPECT_THAT(error_of(with(kTorchrun, "LOCAL_RANK", "4")),
              HasSubstr("LOCAL_RANK=4 is out of range (must be below LOCAL_WORLD_SIZE=4)"));
  EXPECT_THAT(error_of(with(kTorchrun, "LOCAL_WORLD_SIZE", "9")),
              HasSubstr("LOCAL_WORLD_SIZE=9 exceeds the world size 8"));
  EXPECT_THAT(error_of(with(kTorchrun, "MASTER_PORT", "0")), HasSubstr("MASTER_PORT=0"));
  EXPECT_THAT(error_of(with(kTorchrun, "MASTER_PORT", "70000")), HasSubstr("MASTER_PORT=70000"));
  EXPECT_THAT(error_of(with(kTorchrun, "MASTER_PORT", "99999999999999999999")),
              HasSubstr("MASTER_PORT='99999999999999999999'"));
  EXPECT_THAT(error_of(with(kTorchrun, "RANK", "abc")), HasSubstr("torchrun"));
}

const Env kOpenMpi = {{"OMPI_COMM_WORLD_RANK", "3"},
                      {"OMPI_COMM_WORLD_SIZE", "4"},
                      {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                      {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                      {"MASTER_ADDR", "node0"},
                      {"MASTER_PORT", "29400"}};

TEST(DistEnv, ReadsOpenMpiVariables) {
  const DistEnv e = discover(kOpenMpi);
  EXPECT_EQ(e.source, "openmpi");
  EXPECT_EQ(e.rank, 3);
  EXPECT_EQ(e.world_size, 4);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.local_world_size, 2);
  EXPECT_EQ(e.master_addr, "node0");
  EXPECT_EQ(e.master_port, 29400);
}

TEST(DistEnv, OpenMpiErrorsNameTheVariable) {
  EXPECT_THAT(error_of(without(kOpenMpi, "MASTER_ADDR")), HasSubstr("MASTER_ADDR is not set"));
  EXPECT_THAT(error_of(without(kOpenMpi, "OMPI_COMM_WORLD_SIZE")),
              HasSubstr("OMPI_COMM_WORLD_SIZE is not set"));
  EXPECT_THAT(error_of(with(kOpenMpi, "OMPI_COMM_WORLD_RANK", "4")),
              HasSubstr("OMPI_COMM_WORLD_RANK=4 is out of range"));
  EXPECT_THAT(error_of(with(kOpenMpi, "OMPI_COMM_WORLD_LOCAL_SIZE", "x")),
              HasSubstr("OMPI_COMM_WORLD_LOCAL_SIZE='x'"));
  EXPECT_THAT(error_of(with(kOpenMpi, "OMPI_COMM_WORLD_LOCAL_RANK", "2")),
              HasSubstr("OMPI_COMM_WORLD_LOCAL_RANK=2 is out of range"));
  EXPECT_THAT(error_of(without(kOpenMpi, "MASTER_ADDR")), HasSubstr("Open MPI"));
}

const Env kSlurm = {{"SLURM_PROCID", "6"},      {"SLURM_NTASKS", "8"},
                    {"SLURM_LOCALID", "2"},     {"SLURM_NTASKS_PER_NODE", "4"},
                    {"SLURM_JOB_ID", "123456"}, {"SLURM_JOB_NODELIST", "gpu[07-08]"}};

TEST(DistEnv, ReadsSlurmVariables) {
  const DistEnv e = discover(kSlurm);
  EXPECT_EQ(e.source, "slurm");
  EXPECT_EQ(e.rank, 6);
  EXPECT_EQ(e.world_size, 8);
  EXPECT_EQ(e.local_rank, 2);
  EXPECT_EQ(e.local_world_size, 4);
  EXPECT_EQ(e.master_addr, "gpu07");
  EXPECT_EQ(e.master_port, 20000 + 123456 % 10000);
  const DistEnv m = discover(with(with(kSlurm, "MASTER_ADDR", "head"), "MASTER_PORT", "5000"));
  EXPECT_EQ(m.master_addr, "head");
  EXPECT_EQ(m.master_port, 5000);
}

TEST(DistEnv, SlurmFirstHostOfTheNodeList) {
  const auto host = [](const std::string& list) {
    return discover(with(kSlurm, "SLURM_JOB_NODELIST", list)).master_addr;
  };
  EXPECT_EQ(host("alpha"), "alpha");
  EXPECT_EQ(host("alpha,beta"), "alpha");
  EXPECT_EQ(host("node[003-010,020]"), "node003");
  EXPECT_EQ(host("rack[1-2]-a,beta"), "rack1-a");
  EXPECT_EQ(host("n[5],m[1-2]"), "n5");
  EXPECT_EQ(
      discover(with(without(kSlurm, "SLURM_JOB_NODELIST"), "SLURM_NODELIST", "c1,c2")).master_addr,
      "c1");
  EXPECT_THAT(error_of(with(kSlurm, "SLURM_JOB_NODELIST", "r[1-2]n[1-4]")),
              HasSubstr("SLURM_JOB_NODELIST='r[1-2]n[1-4]' has more than one bracket range"));
  EXPECT_THAT(error_of(with(kSlurm, "SLURM_JOB_NODELIST", "node[a-b]")),
              HasSubstr("set MASTER_ADDR"));
  EXPECT_THAT(error_of(with(kSlurm, "SLURM_JOB_NODELIST", "node[1-2")), HasSubstr("unclosed '['"));
  EXPECT_THAT(error_of(without(kSlurm, "SLURM_JOB_NODELIST")),
              HasSubstr("none of MASTER_ADDR, SLURM_JOB_NODELIST and SLURM_NODELIST is set"));
}

TEST(DistEnv, SlurmDerivesTasksPerNode) {
  const Env base = without(kSlurm, "SLURM_NTASKS_PER_NODE");
  // "4(x2)" covers nodes 0 and 1; this task (rank 6, local 2) is on node 1.
  EXPECT_EQ(discover(with(with(base, "SLURM_TASKS_PER_NODE", "4(x2)"), "SLURM_NODEID", "1"))
                .local_world_size,
            4);
  EXPECT_EQ(discover(with(with(with(base, "SLURM_NTASKS", "9"), "SLURM_TASKS_PER_NODE", "2(x2),5"),
                          "SLURM_NODEID", "2"))
                .local_world_size,
            5);
  EXPECT_EQ(discover(with(base, "SLURM_NNODES", "2")).local_world_size, 4);
  EXPECT_THAT(error_of(with(base, "SLURM_TASKS_PER_NODE", "4(x2)")),
              HasSubstr("SLURM_NODEID is not set"));
  EXPECT_THAT(error_of(with(with(base, "SLURM_TASKS_PER_NODE", "4(y2)"), "SLURM_NODEID", "0")),
              HasSubstr("SLURM_TASKS_PER_NODE='4(y2)'"));
  EXPECT_THAT(error_of(with(with(base, "SLURM_TASKS_PER_NODE", "4(x2)"), "SLURM_NODEID", "2")),
              HasSubstr("SLURM_NODEID=2 has no entry"));
  EXPECT_THAT(error_of(with(base, "SLURM_NNODES", "3")),
              HasSubstr("SLURM_NTASKS=8 is not a multiple of SLURM_NNODES=3"));
  EXPECT_THAT(error_of(base), HasSubstr("SLURM_NTASKS_PER_NODE"));
}

TEST(DistEnv, SlurmErrorsNameTheVariable) {
  EXPECT_THAT(error_of(without(kSlurm, "SLURM_NTASKS")), HasSubstr("SLURM_NTASKS is not set"));
  EXPECT_THAT(error_of(without(kSlurm, "SLURM_LOCALID")), HasSubstr("SLURM_LOCALID is not set"));
  EXPECT_THAT(error_of(with(kSlurm, "SLURM_PROCID", "8")),
              HasSubstr("SLURM_PROCID=8 is out of range (must be below SLURM_NTASKS=8)"));
  EXPECT_THAT(error_of(with(kSlurm, "SLURM_LOCALID", "4")), HasSubstr("SLURM_LOCALID=4"));
  EXPECT_THAT(error_of(with(kSlurm, "SLURM_NTASKS_PER_NODE", "2(x4)")),
              HasSubstr("SLURM_NTASKS_PER_NODE='2(x4)'"));
  EXPECT_THAT(error_of(without(kSlurm, "SLURM_JOB_ID")),
              HasSubstr("neither MASTER_PORT nor SLURM_JOB_ID"));
  EXPECT_THAT(error_of(with(kSlurm, "SLURM_JOB_ID", "job")), HasSubstr("SLURM_JOB_ID='job'"));
  EXPECT_THAT(error_of(with(kSlurm, "SLURM_PROCID", "x")), HasSubstr("Slurm"));
}

}  // namespace
}  // namespace fm
