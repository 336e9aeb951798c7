// All-to-all throughput of the CPU communicators: the in-process group (ranks are threads,
// engine/src/inprocess_comm.cpp) and the Gloo process group (ranks are processes forked here,
// TCP on 127.0.0.1). The payload is an MoE dispatch: f32 rows of H = 1024 floats (4 KiB), the
// same number of rows to every peer (plus one skewed case where peer 0 -- a hot expert's rank --
// gets 4x the rows). Rooflines measured by the same program: memcpy (what the in-process
// all_to_all is made of) and one loopback TCP stream (what Gloo's is made of).
//
// Figures, per call (nccl-tests conventions):
//   algbw  bytes in each rank's send buffer (all W blocks, its own included) / time
//   busbw  bytes each rank sends to *other* ranks / time  (= algbw (W-1)/W for equal counts)
//   copy   bytes all ranks move, own blocks included / time (in-process: the memcpy work)
// Time is rank 0's wall time per call; the collective keeps all ranks in step.
//   build/bench/bench_comm_cpu --benchmark_counters_tabular=true
#include <arpa/inet.h>
#include <benchmark/benchmark.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/comm_bench_support.h"
#include "engine/comm.h"
#include "engine/error.h"
#include "engine/process_group.h"

namespace {

using namespace fm::bench;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr int64_t kRowBytes = kRowFloats * 4;
constexpr milliseconds kForkedRunBound(90'000);  // one forked Gloo run, rendezvous to exit

struct RankBuffers {
  std::vector<float> send, recv;
};

RankBuffers make_buffers(const AllToAllCounts& c, int rank) {
  RankBuffers b;
  b.send.assign(static_cast<size_t>(c.send_total(rank)), static_cast<float>(rank + 1));
  b.recv.assign(static_cast<size_t>(c.recv_total(rank)), 0.f);  // touched: no page faults later
  return b;
}

// Args: W, rows per peer, hot (0/1).
void BM_InprocessAllToAll(benchmark::State& state) {
  const int world = static_cast<int>(state.range(0));
  const AllToAllCounts c = dispatch_counts(world, state.range(1), state.range(2) != 0);
  std::vector<RankBuffers> buffers;
  for (int r = 0; r < world; ++r) buffers.push_back(make_buffers(c, r));
  run_inprocess(state, world, [&](int rank, fm::Communicator& comm) {
    comm.all_to_all(buffers[rank].send.data(), c.send[rank], buffers[rank].recv.data(),
                    c.recv[rank], fm::DType::f32);
  });
  set_all_to_all_counters(state, c, world);
}

// Args: W, floats.
void BM_InprocessAllReduce(benchmark::State& state) {
  const int world = static_cast<int>(state.range(0));
  const int64_t floats = state.range(1);
  std::vector<std::vector<float>> data(world, std::vector<float>(static_cast<size_t>(floats), 1.f));
  run_inprocess(state, world, [&](int rank, fm::Communicator& comm) {
    comm.all_reduce(data[rank].data(), floats, fm::DType::f32, fm::ReduceOp::sum);
  });
  set_all_reduce_counters(state, world, floats);
}

// ---------------------------------------------------------------------------------------------
// Gloo group: W forked processes meet at a store on 127.0.0.1. Each run: rendezvous, 3 warm-up
// calls timed by rank 0, which picks a call count worth ~0.25 s and broadcasts it; a barrier;
// the timed calls; rank 0 writes its seconds per call into a pipe. The parent waits at most
// kForkedRunBound, kills what is left, reaps every child, and reports any failure by rank.

// A port that was free a moment ago on 127.0.0.1.
int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  const bool ok = fd >= 0 && bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  if (fd >= 0) close(fd);
  return ok ? ntohs(addr.sin_port) : 0;
}

// What one rank calls, made in the child once its rank is known (so buffers are per process).
using RankCall = std::function<void(fm::Communicator&)>;
using MakeRankCall = std::function<RankCall(int rank)>;

struct TimedCalls {
  double seconds_per_call = 0;
  int64_t calls = 0;
};

// One child: rendezvous, warm up, time. Rank 0 writes a TimedCalls to `out_fd`.
TimedCalls time_calls_in_group(int port, int rank, int world, const MakeRankCall& make_call) {
  fm::DistEnv env;
  env.master_port = port;
  env.rank = env.local_rank = rank;
  env.world_size = env.local_world_size = world;
  env.source = "bench";
  auto comm = fm::make_process_group(env, "gloo", kCommTimeout);
  const RankCall call = make_call(rank);
  const auto warm_start = Clock::now();
  for (int i = 0; i < 3; ++i) call(*comm);
  const double warm = std::chrono::duration<double>(Clock::now() - warm_start).count() / 3;
  int64_t calls = std::clamp<int64_t>(static_cast<int64_t>(0.25 / std::max(warm, 1e-7)), 5, 20000);
  comm->broadcast(&calls, 1, fm::DType::i64, 0);
  comm->barrier();
  const auto start = Clock::now();
  for (int64_t i = 0; i < calls; ++i) call(*comm);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  comm->barrier();  // nobody tears down while a peer still finishes its last call
  return {seconds / static_cast<double>(calls), calls};
}

// Forks `world` ranks running `call`; returns rank 0's timing, or throws fm::Error naming the
// rank that failed (its own message is on stderr).
TimedCalls run_forked_gloo(int world, const MakeRankCall& make_call) {
  const int port = free_port();
  FM_CHECK(port != 0, "no free port on 127.0.0.1: {}", std::strerror(errno));
  int pipe_fds[2];
  FM_CHECK(pipe(pipe_fds) == 0, "pipe: {}", std::strerror(errno));
  std::fflush(nullptr);
  std::vector<pid_t> pids(world, -1);
  for (int rank = 0; rank < world; ++rank) {
    const pid_t pid = fork();
    if (pid == 0) {
      close(pipe_fds[0]);
      int code = 1;
      try {
        const TimedCalls t = time_calls_in_group(port, rank, world, make_call);
        if (rank == 0 && write(pipe_fds[1], &t, sizeof t) != static_cast<ssize_t>(sizeof t))
          throw fm::Error(fmt::format("writing the result pipe: {}", std::strerror(errno)));
        code = 0;
      } catch (const std::exception& e) {
        std::fprintf(stderr, "gloo rank %d of %d: %s\n", rank, world, e.what());
      }
      std::fflush(nullptr);
      _exit(code);
    }
    pids[rank] = pid;  // a failed fork leaves -1: reported below
  }
  close(pipe_fds[1]);

  // Rank 0's result, or end of file when every writer is gone, or the deadline.
  const auto deadline = Clock::now() + kForkedRunBound;
  TimedCalls result;
  size_t got = 0;
  while (got < sizeof result && Clock::now() < deadline) {
    pollfd p{pipe_fds[0], POLLIN, 0};
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
    if (poll(&p, 1, static_cast<int>(std::max<int64_t>(left, 1))) <= 0) continue;
    const ssize_t n =
        read(pipe_fds[0], reinterpret_cast<char*>(&result) + got, sizeof result - got);
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  close(pipe_fds[0]);

  // Reap every child; whoever is still running at the deadline is killed.
  std::string failure;
  for (int rank = 0; rank < world; ++rank) {
    if (pids[rank] < 0) {
      if (failure.empty()) failure = fmt::format("fork of rank {} failed", rank);
      continue;
    }
    int status = 0;
    pid_t done = 0;
    while ((done = waitpid(pids[rank], &status, WNOHANG)) == 0 && Clock::now() < deadline)
      std::this_thread::sleep_for(milliseconds(10));
    if (done == 0) {
      kill(pids[rank], SIGKILL);
      waitpid(pids[rank], &status, 0);
      if (failure.empty())
        failure = fmt::format("rank {} still running after {} s: killed", rank,
                              kForkedRunBound.count() / 1000);
    } else if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0) && failure.empty()) {
      failure = WIFEXITED(status)
                    ? fmt::format("rank {} exited with code {} (its error is on stderr)", rank,
                                  WEXITSTATUS(status))
                    : fmt::format("rank {} killed by signal {}", rank, WTERMSIG(status));
    }
  }
  if (failure.empty() && got != sizeof result) failure = "rank 0 reported no timing";
  FM_CHECK(failure.empty(), "gloo group of {} on 127.0.0.1:{}: {}", world, port, failure);
  return result;
}

