// The Gloo process group: W processes (forked from the test) meet at a store on 127.0.0.1,
// run the communicator conformance checks, and fail within their timeout -- never hang -- when
// a rank is missing at the rendezvous or dies in the middle of collectives. Children report by
// exit code (0 = as expected) and print what went wrong to stderr; the parent bounds wall time.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "engine/error.h"
#include "engine/process_group.h"
#include "support/comm_conformance.h"

namespace fm {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// A port that was free a moment ago on 127.0.0.1.
int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  close(fd);
  return ok ? ntohs(addr.sin_port) : 0;
}

DistEnv rank_env(int port, int rank, int world) {
  DistEnv env;
  env.master_addr = "127.0.0.1";
  env.master_port = port;
  env.rank = rank;
  env.world_size = world;
  env.local_rank = rank;
  env.local_world_size = world;
  env.source = "test";
  return env;
}

struct RankExit {
  bool exited = false;  // exited normally (then `code`), else killed by `signal`
  int code = -1, signal = 0;
  bool overran = false;  // still running at the wall-time bound (then killed)
};

// Forks `world` children; child r runs body(r) and exits with its return value (1 when it
// throws). Waits at most `bound` for all of them, then kills the rest.
std::vector<RankExit> run_ranks(int world, milliseconds bound,
                                const std::function<int(int rank)>& body) {
  std::fflush(nullptr);
  std::vector<pid_t> pids(world, -1);
  for (int rank = 0; rank < world; ++rank) {
    const pid_t pid = fork();
    if (pid == 0) {
      int code = 1;
      try {
        code = body(rank);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
      }
      std::fflush(nullptr);
      _exit(code);
    }
    pids[rank] = pid;
  }
  std::vector<RankExit> exits(world);
  std::vector<bool> done(world, false);
  const auto deadline = Clock::now() + bound;
  int left = world;
  while (left > 0) {
    for (int rank = 0; rank < world; ++rank) {
      if (done[rank] || pids[rank] < 0) continue;
      int status = 0;
      if (waitpid(pids[rank], &status, WNOHANG) == pids[rank]) {
        done[rank] = true;
        --left;
        exits[rank].exited = WIFEXITED(status);
        exits[rank].code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        exits[rank].signal = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
      }
    }
    if (left > 0 && Clock::now() > deadline) {
      for (int rank = 0; rank < world; ++rank) {
        if (done[rank]) continue;
        kill(pids[rank], SIGKILL);
        waitpid(pids[rank], nullptr, 0);
        exits[rank].overran = true;
      }
      break;
    }
    std::this_thread::sleep_for(milliseconds(20));
  }
  return exits;
}

void expect_all_exit_zero(const std::vector<RankExit>& exits) {
  for (size_t rank = 0; rank < exits.size(); ++rank) {
    EXPECT_FALSE(exits[rank].overran) << "rank " << rank << " overran the wall-time bound";
    EXPECT_TRUE(exits[rank].exited && exits[rank].code == 0)
        << "rank " << rank << " exit code " << exits[rank].code << " signal " << exits[rank].signal
        << " (see its stderr above)";
  }
}

// 0 when fn throws an fm::Error whose message holds every one of `needles`, within `bound`.
int expect_error(const std::string& what, milliseconds bound,
                 const std::vector<std::string>& needles, const std::function<void()>& fn) {
  const auto start = Clock::now();
  try {
    fn();
  } catch (const Error& e) {
    const auto took = std::chrono::duration_cast<milliseconds>(Clock::now() - start);
    const std::string message = e.what();
    for (const auto& needle : needles) {
      if (message.find(needle) == std::string::npos) {
        std::fprintf(stderr, "%s: error lacks \"%s\": %s\n", what.c_str(), needle.c_str(),
                     message.c_str());
        return 3;
      }
    }
    if (took > bound) {
      std::fprintf(stderr, "%s: failed after %lld ms, bound %lld ms: %s\n", what.c_str(),
                   static_cast<long long>(took.count()), static_cast<long long>(bound.count()),
                   message.c_str());
      return 4;
    }
    return 0;
  }
  std::fprintf(stderr, "%s: no error\n", what.c_str());
  return 2;
}

#ifdef FOREMOE_HAVE_GLOO
#define SKIP_WITHOUT_GLOO()
#else
#define SKIP_WITHOUT_GLOO() GTEST_SKIP() << "built without Gloo (apt-get install libgloo-dev)"
#endif

