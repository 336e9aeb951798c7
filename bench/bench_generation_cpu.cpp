// CPU decode throughput of batched generation with the KV cache (fp32 reference
// backend): B prompts of 16 tokens, 64 new tokens each, no stop token, so every
// step decodes B tokens. Reports generated tokens/s (prefill included in the
// time; it is 16 of every 80 tokens fed) and the time of one decode step.
//   build/bench/bench_generation_cpu --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>
#include <omp.h>

#include "engine/rng.h"
#include "model/generation.h"

namespace {

void decode(benchmark::State& state, const char* preset) {
  const int64_t batch = state.range(0), prompt_len = 16, new_tokens = 64;
  const fm::ModelConfig c = fm::ModelConfig::load(preset);
  auto backend = fm::make_cpu_backend();
  fm::MoeTransformer model(c, *backend);
  model.init_weights(1);
  fm::Rng rng(4, 0);
  std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(batch));
  for (auto& p : prompts)
    for (int64_t t = 0; t < prompt_len; ++t)
      p.push_back(static_cast<int32_t>(rng.next_below(static_cast<uint64_t>(c.vocab_size))));
  fm::GenerationConfig g;
  g.max_new_tokens = new_tokens;
  g.batch_slots = batch;
  g.sampling.temperature = 1.0;
  fm::GenerationStats st;
  int64_t generated = 0;
  for (auto _ : state) {
    const auto seqs = fm::generate(model, prompts, g, &st);
    for (const auto& s : seqs) generated += static_cast<int64_t>(s.response.size());
  }
  const double iters = static_cast<double>(state.iterations());
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(generated), benchmark::Counter::kIsRate);
  state.counters["ms/step"] =
      benchmark::Counter(1e3 * iters / static_cast<double>(st.steps),
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  state.counters["steps"] = static_cast<double>(st.steps);
  state.counters["kv_MiB"] = static_cast<double>(st.kv_cache_bytes) / (1 << 20);
  state.counters["threads"] = omp_get_max_threads();
}

void BM_TinyDecode(benchmark::State& s) {
  decode(s, "tiny");
}

}  // namespace

BENCHMARK(BM_TinyDecode)->Arg(1)->Arg(16)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
