// What the communicator benchmarks share (bench_comm_cpu.cpp, bench_comm_gpu.cpp): the MoE
// dispatch shape of an all_to_all, the nccl-tests style counters, and the harness that runs an
// in-process group's collective with rank 0 as Google Benchmark's timing thread.
#pragma once

#include <benchmark/benchmark.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "engine/comm.h"

namespace fm::bench {

using std::chrono::milliseconds;

inline constexpr int64_t kRowFloats = 1024;          // H: one token's hidden state, 4 KiB of f32
inline constexpr milliseconds kCommTimeout(30'000);  // every collective call

// Per-rank all_to_all element counts of one shape: rank r sends counts.send[r][p] to peer p.
struct AllToAllCounts {
  std::vector<std::vector<int64_t>> send, recv;
  int64_t send_total(int rank) const { return sum(send[rank]); }
  int64_t recv_total(int rank) const { return sum(recv[rank]); }
  // Elements all ranks send to other ranks (own blocks excluded).
  int64_t crossing_total() const {
    int64_t total = 0;
    for (size_t r = 0; r < send.size(); ++r) total += sum(send[r]) - send[r][r];
    return total;
  }
  static int64_t sum(const std::vector<int64_t>& v) {
    int64_t total = 0;
    for (int64_t x : v) total += x;
    return total;
  }
};

// `rows` rows of H floats to every peer; with `hot`, peer 0 gets 4x the rows from everyone.
inline AllToAllCounts dispatch_counts(int world, int64_t rows, bool hot) {
  AllToAllCounts c;
  c.send.assign(world, std::vector<int64_t>(world));
  c.recv.assign(world, std::vector<int64_t>(world));
  for (int r = 0; r < world; ++r)
    for (int p = 0; p < world; ++p) c.send[r][p] = rows * kRowFloats * (hot && p == 0 ? 4 : 1);
  for (int r = 0; r < world; ++r)
    for (int p = 0; p < world; ++p) c.recv[r][p] = c.send[p][r];
  return c;
}

inline void set_all_to_all_counters(benchmark::State& state, const AllToAllCounts& c, int world) {
  const double send_bytes = static_cast<double>(c.send_total(0)) * 4;
  const double crossing_bytes = static_cast<double>(c.crossing_total()) * 4 / world;
  double moved_bytes = 0;
  for (int r = 0; r < world; ++r) moved_bytes += static_cast<double>(c.send_total(r)) * 4;
  const auto rate = benchmark::Counter::kIsIterationInvariantRate;
  state.counters["W"] = world;
  state.counters["KiB/peer"] = static_cast<double>(c.send[0].back()) * 4 / 1024;
  state.counters["algbw_GB/s"] = benchmark::Counter(send_bytes * 1e-9, rate);
  state.counters["busbw_GB/s"] = benchmark::Counter(crossing_bytes * 1e-9, rate);
  state.counters["copy_GB/s"] = benchmark::Counter(moved_bytes * 1e-9, rate);
}

// ---------------------------------------------------------------------------------------------
// In-process group: rank 0 is the benchmark thread, ranks 1..W-1 are helper threads that call
// the same collective until rank 0 says which call is the last. Rank 0 stores that index before
// it enters the call, and a helper reads it after the call returns -- which it cannot do before
// rank 0 has arrived -- so every helper makes exactly the calls rank 0 makes.

inline void run_inprocess(benchmark::State& state, int world,
                          const std::function<void(int rank, fm::Communicator&)>& call) {
  auto comms = fm::make_inprocess_group(world, kCommTimeout);
  std::atomic<int64_t> last_call{std::numeric_limits<int64_t>::max()};
  std::vector<std::string> errors(world);
  std::vector<std::thread> helpers;
  for (int rank = 1; rank < world; ++rank) {
    helpers.emplace_back([&, rank] {
      try {
        for (int64_t i = 0;; ++i) {
          call(rank, *comms[rank]);
          if (i == last_call.load()) break;
        }
      } catch (const std::exception& e) {
        errors[rank] = e.what();
        fm::abort_group(*comms[rank], e.what());
      }
    });
  }
  try {
    int64_t calls = 0;
    for (auto _ : state) {
      call(0, *comms[0]);
      ++calls;
    }
    last_call.store(calls);  // the untimed call below is the last one
    call(0, *comms[0]);
  } catch (const std::exception& e) {
    errors[0] = e.what();
    fm::abort_group(*comms[0], e.what());
  }
  for (auto& t : helpers) t.join();
  for (int rank = 0; rank < world; ++rank) {
    if (!errors[rank].empty()) {
      state.SkipWithError(("rank " + std::to_string(rank) + ": " + errors[rank]).c_str());
      return;
    }
  }
}

// all_reduce of `floats` f32 in place; busbw = 2 (W-1)/W bytes / time (nccl-tests).
inline void set_all_reduce_counters(benchmark::State& state, int world, int64_t floats) {
  const double bytes = static_cast<double>(floats) * 4;
  const auto rate = benchmark::Counter::kIsIterationInvariantRate;
  state.counters["W"] = world;
  state.counters["KiB"] = bytes / 1024;
  state.counters["algbw_GB/s"] = benchmark::Counter(bytes * 1e-9, rate);
  state.counters["busbw_GB/s"] = benchmark::Counter(bytes * 2 * (world - 1) / world * 1e-9, rate);
}

}  // namespace fm::bench