// Every conformance check, the large all_reduce at 100'003 elements (odd: uneven shares) to
// keep the suite short on two cores.
int run_conformance(int port, int rank, int world) {
  auto comm = make_process_group(rank_env(port, rank, world), "gloo", milliseconds(30'000));
  FM_CHECK(
      comm->rank() == rank && comm->size() == world && std::string(comm->backend_name()) == "gloo",
      "rank {}: communicator says rank {} of {}, backend {}", rank, comm->rank(), comm->size(),
      comm->backend_name());
  testing::check_all_reduce(*comm, 100'003);
  testing::check_all_gather(*comm);
  testing::check_reduce_scatter(*comm);
  testing::check_broadcast(*comm);
  testing::check_all_to_all(*comm);
  testing::check_send_recv(*comm);
  testing::check_barrier(*comm);
  testing::check_mixed_sequence(*comm);
  return 0;
}

TEST(GlooProcessGroup, PassesConformanceChecksWithTwoRanks) {
  SKIP_WITHOUT_GLOO();
  const int port = free_port();
  expect_all_exit_zero(
      run_ranks(2, milliseconds(60'000), [&](int rank) { return run_conformance(port, rank, 2); }));
}

TEST(GlooProcessGroup, PassesConformanceChecksWithThreeRanks) {
  SKIP_WITHOUT_GLOO();
  const int port = free_port();
  expect_all_exit_zero(
      run_ranks(3, milliseconds(60'000), [&](int rank) { return run_conformance(port, rank, 3); }));
}

TEST(GlooProcessGroup, SingleRankGroupNeedsNoPort) {
  SKIP_WITHOUT_GLOO();
  auto comm = make_process_group(rank_env(0, 0, 1), "gloo", milliseconds(10'000));
  EXPECT_EQ(comm->size(), 1);
  testing::check_all(*comm);
}

// Rank 2 never calls make_process_group: ranks 0 and 1 fail at the rendezvous within the
// timeout (plus slack for a loaded machine), naming it and the arrivals (rank 0, whose store
// counts them, says "2 of 3"; rank 1 may lose the store when rank 0 gives up first).
TEST(GlooProcessGroup, MissingRankFailsRendezvousWithinTimeout) {
  SKIP_WITHOUT_GLOO();
  const int port = free_port();
  const milliseconds timeout(1'500), slack(3'000);
  const auto exits = run_ranks(3, milliseconds(20'000), [&](int rank) {
    if (rank == 2) return 0;
    return expect_error("rendezvous", timeout + slack, {"rendezvous", "ranks arrived within"},
                        [&] { make_process_group(rank_env(port, rank, 3), "gloo", timeout); });
  });
  expect_all_exit_zero(exits);
}

// Rank 1 dies (SIGKILL) after a barrier: ranks 0 and 2 fail in their next collectives within
// the timeout, and every later call fails at once (the communicator is broken).
TEST(GlooProcessGroup, KilledRankFailsSurvivorsWithinTimeout) {
  SKIP_WITHOUT_GLOO();
  const int port = free_port();
  const milliseconds timeout(2'000), slack(3'000);
  const auto exits = run_ranks(3, milliseconds(20'000), [&](int rank) {
    auto comm = make_process_group(rank_env(port, rank, 3), "gloo", timeout);
    comm->barrier();
    if (rank == 1) raise(SIGKILL);
    const int first = expect_error("all_reduce after a peer died", timeout + slack,
                                   {"gloo all_reduce on rank " + std::to_string(rank)}, [&] {
                                     std::vector<float> x(1000, 1.f);
                                     for (int i = 0; i < 10; ++i)
                                       comm->all_reduce(x.data(), 1000, DType::f32, ReduceOp::sum);
                                   });
    if (first != 0) return first;
    return expect_error("barrier on a broken communicator", milliseconds(100), {"broken"},
                        [&] { comm->barrier(); });
  });
  ASSERT_EQ(exits.size(), 3u);
  EXPECT_EQ(exits[1].signal, SIGKILL);
  for (int rank : {0, 2}) {
    EXPECT_FALSE(exits[rank].overran) << "rank " << rank;
    EXPECT_TRUE(exits[rank].exited && exits[rank].code == 0)
        << "rank " << rank << " exit code " << exits[rank].code << " signal " << exits[rank].signal;
  }
}

// all_to_all counts that disagree between ranks: every rank throws the same mismatch before any
// data moves.
TEST(GlooProcessGroup, MismatchedAllToAllCountsFailOnEveryRank) {
  SKIP_WITHOUT_GLOO();
  const int port = free_port();
  const auto exits = run_ranks(2, milliseconds(20'000), [&](int rank) {
    auto comm = make_process_group(rank_env(port, rank, 2), "gloo", milliseconds(10'000));
    std::vector<float> send(4, 1.f), recv(8);
    const std::vector<int64_t> send_counts = {2, 2};
    const std::vector<int64_t> recv_counts =
        rank == 0 ? std::vector<int64_t>{2, 3} : std::vector<int64_t>{2, 2};
    return expect_error(
        "all_to_all", milliseconds(10'000), {"rank 0 expects 3 elements from rank 1"},
        [&] { comm->all_to_all(send.data(), send_counts, recv.data(), recv_counts, DType::f32); });
  });
  expect_all_exit_zero(exits);
}

TEST(ProcessGroup, UnknownBackendIsAnError) {
  try {
    make_process_group(rank_env(0, 0, 1), "mpi", milliseconds(1'000));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown backend"), std::string::npos) << e.what();
  }
}

TEST(ProcessGroup, BackendNotBuiltNamesWhatIsMissing) {
  for (const std::string backend : {"gloo", "nccl"}) {
    if (process_group_backend_built(backend)) continue;
    try {
      make_process_group(rank_env(0, 0, 1), backend, milliseconds(1'000));
      ADD_FAILURE() << backend << ": no error";
    } catch (const Error& e) {
      const std::string needle = backend == "gloo" ? "libgloo-dev" : "NCCL";
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace fm
