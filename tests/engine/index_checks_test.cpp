// Backend::set_device_index_checks and IndexChecksOff: the scope turns a device backend's
// index checks off and restores the previous state (nested scopes too); the CPU backend checks
// whatever the switch says. The CUDA case skips without a GPU.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <vector>

#include "engine/backend.h"
#include "engine/error.h"

namespace fm {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

Tensor ids(Backend& b, const std::vector<int32_t>& v) {
  return b.upload(v, {static_cast<int64_t>(v.size())});
}

TEST(IndexChecks, TheCpuBackendChecksEvenWhenTheyAreTurnedOff) {
  auto cpu = make_cpu_backend();
  const Tensor table = cpu->zeros({4, 3}, DType::f32);
  Tensor out = cpu->empty({2, 3}, DType::f32);
  const IndexChecksOff off(*cpu);
  EXPECT_TRUE(cpu->device_index_checks());
  EXPECT_THAT(
      [&] {
        cpu->embedding_forward(out, table, ids(*cpu, {1, 4}));
      },
      ThrowsMessage<Error>(HasSubstr("ids[1] = 4 is out of range")));
}

TEST(IndexChecks, CudaScopeTurnsChecksOffAndRestoresThem) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible: CUDA index checks not run";
  auto gpu = make_cuda_backend(0);
  const Tensor table = gpu->zeros({4, 3}, DType::f32);
  Tensor out = gpu->empty({2, 3}, DType::f32);
  const Tensor bad = ids(*gpu, {1, 4});
  ASSERT_TRUE(gpu->device_index_checks());
  {
    const IndexChecksOff off(*gpu);
    EXPECT_FALSE(gpu->device_index_checks());
    {
      const IndexChecksOff nested(*gpu);
      EXPECT_FALSE(gpu->device_index_checks());
    }
    EXPECT_FALSE(gpu->device_index_checks()) << "the inner scope restored the outer state";
    gpu->embedding_forward(out, table, ids(*gpu, {1, 3}));  // in range: runs unchecked
  }
  EXPECT_TRUE(gpu->device_index_checks());
  EXPECT_THAT([&] { gpu->embedding_forward(out, table, bad); },
              ThrowsMessage<Error>(HasSubstr("ids[1] = 4 is out of range")));
}

}  // namespace
}  // namespace fm
