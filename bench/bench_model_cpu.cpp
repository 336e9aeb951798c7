// CPU forward+backward throughput of the MoE transformer presets (fp32, the
// reference backend). Reports tokens/s and achieved GFLOP/s (model FLOPs from
// model_costs: 6 x active params per token + attention), and the GEMM
// ceiling those figures compare against.
//   build/bench/bench_model_cpu --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>
#include <omp.h>

#include "bench/model_bench_support.h"
#include "engine/rng.h"
#include "model/moe_transformer.h"

namespace {

using fm::bench::synthetic_batch;

void forward_backward(benchmark::State& state, const char* preset) {
  const int64_t n_seq = state.range(0), seq_len = state.range(1);
  const fm::ModelConfig c = fm::ModelConfig::load(preset);
  auto backend = fm::make_cpu_backend();
  fm::MoeTransformer model(c, *backend);
  model.init_weights(1);
  const fm::Batch batch = synthetic_batch(c, n_seq, seq_len);
  for (auto _ : state) {
    model.zero_grad();
    benchmark::DoNotOptimize(model.lm_loss_and_backward(batch, {}, 1.0));
  }
  const double tokens = static_cast<double>(batch.size());
  const fm::ModelCosts k = fm::model_costs(c, seq_len);
  state.counters["tokens/s"] = benchmark::Counter(tokens * static_cast<double>(state.iterations()),
                                                  benchmark::Counter::kIsRate);
  state.counters["GFLOP/s"] = benchmark::Counter(
      tokens * k.training_flops_per_token * 1e-9 * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate);
  state.counters["threads"] = omp_get_max_threads();
}

// The CPU backend's GEMM ceiling: a square fp32 matmul, the model's dominant op.
void BM_MatmulCeiling(benchmark::State& state) {
  const int64_t n = state.range(0);
  auto backend = fm::make_cpu_backend();
  fm::Tensor a = fm::Tensor::empty({n, n}, fm::DType::f32),
             b = fm::Tensor::empty({n, n}, fm::DType::f32);
  fm::Tensor c = fm::Tensor::empty({n, n}, fm::DType::f32);
  fm::Rng rng(3);
  rng.uniform(a.data<float>(), n * n);
  rng.uniform(b.data<float>(), n * n);
  for (auto _ : state) backend->matmul(c, a, false, b, true);
  state.counters["GFLOP/s"] = benchmark::Counter(
      2.0 * static_cast<double>(n * n * n) * 1e-9 * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate);
}

void BM_TinyForwardBackward(benchmark::State& s) {
  forward_backward(s, "tiny");
}
void BM_SmallForwardBackward(benchmark::State& s) {
  forward_backward(s, "small");
}

}  // namespace

BENCHMARK(BM_MatmulCeiling)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_TinyForwardBackward)
    ->Args({8, 64})
    ->Args({16, 128})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_SmallForwardBackward)
    ->Args({1, 256})
    ->Args({4, 256})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

BENCHMARK_MAIN();
