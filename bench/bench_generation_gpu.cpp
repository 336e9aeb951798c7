// Rollout decode on the CUDA backend against the memory-bandwidth roofline (issue 7): B prompts
// of kPromptLen random tokens, kNewTokens sampled tokens each (temperature 1, no stop token),
// bf16 compute over f32 master weights with a bf16 KV cache (the rollout's precision).
//
// Timing: one iteration generates kNewTokens and then 1 token from the same prompts; the
// difference is kNewTokens - 1 decode steps that each feed B tokens and sample B more (the
// prefill and the finishing step cancel), so decode tokens/s = B (kNewTokens - 1) / (T(N) -
// T(1)). The roofline: the bytes those steps must read (model/config.h decode_step_bytes: every
// non-routed weight and the LM head once per step, each routed expert that at least one of the
// step's tokens chose, as the run's routing trace records them, and the KV cache) over the HBM
// bandwidth measured here (BM_HbmCopy: a device-to-device copy of 1 GiB reads and writes 2 GiB).
// roofline% = measured tokens/s over roofline tokens/s; issue 7's target is >= 60 at B = 64.
//
// Cases: the small and mid presets at random weights (init_weights), or, with --hf=DIR, the
// Hugging Face model in DIR imported (`foremoe import-hf`) so that transformers' generate runs
// on the same weights (bench/reference/decode_hf.py --export DIR writes it and times HF).
// Routing: decode steps route on the device (the model's automatic CachedRouting: no host
// round trip per MoE layer); host_routing=1 (batch 64) routes every layer on the host, as
// before, to measure what the device path saves.
// Without a visible GPU every case reports "no CUDA GPU visible" and measures nothing;
// --cpu runs the tiny preset on the CPU backend instead (batch 1 and 4, the host's memcpy
// bandwidth as the "HBM"): a check of the harness, not a figure.
//   build/bench/bench_generation_gpu [--hf=DIR] [--cpu] --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "engine/backend.h"
#include "engine/rng.h"
#include "model/checkpoint.h"
#include "model/generation.h"
#include "model/hf_import.h"

