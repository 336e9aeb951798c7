// The communicators on one GPU: the in-process group with device buffers (W virtual ranks,
// threads sharing the GPU; engine/src/inprocess_comm.cpp + engine/cuda/comm_device.cpp) and the
// NCCL process group at one rank (a sanity check: a single-rank NCCL collective is a device copy
// and must run near the copy roofline). Without a visible GPU every case reports
// "no CUDA GPU visible" and nothing is measured.
//
// Payload as in bench_comm_cpu: an MoE dispatch of f32 rows of H = 1024 floats, the same rows to
// every peer (plus a skewed case). Figures per call (nccl-tests conventions, see
// bench/comm_bench_support.h): algbw, busbw, and copy_GB/s = bytes all ranks move / time, which
// for the in-process group is device-to-device copy work and is compared with the roofline
// measured here, BM_DeviceCopy: one cudaMemcpy device -> device of the same size (each byte is
// read and written once, so HBM traffic is twice the copy rate).
//   build/bench/bench_comm_gpu --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <memory>
#include <string>
#include <vector>

#include "bench/comm_bench_support.h"
#include "engine/backend.h"
#include "engine/comm.h"
#include "engine/dist_env.h"
#include "engine/error.h"
#include "engine/process_group.h"
#include "engine/tensor.h"

