// The CUDA caching allocator in use (engine/cuda/allocator.h): after one warm-up pass, a loop
// of ops that creates and drops temporaries takes no new device memory from cudaMalloc, and
// the statistics see the peak. The caching logic itself is tested on the CPU
// (caching_allocator_test.cpp); this runs only where a GPU is visible.
#include <gtest/gtest.h>

#include "engine/backend.h"
#include "engine/rng.h"

namespace {

// One "step": temporaries of several sizes, used by ops and dropped.
double step(fm::Backend& gpu, const fm::Tensor& x) {
  fm::Tensor a = gpu.empty({256, 512}, fm::DType::f32);
  gpu.copy(a, x);
  fm::Tensor c = gpu.empty({256, 256}, fm::DType::f32);
  gpu.matmul(c, a, false, a, true);
  fm::Tensor big = gpu.empty({1024, 1024}, fm::DType::f32);  // 4 MiB: the large path
  gpu.fill(big, 0.5);
  return gpu.sum_squares(c) + gpu.sum_squares(big);
}

TEST(CudaAllocator, StepLoopTakesNoNewDeviceMemoryAfterWarmUp) {
  if (!fm::cuda_available()) GTEST_SKIP() << "no CUDA GPU visible: CUDA allocator not run";
  auto gpu = fm::make_cuda_backend(0);
  fm::Rng rng(5);
  fm::Tensor host = fm::Tensor::empty({256, 512}, fm::DType::f32);
  rng.uniform(host.data<float>(), host.numel(), -1.0f, 1.0f);
  const double first = step(*gpu, host);
  const fm::CacheStats warm = fm::cuda_memory_stats();
  for (int i = 0; i < 5; ++i) EXPECT_EQ(step(*gpu, host), first) << "iteration " << i;
  const fm::CacheStats after = fm::cuda_memory_stats();
  EXPECT_EQ(after.source_allocs, warm.source_allocs) << "cudaMalloc in the step loop";
  EXPECT_GE(after.reuses - warm.reuses, 5 * 3);
  EXPECT_GE(after.peak_in_use, size_t{4} << 20);
  EXPECT_EQ(after.reserved, warm.reserved);
}

}  // namespace
