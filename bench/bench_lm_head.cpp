// The LM head in row chunks (ForwardOptions::lm_head_rows): time and peak memory of one
// forward + backward of the LM loss for a one-layer model whose cost is the head, with the
// whole-batch head (logits and their gradient kept as [N, V]) against chunks of rows (the
// forward keeps per-token log-prob/entropy/lse, the backward recomputes each chunk's logits).
// peak_MiB counts the tensor bytes live at once during a step (the last step's activations
// included) beyond the parameters and gradients (a counting allocator on the CPU; the caching
// allocator's peak on CUDA).
//   build/bench/bench_lm_head --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "bench/model_bench_support.h"
#include "model/moe_transformer.h"

namespace {

// Tensor bytes live now and at most since reset(), on the CPU.
class CountingAllocator final : public fm::Allocator {
 public:
  explicit CountingAllocator(fm::Allocator& inner) : inner_(inner) {}
  void* allocate(size_t bytes) override {
    void* p = inner_.allocate(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    sizes_[p] = bytes;
    live_ += bytes;
    peak_ = std::max(peak_, live_);
    return p;
  }
  void deallocate(void* p) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto it = sizes_.find(p);
      if (it != sizes_.end()) {
        live_ -= it->second;
        sizes_.erase(it);
      }
    }
    inner_.deallocate(p);
  }
  size_t live() const { return live_; }
  size_t peak() const { return peak_; }
  void reset_peak() { peak_ = live_; }

 private:
  fm::Allocator& inner_;
  std::mutex mu_;
  std::unordered_map<void*, size_t> sizes_;
  size_t live_ = 0, peak_ = 0;
};

CountingAllocator& cpu_counter() {
  static CountingAllocator* counter = [] {
    auto* c = new CountingAllocator(fm::allocator_for(fm::DeviceKind::cpu));
    fm::set_allocator(fm::DeviceKind::cpu, c);
    return c;
  }();
  return *counter;
}

// The small preset cut to one layer, with vocabulary V: the head dominates its cost.
fm::ModelConfig head_model(int64_t vocab) {
  fm::ModelConfig c = fm::ModelConfig::load("small");
  c.name = fmt::format("small-1layer-v{}", vocab);
  c.n_layers = 1;
  c.vocab_size = vocab;
  return c;
}

void lm_head(benchmark::State& state, bool cuda) {
  const int64_t vocab = state.range(0), tokens = state.range(1), rows = state.range(2);
  if (cuda && !fm::cuda_available()) {
    state.SkipWithError("no CUDA GPU visible");
    return;
  }
  CountingAllocator& counter = cpu_counter();
  auto backend = cuda ? fm::make_cuda_backend(0) : fm::make_cpu_backend();
  const fm::ModelConfig c = head_model(vocab);
  fm::MoeTransformer model(c, *backend);
  model.init_weights(1);
  const fm::Batch batch = fm::bench::synthetic_batch(c, tokens / 512, 512);
  const fm::ForwardOptions options{.lm_head_rows = rows};
  model.zero_grad();
  backend->synchronize();
  const size_t base = counter.live();  // parameters and gradients
  const size_t cuda_base = fm::cuda_memory_stats().in_use;
  model.lm_loss_and_backward(batch, options);  // warm-up (and the caching allocator's pool)
  backend->synchronize();
  counter.reset_peak();
  fm::reset_cuda_memory_peak();
  for (auto _ : state) {
    model.zero_grad();
    benchmark::DoNotOptimize(model.lm_loss_and_backward(batch, options));
    backend->synchronize();
  }
  const double peak = cuda ? static_cast<double>(fm::cuda_memory_stats().peak_in_use - cuda_base)
                           : static_cast<double>(counter.peak() - base);
  state.counters["peak_MiB"] = peak / (1 << 20);
  state.counters["chunk_rows"] = static_cast<double>(model.lm_head_chunk_rows());
  state.counters["tokens/s"] = benchmark::Counter(
      static_cast<double>(batch.size() * state.iterations()), benchmark::Counter::kIsRate);
}

void BM_LmHeadCpu(benchmark::State& s) {
  lm_head(s, false);
}
void BM_LmHeadCuda(benchmark::State& s) {
  lm_head(s, true);
}

// Args: vocabulary, tokens (sequences of 512), rows per chunk (-1: whole batch, 0: auto).
void cpu_args(benchmark::internal::Benchmark* b) {
  for (int64_t rows : {-1, 0, 256, 64}) b->Args({32000, 1024, rows});
  for (int64_t rows : {-1, 0, 128}) b->Args({151936, 512, rows});
}
void cuda_args(benchmark::internal::Benchmark* b) {
  for (int64_t rows : {-1, 0, 1024}) b->Args({151936, 16384, rows});
}

}  // namespace

BENCHMARK(BM_LmHeadCpu)
    ->Apply(cpu_args)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(2);
BENCHMARK(BM_LmHeadCuda)
    ->Apply(cuda_args)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(5);

BENCHMARK_MAIN();