namespace {

constexpr int64_t kPromptLen = 128, kNewTokens = 128;

bool skip_without_gpu(benchmark::State& state) {
  if (fm::cuda_available()) return false;
  state.SkipWithError("no CUDA GPU visible: nothing measured");
  return true;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Bytes per second of a device-to-device copy of `bytes` (each byte read once and written
// once), the best of `reps` copies after a warm-up.
double copy_bandwidth(fm::Backend& gpu, int64_t bytes, int reps) {
  fm::Tensor a = gpu.empty({bytes / 4}, fm::DType::f32), b = gpu.empty({bytes / 4}, fm::DType::f32);
  gpu.fill(a, 1.0);
  gpu.copy(b, a);
  gpu.synchronize();
  double best = 0.0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    gpu.copy(b, a);
    gpu.synchronize();
    best = std::max(best, 2.0 * static_cast<double>(bytes) / seconds_since(t0));
  }
  return best;
}

constexpr int64_t kCopyBytes = int64_t{1} << 30;

void BM_HbmCopy(benchmark::State& state) {
  if (skip_without_gpu(state)) return;
  auto gpu = fm::make_cuda_backend(0);
  for (auto _ : state) state.counters["GB/s"] = copy_bandwidth(*gpu, kCopyBytes, 10) * 1e-9;
}

struct DecodeCase {
  std::string name;
  fm::ModelConfig config;
  std::string weights;  // a foremoe weights directory, or empty for init_weights(1)
  bool cpu = false;     // the CPU backend (--cpu)
};

std::vector<std::vector<int32_t>> random_prompts(const fm::ModelConfig& c, int64_t batch) {
  fm::Rng rng(4, 0);
  std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(batch));
  for (auto& p : prompts)
    for (int64_t t = 0; t < kPromptLen; ++t)
      p.push_back(static_cast<int32_t>(rng.next_below(static_cast<uint64_t>(c.vocab_size))));
  return prompts;
}

// The bytes of the kNewTokens - 1 timed decode steps: the step feeding position kPromptLen + j
// (j = 0 .. kNewTokens - 2) of every sequence attends over kPromptLen + j + 1 cached tokens and
// reads the experts its tokens chose (each sequence's routing trace covers prompt and response).
fm::DecodeStepBytes decode_bytes(const fm::ModelConfig& c,
                                 const std::vector<fm::GeneratedSequence>& seqs) {
  fm::DecodeStepBytes sum;
  for (int64_t j = 0; j + 1 < kNewTokens; ++j) {
    const int64_t pos = kPromptLen + j;
    int64_t distinct = 0;
    for (int64_t m = 0; m < c.n_moe_layers(); ++m) {
      std::vector<bool> hit(static_cast<size_t>(c.n_experts), false);
      for (const fm::GeneratedSequence& s : seqs)
        for (int64_t k = 0; k < c.top_k; ++k) hit[s.routes.at(pos, m, k)] = true;
      for (bool h : hit) distinct += h;
    }
    const std::vector<int64_t> context(seqs.size(), pos + 1);
    const fm::DecodeStepBytes step = fm::decode_step_bytes(c, 2, 2, context, distinct);
    sum.weights += step.weights;
    sum.experts += step.experts;
    sum.kv_cache += step.kv_cache;
  }
  return sum;
}

void BM_Decode(benchmark::State& state, const DecodeCase& dc) {
  if (!dc.cpu && skip_without_gpu(state)) return;
  const int64_t batch = state.range(0);
  const bool host_routing = state.range(1) != 0;
  auto gpu = dc.cpu ? fm::make_cpu_backend() : fm::make_cuda_backend(0);
  fm::reset_cuda_memory_peak();
  fm::MoeTransformer model(dc.config, *gpu);
  if (dc.weights.empty())
    model.init_weights(1);
  else
    fm::load_weights(dc.weights, model);
  model.set_compute_dtype(fm::DType::bf16);
  model.set_cached_routing(host_routing ? fm::MoeTransformer::CachedRouting::host
                                        : fm::MoeTransformer::CachedRouting::automatic);
  const auto prompts = random_prompts(dc.config, batch);
  fm::GenerationConfig g;
  g.batch_slots = batch;
  g.sampling.temperature = 1.0;
  auto timed = [&](int64_t new_tokens, std::vector<fm::GeneratedSequence>* out) {
    g.max_new_tokens = new_tokens;
    const auto t0 = std::chrono::steady_clock::now();
    auto seqs = fm::generate(model, prompts, g);
    gpu->synchronize();
    const double s = seconds_since(t0);
    if (out != nullptr) *out = std::move(seqs);
    return s;
  };
  std::vector<fm::GeneratedSequence> seqs;
  timed(kNewTokens, &seqs);  // warm-up: the allocator's cache, cuBLASLt plans
  timed(1, nullptr);
  double decode_s = 0.0;
  for (auto _ : state) {
    const double t = timed(kNewTokens, nullptr) - timed(1, nullptr);
    state.SetIterationTime(t);
    decode_s += t;
  }
  const double per_iter = decode_s / static_cast<double>(state.iterations());
  const double tokens = static_cast<double>(batch * (kNewTokens - 1));
  const fm::DecodeStepBytes bytes = decode_bytes(dc.config, seqs);
  const double bandwidth = copy_bandwidth(*gpu, dc.cpu ? kCopyBytes / 16 : kCopyBytes, 5);
  const double roofline = tokens * bandwidth / static_cast<double>(bytes.total());
  state.counters["tokens/s"] = tokens / per_iter;
  state.counters["ms/step"] = 1e3 * per_iter / static_cast<double>(kNewTokens - 1);
  state.counters["roofline_tok/s"] = roofline;
  state.counters["roofline%"] = 100.0 * tokens / per_iter / roofline;
  state.counters["MB/step"] = static_cast<double>(bytes.total()) * 1e-6 / (kNewTokens - 1);
  state.counters["expert%"] =
      100.0 * static_cast<double>(bytes.experts) / static_cast<double>(bytes.total());
  state.counters["kv%"] =
      100.0 * static_cast<double>(bytes.kv_cache) / static_cast<double>(bytes.total());
  state.counters["HBM_GB/s"] = bandwidth * 1e-9;
  state.counters["peak_GiB"] =
      static_cast<double>(fm::cuda_memory_stats().peak_reserved) / (1024.0 * 1024 * 1024);
}

}  // namespace

int main(int argc, char** argv) {
  std::string hf;
  bool cpu = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--hf=", 0) == 0)
      hf = a.substr(5);
    else if (a == "--cpu")
      cpu = true;
    else
      args.push_back(argv[i]);
  }
  std::vector<DecodeCase> cases;
  std::filesystem::path imported;
  if (cpu) {
    cases.push_back({"tiny_cpu", fm::ModelConfig::load("tiny"), "", true});
  } else if (hf.empty()) {
    for (const char* preset : {"small", "mid"})
      cases.push_back({preset, fm::ModelConfig::load(preset), ""});
  } else {
    imported = std::filesystem::temp_directory_path() /
               ("foremoe_decode_hf_" + std::to_string(::getpid()));
    try {
      fm::import_hf(hf, imported.string());
      cases.push_back({"hf", fm::load_checkpoint_config(imported.string()), imported.string()});
    } catch (const std::exception& e) {
      std::fprintf(stderr, "bench_generation_gpu: --hf=%s: %s\n", hf.c_str(), e.what());
      return 2;
    }
  }
  if (!cpu) benchmark::RegisterBenchmark("BM_HbmCopy", BM_HbmCopy)->Iterations(1)->UseRealTime();
  for (const DecodeCase& dc : cases) {
    auto* bm = benchmark::RegisterBenchmark(("BM_Decode/" + dc.name).c_str(),
                                            [dc](benchmark::State& s) { BM_Decode(s, dc); });
    // {batch, host_routing}
    const std::vector<std::vector<int64_t>> runs =
        dc.cpu ? std::vector<std::vector<int64_t>>{{1, 0}, {4, 0}, {4, 1}}
               : std::vector<std::vector<int64_t>>{{1, 0}, {64, 0}, {256, 0}, {64, 1}};
    for (const std::vector<int64_t>& r : runs) bm->Args(r);
    bm->ArgNames({"batch", "host_routing"})
        ->Iterations(3)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (!imported.empty()) std::filesystem::remove_all(imported);
  return 0;
}
