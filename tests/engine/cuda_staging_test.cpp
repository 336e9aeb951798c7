// Host-to-device copies through the CUDA backend's pinned staging ring (engine/cuda/staging.h):
// the host buffer is overwritten right after each copy returns, the ring wraps several times,
// kernels queued between uploads see each upload's own data, copies above the ring's limit
// take the synchronous path, and the counter shows which path each copy took.
// Skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "engine/backend.h"
#include "support/cuda_parity.h"

namespace fm {
namespace {

constexpr int64_t kRingLimit = int64_t{16} << 20;  // StagingRing::kMaxCopyBytes

TEST(CudaStaging, UploadsMayReuseTheirHostBufferAtOnceAndWrapTheRing) {
  FM_SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend(0);
  const int64_t before = cuda_staged_uploads(*gpu);
  std::vector<int32_t> host;  // one buffer, rewritten after every copy
  std::vector<Tensor> device;
  std::vector<std::vector<int32_t>> want;
  int64_t staged = 0, total_bytes = 0;
  for (int i = 0; i < 120; ++i) {
    // 1 .. ~1.6 M ints (up to 6.3 MB): 120 copies move ~370 MB through a 64 MiB ring.
    const int64_t n = 1 + (static_cast<int64_t>(i) * 7919 * 13) % 1'600'000;
    host.resize(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j)
      host[static_cast<size_t>(j)] = static_cast<int32_t>(i * 131 + j);
    want.push_back(host);
    Tensor d = gpu->empty({n}, DType::i32);
    gpu->copy(d, Tensor::view(host.data(), {n}, DType::i32));
    std::fill(host.begin(), host.end(), -1);  // the copy must not read this
    device.push_back(d);
    staged += 1;
    total_bytes += n * 4;
  }
  ASSERT_GT(total_bytes, 4 * (int64_t{64} << 20)) << "the ring should wrap several times";
  for (size_t i = 0; i < device.size(); ++i) {
    const Tensor back = gpu->to_host(device[i]);
    ASSERT_EQ(std::memcmp(back.raw(), want[i].data(), want[i].size() * 4), 0) << "copy " << i;
  }
  EXPECT_EQ(cuda_staged_uploads(*gpu) - before, staged);

  // Above the limit: the synchronous path, not counted.
  const int64_t big = kRingLimit / 4 + 1;
  host.assign(static_cast<size_t>(big), 7);
  Tensor d = gpu->empty({big}, DType::i32);
  gpu->copy(d, Tensor::view(host.data(), {big}, DType::i32));
  std::fill(host.begin(), host.end(), -1);
  EXPECT_EQ(cuda_staged_uploads(*gpu) - before, staged);
  const Tensor back = gpu->to_host(d);
  EXPECT_EQ(back.data<int32_t>()[0], 7);
  EXPECT_EQ(back.data<int32_t>()[big - 1], 7);
}

// Uploads and kernels interleaved on the stream: y += x after each upload of x into the same
// device tensor; the sum shows every kernel read its own upload, none a later one.
TEST(CudaStaging, KernelsBetweenUploadsReadTheirOwnUpload) {
  FM_SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend(0);
  const int64_t n = 100'000;
  Tensor x = gpu->empty({n}, DType::f32), y = gpu->zeros({n}, DType::f32);
  std::vector<float> host(static_cast<size_t>(n));
  for (int r = 1; r <= 50; ++r) {
    for (int64_t j = 0; j < n; ++j) host[static_cast<size_t>(j)] = static_cast<float>(r);
    gpu->copy(x, Tensor::view(host.data(), {n}, DType::f32));
    gpu->axpy(y, 1.0, x);
  }
  const Tensor sum = gpu->to_host(y);
  for (int64_t j = 0; j < n; j += 997) EXPECT_EQ(sum.data<float>()[j], 50.0f * 51.0f / 2) << j;
}

}  // namespace
}  // namespace fm
