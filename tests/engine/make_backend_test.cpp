// make_backend: the device names the CLI's --device takes (engine/backend.h).
#include <gtest/gtest.h>

#include <string>

#include "engine/backend.h"
#include "engine/error.h"

namespace fm {
namespace {

TEST(MakeBackend, ParsesCpuCudaAndCudaN) {
  EXPECT_EQ(parse_device("cpu").kind, DeviceKind::cpu);
  const DeviceChoice any = parse_device("cuda");
  EXPECT_EQ(any.kind, DeviceKind::cuda);
  EXPECT_EQ(any.index, -1);
  EXPECT_EQ(parse_device("cuda:0").index, 0);
  EXPECT_EQ(parse_device("cuda:12").index, 12);
}

TEST(MakeBackend, RejectsOtherNamesNamingThem) {
  for (const char* bad :
       {"gpu", "CPU", "cuda:", "cuda:-1", "cuda:x", "cuda:1x", "cuda:99999", ""}) {
    try {
      parse_device(bad);
      ADD_FAILURE() << "'" << bad << "' accepted";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(std::string("device '") + bad + "'"), std::string::npos) << msg;
      EXPECT_NE(msg.find("expected cpu, cuda or cuda:N"), std::string::npos) << msg;
    }
  }
}

TEST(MakeBackend, CpuIsTheReferenceBackend) {
  const auto b = make_backend("cpu", 3);
  EXPECT_EQ(b->device().kind, DeviceKind::cpu);
}

// cuda: the GPU of the local rank modulo the visible GPUs; without one, an error naming the
// device and the reason.
TEST(MakeBackend, CudaPicksTheLocalRanksGpuOrSaysWhyNot) {
  const int count = cuda_device_count();
  if (count == 0) {
    for (const char* name : {"cuda", "cuda:0"}) {
      try {
        make_backend(name);
        ADD_FAILURE() << name << " made a backend without a GPU";
      } catch (const Error& e) {
        const std::string msg = e.what();
        EXPECT_NE(msg.find(std::string("device '") + name + "'"), std::string::npos) << msg;
        EXPECT_TRUE(msg.find("no CUDA GPU is visible") != std::string::npos ||
                    msg.find("no CUDA backend") != std::string::npos)
            << msg;
      }
    }
    return;
  }
  EXPECT_EQ(make_backend("cuda", count + 1)->device(), Device::cuda(1 % count));
  EXPECT_EQ(make_backend("cuda:0", 5)->device(), Device::cuda(0));
  EXPECT_THROW(make_backend(fmt::format("cuda:{}", count)), Error);
}

}  // namespace
}  // namespace fm