// Runs the forked group once and reports rank 0's seconds per call as the manual time.
void report_forked_gloo(benchmark::State& state, int world, const MakeRankCall& make_call) {
  if (!fm::process_group_backend_built("gloo")) {
    state.SkipWithError("built without Gloo (apt-get install libgloo-dev)");
    return;
  }
  for (auto _ : state) {
    try {
      const TimedCalls t = run_forked_gloo(world, make_call);
      state.SetIterationTime(t.seconds_per_call);
      state.counters["calls"] = static_cast<double>(t.calls);
    } catch (const std::exception& e) {
      state.SkipWithError(e.what());
      break;
    }
  }
}

// Args: W, rows per peer, hot (0/1).
void BM_GlooAllToAll(benchmark::State& state) {
  const int world = static_cast<int>(state.range(0));
  const AllToAllCounts c = dispatch_counts(world, state.range(1), state.range(2) != 0);
  report_forked_gloo(state, world, [&c](int rank) -> RankCall {
    auto b = std::make_shared<RankBuffers>(make_buffers(c, rank));
    return [&c, b, rank](fm::Communicator& comm) {
      comm.all_to_all(b->send.data(), c.send[rank], b->recv.data(), c.recv[rank], fm::DType::f32);
    };
  });
  set_all_to_all_counters(state, c, world);
}

