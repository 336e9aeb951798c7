// The NCCL process group at one rank (a GPU and one process): every collective on device
// buffers, and on host buffers (staged through the device), against expected values. Skips without
// NCCL in the build or without a CUDA device. Multi-rank NCCL runs need one process per GPU (e.g.
// `foremoe launch`), not this suite.
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <vector>

#include "engine/backend.h"
#include "engine/error.h"
#include "engine/process_group.h"
#include "engine/tensor.h"

namespace fm {
namespace {

using std::chrono::milliseconds;

// Host values -> a device tensor; device tensor -> host values.
template <class T>
Tensor to_device(Backend& gpu, std::vector<T> host) {
  Tensor h = Tensor::view(host.data(), {static_cast<int64_t>(host.size())}, dtype_of<T>::value);
  Tensor d = gpu.empty(h.shape(), h.dtype());
  gpu.copy(d, h);
  gpu.synchronize();
  return d;
}
template <class T>
std::vector<T> to_host(Backend& gpu, const Tensor& d) {
  std::vector<T> host(static_cast<size_t>(d.numel()));
  Tensor h = Tensor::view(host.data(), d.shape(), d.dtype());
  gpu.copy(h, d);
  gpu.synchronize();
  return host;
}

TEST(NcclProcessGroup, SingleRankCollectivesOnDeviceBuffers) {
  if (!process_group_backend_built("nccl")) GTEST_SKIP() << "built without NCCL";
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  auto gpu = make_cuda_backend(0);
  DistEnv env;  // rank 0 of 1, store on a free port of 127.0.0.1
  auto comm = make_process_group(env, "nccl", milliseconds(30'000));
  ASSERT_EQ(comm->size(), 1);
  ASSERT_STREQ(comm->backend_name(), "nccl");

  // One rank: all_reduce, all_gather, reduce_scatter, broadcast and all_to_all are copies (or
  // identities) of the input, exactly.
  const std::vector<float> xf = {1.5f, -2.25f, 3.f, 1e6f, -0.5f};
  Tensor a = to_device(*gpu, xf);
  comm->all_reduce(a.raw(), 5, DType::f32, ReduceOp::sum);
  EXPECT_EQ(to_host<float>(*gpu, a), xf);
  comm->all_reduce(a.raw(), 5, DType::f32, ReduceOp::max);
  EXPECT_EQ(to_host<float>(*gpu, a), xf);

  const std::vector<int64_t> xi = {int64_t{1} << 40, -7, 0, 123456789012345};
  Tensor b = to_device(*gpu, xi);
  comm->all_reduce(b.raw(), 4, DType::i64, ReduceOp::sum);
  EXPECT_EQ(to_host<int64_t>(*gpu, b), xi);

  const std::vector<double> xd = {0.125, -3.5, 7.0};
  Tensor src = to_device(*gpu, xd), dst = to_device(*gpu, std::vector<double>(3, -1.0));
  comm->all_gather(src.raw(), dst.raw(), 3, DType::f64);
  EXPECT_EQ(to_host<double>(*gpu, dst), xd);
  Tensor rs = to_device(*gpu, std::vector<double>(3, -1.0));
  comm->reduce_scatter(src.raw(), rs.raw(), 3, DType::f64, ReduceOp::sum);
  EXPECT_EQ(to_host<double>(*gpu, rs), xd);

  const std::vector<int32_t> xs = {4, 5, 6, 7};
  Tensor c = to_device(*gpu, xs);
  comm->broadcast(c.raw(), 4, DType::i32, 0);
  EXPECT_EQ(to_host<int32_t>(*gpu, c), xs);
  Tensor t = to_device(*gpu, std::vector<int32_t>(4, -1));
  comm->all_to_all(c.raw(), {4}, t.raw(), {4}, DType::i32);
  EXPECT_EQ(to_host<int32_t>(*gpu, t), xs);

  comm->barrier();
  // Bad arguments are errors that name the call, and break the communicator.
  EXPECT_THROW(comm->broadcast(c.raw(), 4, DType::i32, 1), Error);
  EXPECT_THROW(comm->barrier(), Error);
}

// Host buffers go through the communicator's device staging (the trainers' metrics and loads
// are host vectors): every collective on host memory, mixed host/device pairs, and a staging
// buffer that must grow (8 MiB), exactly.
TEST(NcclProcessGroup, SingleRankCollectivesOnHostBuffers) {
  if (!process_group_backend_built("nccl")) GTEST_SKIP() << "built without NCCL";
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  auto gpu = make_cuda_backend(0);
  DistEnv env;
  auto comm = make_process_group(env, "nccl", milliseconds(30'000));

  std::vector<double> xd = {0.125, -3.5, 7.0};
  const std::vector<double> want = xd;
  comm->all_reduce(xd.data(), 3, DType::f64, ReduceOp::sum);
  EXPECT_EQ(xd, want);
  std::vector<int64_t> n = {41};
  comm->all_reduce(n.data(), 1, DType::i64, ReduceOp::max);
  EXPECT_EQ(n[0], 41);

  std::vector<double> gathered(3, -1.0), scattered(3, -1.0);
  comm->all_gather(xd.data(), gathered.data(), 3, DType::f64);
  EXPECT_EQ(gathered, want);
  comm->reduce_scatter(xd.data(), scattered.data(), 3, DType::f64, ReduceOp::sum);
  EXPECT_EQ(scattered, want);

  std::vector<int32_t> xs = {4, 5, 6, 7}, out(4, -1);
  comm->broadcast(xs.data(), 4, DType::i32, 0);
  EXPECT_EQ(xs, (std::vector<int32_t>{4, 5, 6, 7}));
  comm->all_to_all(xs.data(), {4}, out.data(), {4}, DType::i32);
  EXPECT_EQ(out, xs);

  // Host send, device recv, and the reverse.
  Tensor dev = to_device(*gpu, std::vector<int32_t>(4, -1));
  comm->all_to_all(xs.data(), {4}, dev.raw(), {4}, DType::i32);
  EXPECT_EQ(to_host<int32_t>(*gpu, dev), xs);
  std::vector<int32_t> back(4, -1);
  comm->all_gather(dev.raw(), back.data(), 4, DType::i32);
  EXPECT_EQ(back, xs);

  // 8 MiB: larger than the first staging buffer.
  std::vector<float> big(size_t{2} << 20);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>(i % 1000) - 500.f;
  const std::vector<float> big_want = big;
  comm->all_reduce(big.data(), static_cast<int64_t>(big.size()), DType::f32, ReduceOp::sum);
  EXPECT_EQ(big, big_want);
  comm->barrier();
}

}  // namespace
}  // namespace fm
