// The in-process communicator on device buffers: several virtual ranks (threads) sharing one
// GPU. Every test skips without a visible CUDA device (and in builds without CUDA).
//
// (The conformance suite on device buffers runs in comm_test.cpp, through
// support/device_staged_comm.h.)
// - Device reductions are bit-identical to the host path for f32 sums of normal values
//   (which depend on the order of the additions), at W = 4 and at W = 40 (more ranks than
//   one reduction launch takes, so launches chain).
// - Host and device buffers mixed in one collective (across ranks, or send and recv of one
//   call) fail on every rank with a message naming both places, never silent corruption.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "engine/backend.h"
#include "engine/comm.h"
#include "engine/error.h"
#include "engine/rng.h"
#include "engine/tensor.h"

namespace fm {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;

constexpr auto kTimeout = 60s;

#define SKIP_WITHOUT_GPU() \
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible: device in-process comm not run"

// all_reduce and reduce_scatter of f32 normal values (order-dependent sums) on host buffers
// and on device buffers: the two paths must agree bit for bit.
void expect_device_sums_match_host(int world) {
  constexpr int kCount = 100'003;
  std::vector<std::vector<float>> inputs(world, std::vector<float>(kCount));
  for (int r = 0; r < world; ++r) Rng(11, r).normal(inputs[r].data(), kCount);
  std::vector<std::vector<float>> host_sum(world), device_sum(world), device_scatter(world);
  run_inprocess(world, kTimeout, [&](int rank, Communicator& comm) {
    host_sum[rank] = inputs[rank];
    comm.all_reduce(host_sum[rank].data(), kCount, DType::f32, ReduceOp::sum);

    auto gpu = make_cuda_backend(0);
    Tensor x = gpu->empty({kCount}, DType::f32);
    gpu->copy(x, Tensor::view(inputs[rank].data(), {kCount}, DType::f32));
    gpu->synchronize();
    comm.all_reduce(x.raw(), kCount, DType::f32, ReduceOp::sum);
    device_sum[rank].resize(kCount);
    Tensor sum_host = Tensor::view(device_sum[rank].data(), {kCount}, DType::f32);
    gpu->copy(sum_host, x);

    // reduce_scatter: every rank sends its input as each peer's block.
    Tensor send = gpu->empty({static_cast<int64_t>(kCount) * world}, DType::f32);
    std::vector<float> send_host(static_cast<size_t>(kCount) * world);
    for (int p = 0; p < world; ++p)
      std::memcpy(send_host.data() + static_cast<size_t>(p) * kCount, inputs[rank].data(),
                  kCount * sizeof(float));
    gpu->copy(send, Tensor::view(send_host.data(), {static_cast<int64_t>(send_host.size())},
                                 DType::f32));  // host -> device waits for the copy
    Tensor recv = gpu->empty({kCount}, DType::f32);
    gpu->synchronize();
    comm.reduce_scatter(send.raw(), recv.raw(), kCount, DType::f32, ReduceOp::sum);
    device_scatter[rank].resize(kCount);
    Tensor scatter_host = Tensor::view(device_scatter[rank].data(), {kCount}, DType::f32);
    gpu->copy(scatter_host, recv);
    gpu->synchronize();
  });
  for (int r = 0; r < world; ++r) {
    ASSERT_EQ(std::memcmp(device_sum[r].data(), host_sum[r].data(), kCount * sizeof(float)), 0)
        << "all_reduce at W = " << world << ", rank " << r;
    ASSERT_EQ(std::memcmp(device_scatter[r].data(), host_sum[r].data(), kCount * sizeof(float)), 0)
        << "reduce_scatter at W = " << world << ", rank " << r;
  }
}

TEST(DeviceInProcessComm, F32SumsAreBitIdenticalToTheHostPath) {
  SKIP_WITHOUT_GPU();
  expect_device_sums_match_host(4);
}

TEST(DeviceInProcessComm, ManyRanksChainReductionLaunchesInRankOrder) {
  SKIP_WITHOUT_GPU();
  expect_device_sums_match_host(40);  // > kReduceMaxInputs (32) inputs per launch
}

// Rank 0 passes device memory, rank 1 host memory: both ranks fail naming both places.
TEST(DeviceInProcessComm, HostAndDeviceRanksInOneCollectiveFailOnEveryRank) {
  SKIP_WITHOUT_GPU();
  auto comms = make_inprocess_group(2, kTimeout);
  std::vector<std::string> errors(2);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < 2; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        std::vector<float> host(16, 1.f);
        auto gpu = make_cuda_backend(0);
        Tensor dev = gpu->zeros({16}, DType::f32);
        gpu->synchronize();
        comms[rank]->all_reduce(rank == 0 ? dev.raw() : host.data(), 16, DType::f32, ReduceOp::sum);
      } catch (const std::exception& e) {
        errors[rank] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int rank = 0; rank < 2; ++rank) {
    EXPECT_THAT(errors[rank], HasSubstr("rank 0 passes device memory (cuda:0), rank 1 passes "
                                        "host memory"))
        << "rank " << rank;
  }
}

TEST(DeviceInProcessComm, SendAndRecvInDifferentMemoryIsAnError) {
  SKIP_WITHOUT_GPU();
  auto comms = make_inprocess_group(1, kTimeout);
  auto gpu = make_cuda_backend(0);
  Tensor dev = gpu->zeros({4}, DType::i32);
  gpu->synchronize();
  std::vector<int32_t> host(4, 0);
  try {
    comms[0]->all_gather(dev.raw(), host.data(), 4, DType::i32);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("send is in device memory (cuda:0) and recv in host memory"));
  }
}

}  // namespace
}  // namespace fm