namespace {

using namespace fm::bench;

bool skip_without_gpu(benchmark::State& state) {
  if (fm::cuda_available()) return false;
  state.SkipWithError("no CUDA GPU visible: nothing measured");
  return true;
}

// Device buffers of every rank, all on GPU 0 (one backend per rank, as virtual ranks have).
struct DeviceRank {
  std::unique_ptr<fm::Backend> gpu;
  fm::Tensor send, recv;
};

std::vector<DeviceRank> device_ranks(const AllToAllCounts& c, int world) {
  std::vector<DeviceRank> ranks(world);
  for (int r = 0; r < world; ++r) {
    ranks[r].gpu = fm::make_cuda_backend(0);
    ranks[r].send = ranks[r].gpu->empty({std::max<int64_t>(c.send_total(r), 1)}, fm::DType::f32);
    ranks[r].recv = ranks[r].gpu->empty({std::max<int64_t>(c.recv_total(r), 1)}, fm::DType::f32);
    ranks[r].gpu->fill(ranks[r].send, r + 1);
    ranks[r].gpu->fill(ranks[r].recv, 0);
    ranks[r].gpu->synchronize();
  }
  return ranks;
}

// Whether rank r's recv block from peer p holds p + 1 everywhere (checked once, untimed).
std::string check_all_to_all_result(const AllToAllCounts& c, std::vector<DeviceRank>& ranks) {
  for (size_t r = 0; r < ranks.size(); ++r) {
    const std::vector<double> got = ranks[r].gpu->download_f64(ranks[r].recv);
    int64_t at = 0;
    for (size_t p = 0; p < ranks.size(); ++p) {
      for (int64_t i = 0; i < c.recv[r][p]; ++i, ++at) {
        if (got[at] != static_cast<double>(p + 1))
          return "rank " + std::to_string(r) + " got a wrong element from peer " +
                 std::to_string(p);
      }
    }
  }
  return "";
}

// Args: bytes.
void BM_DeviceCopy(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  auto gpu = fm::make_cuda_backend(0);
  const int64_t floats = state.range(0) / 4;
  fm::Tensor src = gpu->empty({floats}, fm::DType::f32), dst = gpu->empty({floats}, fm::DType::f32);
  gpu->fill(src, 1);
  gpu->synchronize();
  for (auto _ : state) {
    gpu->copy(dst, src);
    gpu->synchronize();
  }
  state.counters["copy_GB/s"] = benchmark::Counter(static_cast<double>(state.range(0)) * 1e-9,
                                                   benchmark::Counter::kIsIterationInvariantRate);
}

// Args: W, rows per peer, hot (0/1).
void BM_InprocessDeviceAllToAll(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  const int world = static_cast<int>(state.range(0));
  const AllToAllCounts c = dispatch_counts(world, state.range(1), state.range(2) != 0);
  std::vector<DeviceRank> ranks = device_ranks(c, world);
  run_inprocess(state, world, [&](int rank, fm::Communicator& comm) {
    comm.all_to_all(ranks[rank].send.raw(), c.send[rank], ranks[rank].recv.raw(), c.recv[rank],
                    fm::DType::f32);
  });
  if (const std::string bad = check_all_to_all_result(c, ranks); !bad.empty())
    state.SkipWithError(bad.c_str());
  set_all_to_all_counters(state, c, world);
}

// Args: W, floats.
void BM_InprocessDeviceAllReduce(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  const int world = static_cast<int>(state.range(0));
  const int64_t floats = state.range(1);
  std::vector<DeviceRank> ranks(world);
  for (int r = 0; r < world; ++r) {
    ranks[r].gpu = fm::make_cuda_backend(0);
    ranks[r].send = ranks[r].gpu->empty({floats}, fm::DType::f32);
    ranks[r].gpu->fill(ranks[r].send, 0);
    ranks[r].gpu->synchronize();
  }
  run_inprocess(state, world, [&](int rank, fm::Communicator& comm) {
    comm.all_reduce(ranks[rank].send.raw(), floats, fm::DType::f32, fm::ReduceOp::sum);
  });
  set_all_reduce_counters(state, world, floats);
}

// NCCL at one rank (this process, a store on a free loopback port): the collective is a device
// copy; its rate against BM_DeviceCopy is the sanity check. Args: floats.
std::unique_ptr<fm::Communicator> single_rank_nccl(benchmark::State& state) {
  if (skip_without_gpu(state)) return nullptr;
  if (!fm::process_group_backend_built("nccl")) {
    state.SkipWithError("this build has no NCCL: nothing measured");
    return nullptr;
  }
  return fm::make_process_group(fm::DistEnv{}, "nccl", kCommTimeout);
}

void BM_NcclSingleRankAllToAll(benchmark::State& state) {
  auto comm = single_rank_nccl(state);
  if (!comm) return;
  auto gpu = fm::make_cuda_backend(0);
  const int64_t floats = state.range(0);
  fm::Tensor send = gpu->empty({floats}, fm::DType::f32),
             recv = gpu->empty({floats}, fm::DType::f32);
  gpu->fill(send, 3);
  gpu->fill(recv, 0);
  gpu->synchronize();
  for (auto _ : state) comm->all_to_all(send.raw(), {floats}, recv.raw(), {floats}, fm::DType::f32);
  const std::vector<double> got = gpu->download_f64(recv);
  for (double v : got) {
    if (v != 3.0) {
      state.SkipWithError("nccl all_to_all at one rank did not copy its input");
      return;
    }
  }
  state.counters["copy_GB/s"] = benchmark::Counter(static_cast<double>(floats) * 4e-9,
                                                   benchmark::Counter::kIsIterationInvariantRate);
}

void BM_NcclSingleRankAllReduce(benchmark::State& state) {
  auto comm = single_rank_nccl(state);
  if (!comm) return;
  auto gpu = fm::make_cuda_backend(0);
  const int64_t floats = state.range(0);
  fm::Tensor data = gpu->empty({floats}, fm::DType::f32);
  gpu->fill(data, 2);
  gpu->synchronize();
  for (auto _ : state) comm->all_reduce(data.raw(), floats, fm::DType::f32, fm::ReduceOp::sum);
  const std::vector<double> got = gpu->download_f64(data);
  for (double v : got) {
    if (v != 2.0) {
      state.SkipWithError("nccl all_reduce at one rank changed its input");
      return;
    }
  }
  set_all_reduce_counters(state, 1, floats);
}

void all_to_all_sizes(benchmark::internal::Benchmark* b, const std::vector<int>& worlds) {
  for (int world : worlds)
    for (int64_t rows = 4; rows <= 4096; rows *= 4) b->Args({world, rows, 0});
  b->Args({4, 1024, 1});  // skewed: peer 0 gets 4x the 4 MiB blocks
}

}  // namespace

BENCHMARK(BM_DeviceCopy)
    ->RangeMultiplier(4)
    ->Range(64 << 10, 256 << 20)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_InprocessDeviceAllToAll)
    ->Apply([](benchmark::internal::Benchmark* b) {
      all_to_all_sizes(b, {2, 4, 8});
    })
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime()
    ->MinTime(0.3);
BENCHMARK(BM_InprocessDeviceAllReduce)
    ->Args({2, 1 << 20})
    ->Args({4, 1 << 20})
    ->Args({8, 1 << 24})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime()
    ->MinTime(0.3);
BENCHMARK(BM_NcclSingleRankAllToAll)
    ->RangeMultiplier(16)
    ->Range(1 << 14, 1 << 26)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_NcclSingleRankAllReduce)
    ->RangeMultiplier(16)
    ->Range(1 << 14, 1 << 26)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

BENCHMARK_MAIN();
