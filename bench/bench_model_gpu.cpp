// The whole model's training step on the CUDA backend: forward + backward tokens/s of the small
// and mid presets, achieved TFLOP/s (model FLOPs from model_costs: 6 x active params per token
// plus attention), MFU against the H100 SXM dense bf16 peak (989 TFLOP/s, the figure issue 7
// quotes) and the ratio to the GEMM ceiling measured here (BM_GemmCeiling: the backend's own
// matmul at 4096^3 in the same precision), and the peak device memory of the step (the caching
// allocator's peak of bytes reserved from cudaMalloc, weights and gradients included).
// Each case runs in fp32 and in mixed precision (the third argument: 0 fp32, 1 bf16 compute
// with f32 master weights, MoeTransformer::set_compute_dtype); the GEMM ceiling likewise
// (second argument: 0 fp32, 1 bf16 inputs with f32 accumulation). MFU is against the bf16
// peak in both; for fp32 the ceiling ratio is the fair figure. The fourth argument (the GEMM
// ceiling's third) picks the cuBLAS API of the dense matmuls (0 cuBLASLt, the default; 1 classic
// cuBLAS, set_cuda_dense_gemm), to measure one against the other; the fifth the attention path in
// bf16 (0 cuDNN's fused attention, the default where built; 1 foremoe's kernels,
// set_cuda_attention). attn_cudnn counts cuDNN attention calls per step (2 per layer: forward
// and backward), attn_fallbacks the calls cuDNN could not run.
// Without a visible GPU every case reports "no CUDA GPU visible" and measures nothing.
//   build/bench/bench_model_gpu --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <memory>

#include "bench/model_bench_support.h"
#include "engine/backend.h"
#include "engine/rng.h"
#include "model/moe_transformer.h"

namespace {

constexpr double kH100DenseBf16Tflops = 989.0;

bool skip_without_gpu(benchmark::State& state) {
  if (fm::cuda_available()) return false;
  state.SkipWithError("no CUDA GPU visible: nothing measured");
  return true;
}

using fm::bench::synthetic_batch;

void set_dense_gemm(fm::Backend& gpu, int64_t classic) {
  fm::set_cuda_dense_gemm(gpu, classic ? fm::CudaDenseGemm::classic : fm::CudaDenseGemm::lt);
}

// c = a b^T at n x n x n on the device: the backend's GEMM ceiling in the model's precision.
void BM_GemmCeiling(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  const int64_t n = state.range(0);
  const fm::DType dt = state.range(1) ? fm::DType::bf16 : fm::DType::f32;
  auto gpu = fm::make_cuda_backend(0);
  set_dense_gemm(*gpu, state.range(2));
  fm::Tensor a = gpu->empty({n, n}, dt), b = gpu->empty({n, n}, dt);
  fm::Tensor c = gpu->empty({n, n}, dt);
  gpu->fill(a, 0.5);
  gpu->fill(b, 0.25);
  gpu->matmul(c, a, false, b, true);  // warm-up (cuBLAS heuristics, workspace)
  gpu->synchronize();
  for (auto _ : state) {
    gpu->matmul(c, a, false, b, true);
    gpu->synchronize();
  }
  state.counters["TFLOP/s"] = benchmark::Counter(
      2.0 * static_cast<double>(n * n * n) * 1e-12 * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate);
}

void forward_backward(benchmark::State& state, const char* preset) {
  if (skip_without_gpu(state)) return;
  const int64_t n_seq = state.range(0), seq_len = state.range(1);
  const fm::ModelConfig c = fm::ModelConfig::load(preset);
  auto gpu = fm::make_cuda_backend(0);
  set_dense_gemm(*gpu, state.range(3));
  if (state.range(4)) fm::set_cuda_attention(*gpu, fm::CudaAttention::kernel);
  fm::reset_cuda_memory_peak();
  fm::MoeTransformer model(c, *gpu);
  model.init_weights(1);
  if (state.range(2)) model.set_compute_dtype(fm::DType::bf16);
  const fm::Batch batch = synthetic_batch(c, n_seq, seq_len);
  model.zero_grad();
  model.lm_loss_and_backward(batch, {}, 1.0);  // warm-up: fills the allocator's cache
  gpu->synchronize();
  for (auto _ : state) {
    model.zero_grad();
    benchmark::DoNotOptimize(model.lm_loss_and_backward(batch, {}, 1.0));
    gpu->synchronize();
  }
  const double tokens = static_cast<double>(batch.size());
  const fm::ModelCosts k = fm::model_costs(c, seq_len);
  const double iters = static_cast<double>(state.iterations());
  state.counters["tokens/s"] = benchmark::Counter(tokens * iters, benchmark::Counter::kIsRate);
  state.counters["TFLOP/s"] = benchmark::Counter(
      tokens * k.training_flops_per_token * 1e-12 * iters, benchmark::Counter::kIsRate);
  state.counters["MFU%"] = benchmark::Counter(
      tokens * k.training_flops_per_token * 1e-12 * iters * 100.0 / kH100DenseBf16Tflops,
      benchmark::Counter::kIsRate);
  state.counters["peak_GiB"] =
      static_cast<double>(fm::cuda_memory_stats().peak_reserved) / (1024.0 * 1024 * 1024);
  // Which attention ran: cuDNN calls per step, and calls that fell back to the kernel.
  const fm::CudaAttentionStats a = fm::cuda_attention_stats(*gpu);
  state.counters["attn_cudnn"] =
      static_cast<double>(a.cudnn_forward + a.cudnn_backward) / (iters + 1.0);
  state.counters["attn_fallbacks"] = static_cast<double>(a.cudnn_fallbacks);
}

void BM_SmallForwardBackward(benchmark::State& s) {
  forward_backward(s, "small");
}
void BM_MidForwardBackward(benchmark::State& s) {
  forward_backward(s, "mid");
}

}  // namespace

BENCHMARK(BM_GemmCeiling)
    ->ArgsProduct({{4096}, {0, 1}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_SmallForwardBackward)
    ->ArgsProduct({{8}, {1024}, {0, 1}, {0}, {0}})
    ->Args({16, 2048, 1, 0, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_MidForwardBackward)
    ->ArgsProduct({{8}, {2048}, {0, 1}, {0}, {0}})
    ->Args({8, 2048, 1, 1, 0})
    ->Args({8, 2048, 1, 0, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK_MAIN();