// Args: W, floats.
void BM_GlooAllReduce(benchmark::State& state) {
  const int world = static_cast<int>(state.range(0));
  const int64_t floats = state.range(1);
  report_forked_gloo(state, world, [floats](int) -> RankCall {
    auto data = std::make_shared<std::vector<float>>(static_cast<size_t>(floats), 1.f);
    return [floats, data](fm::Communicator& comm) {
      comm.all_reduce(data->data(), floats, fm::DType::f32, fm::ReduceOp::sum);
    };
  });
  set_all_reduce_counters(state, world, floats);
}

// ---------------------------------------------------------------------------------------------
// Rooflines.

// memcpy of `bytes` from one buffer to another; with ->Threads(2) each thread copies its own
// pair and the rate is the sum (both cores).
void BM_Memcpy(benchmark::State& state) {
  const size_t bytes = static_cast<size_t>(state.range(0));
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.counters["KiB"] =
      benchmark::Counter(static_cast<double>(bytes) / 1024, benchmark::Counter::kAvgThreads);
  state.counters["copy_GB/s"] = benchmark::Counter(static_cast<double>(bytes) * 1e-9,
                                                   benchmark::Counter::kIsIterationInvariantRate);
}

// One TCP stream over 127.0.0.1: a thread sends `bytes`-sized messages as fast as it can, the
// benchmark thread receives one message per iteration.
void BM_LoopbackTcpStream(benchmark::State& state) {
  const size_t bytes = static_cast<size_t>(state.range(0));
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  const int sender = socket(AF_INET, SOCK_STREAM, 0);
  if (listener < 0 || sender < 0 ||
      bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      listen(listener, 1) != 0 ||
      getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
      connect(sender, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    state.SkipWithError((std::string("loopback socket setup: ") + std::strerror(errno)).c_str());
    if (listener >= 0) close(listener);
    if (sender >= 0) close(sender);
    return;
  }
  const int receiver = accept(listener, nullptr, nullptr);
  close(listener);
  std::thread send_loop([&] {
    std::vector<char> msg(bytes, 1);
    for (;;) {  // until the receiver closes its end
      size_t off = 0;
      while (off < bytes) {
        const ssize_t n = send(sender, msg.data() + off, bytes - off, MSG_NOSIGNAL);
        if (n <= 0) return;
        off += static_cast<size_t>(n);
      }
    }
  });
  std::vector<char> msg(bytes);
  bool ok = receiver >= 0;
  for (auto _ : state) {
    size_t off = 0;
    while (ok && off < bytes) {
      const ssize_t n = recv(receiver, msg.data() + off, bytes - off, 0);
      ok = n > 0;
      off += ok ? static_cast<size_t>(n) : 0;
    }
    if (!ok) {
      state.SkipWithError((std::string("loopback recv: ") + std::strerror(errno)).c_str());
      break;
    }
  }
  if (receiver >= 0) {
    shutdown(receiver, SHUT_RDWR);
    close(receiver);
  }
  shutdown(sender, SHUT_RDWR);  // wakes a sender blocked in send()
  send_loop.join();
  close(sender);
  state.counters["KiB"] = static_cast<double>(bytes) / 1024;
  state.counters["stream_GB/s"] = benchmark::Counter(static_cast<double>(bytes) * 1e-9,
                                                     benchmark::Counter::kIsIterationInvariantRate);
}

// Rows per peer: 1 (4 KiB) to 4096 (16 MiB), x4 apart.
void all_to_all_sizes(benchmark::internal::Benchmark* b, const std::vector<int>& worlds) {
  for (int world : worlds)
    for (int64_t rows = 1; rows <= 4096; rows *= 4) b->Args({world, rows, 0});
  b->Args({4, 256, 1});  // skewed: peer 0 gets 4x the 1 MiB blocks
}

}  // namespace

BENCHMARK(BM_Memcpy)
    ->RangeMultiplier(4)
    ->Range(4 << 10, 64 << 20)
    ->Threads(1)
    ->Threads(2)
    ->UseRealTime()
    ->MinTime(0.2);
BENCHMARK(BM_LoopbackTcpStream)
    ->Arg(64 << 10)
    ->Arg(1 << 20)
    ->Arg(16 << 20)
    ->UseRealTime()
    ->MinTime(0.3);
BENCHMARK(BM_InprocessAllToAll)
    ->Apply([](benchmark::internal::Benchmark* b) {
      all_to_all_sizes(b, {2, 4, 8});
    })
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime()
    ->MinTime(0.3);
BENCHMARK(BM_InprocessAllReduce)
    ->Args({2, 1 << 20})
    ->Args({4, 1 << 20})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime()
    ->MinTime(0.3);
BENCHMARK(BM_GlooAllToAll)
    ->Apply([](benchmark::internal::Benchmark* b) {
      all_to_all_sizes(b, {2, 4});
    })
    ->Unit(benchmark::kMicrosecond)
    ->UseManualTime()
    ->Iterations(1);
BENCHMARK(BM_GlooAllReduce)
    ->Args({2, 1 << 20})
    ->Args({4, 1 << 20})
    ->Unit(benchmark::kMicrosecond)
    ->UseManualTime()
    ->Iterations(1);

BENCHMARK_MAIN();
