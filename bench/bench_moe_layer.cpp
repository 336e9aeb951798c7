// The MoE layer forward + backward on the CUDA backend (issue 7's first performance target:
// >= 1.5x the best PyTorch form on the same GPU). The layer is foremoe's own (model/moe_layer.h:
// the model's MoE block, the same code) with the dimensions of bench/reference/moe_layer_torch.py
// -- a preset's hidden, n_experts, top_k, moe_ffn, renormalised top-k gates, no shared expert,
// no balancing loss -- on N = 16384 tokens of random activations, bf16 compute with f32 master
// weights and f32 gradients (the training precision; PyTorch's reference keeps bf16 gradients).
// One iteration: forward, backward of sum(y * dy) with a fixed random dy (dx and every weight
// gradient), zeroing the gradients first, synchronised at the end.
// Counters: tokens/s, ms per forward + backward, TFLOP/s by the reference's count
// (3 N (K 3 2 H F + 2 H E): the expert GEMMs and the router, forward and backward), peak
// device memory; with --torch-dir=DIR (where moe_layer_torch.py wrote
// moe_layer_torch_<preset>.json) also torch_best_tok/s and x_torch = ours / the best PyTorch
// form.
// The last argument picks the grouped expert weight gradient (bf16 activations into the f32
// master gradients): 0 cuBLAS, one cublasGemmEx per expert (the default), 1 our one-launch
// WMMA kernel (engine/cuda/grouped_gemm.cu, set_cuda_grouped_wgrad): measure one against the
// other.
// Without a visible GPU every case reports "no CUDA GPU visible" and measures nothing; --cpu
// runs the tiny preset's layer on the CPU backend on 512 tokens instead: a check of the harness,
// not a figure.
//   build/bench/bench_moe_layer [--torch-dir=DIR] [--cpu] --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/rng.h"
#include "model/moe_layer.h"

namespace {

struct LayerCase {
  std::string preset;
  int64_t tokens = 16384;
  bool cpu = false;
  double torch_best_tokens_per_s = 0.0;  // from moe_layer_torch.py's JSON; 0: not given
};

// The preset's MoE layer as the PyTorch reference builds it.
fm::ModelConfig layer_config(const std::string& preset) {
  fm::ModelConfig c = fm::ModelConfig::load(preset);
  c.n_shared_experts = 0;
  c.balance.method = fm::BalanceMethod::none;
  return c;
}

std::vector<double> normal_values(int64_t n, uint64_t seed) {
  fm::Rng rng(seed, 0);
  std::vector<double> v(static_cast<size_t>(n));
  rng.normal(v.data(), n, 0.0, 1.0);
  return v;
}

void BM_MoeLayer(benchmark::State& state, const LayerCase& lc) {
  if (!lc.cpu && !fm::cuda_available()) {
    state.SkipWithError("no CUDA GPU visible: nothing measured");
    return;
  }
  const bool kernel_wgrad = state.range(0) != 0;
  auto b = lc.cpu ? fm::make_cpu_backend() : fm::make_cuda_backend(0);
  if (!lc.cpu)
    fm::set_cuda_grouped_wgrad(
        *b, kernel_wgrad ? fm::CudaGroupedWgrad::kernel : fm::CudaGroupedWgrad::cublas);
  fm::reset_cuda_memory_peak();
  const fm::ModelConfig c = layer_config(lc.preset);
  const int64_t N = lc.tokens, H = c.hidden;
  fm::MoeLayer layer(c, *b, fm::DType::bf16);
  layer.init_weights(1);
  const fm::Tensor x = b->upload(normal_values(N * H, 2), {N, H}, fm::DType::bf16);
  const fm::Tensor dy = b->upload(normal_values(N * H, 3), {N, H}, fm::DType::bf16);
  fm::Tensor y = b->empty({N, H}, fm::DType::bf16), dx = b->empty({N, H}, fm::DType::bf16);
  auto step = [&] {
    layer.zero_grad();
    layer.forward(y, x);
    layer.backward(dx, dy);
    b->synchronize();
  };
  step();  // warm-up: the allocator's cache, cuBLAS heuristics
  double seconds = 0.0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const double per_step = seconds / static_cast<double>(state.iterations());
  const double flops = 3.0 * static_cast<double>(N) *
                       static_cast<double>(c.top_k * 3 * 2 * H * c.moe_ffn + 2 * H * c.n_experts);
  const double tokens_per_s = static_cast<double>(N) / per_step;
  state.counters["tokens/s"] = tokens_per_s;
  state.counters["ms"] = 1e3 * per_step;
  state.counters["TFLOP/s"] = flops * 1e-12 / per_step;
  state.counters["peak_GiB"] =
      static_cast<double>(fm::cuda_memory_stats().peak_reserved) / (1024.0 * 1024 * 1024);
  if (lc.torch_best_tokens_per_s > 0) {
    state.counters["torch_best_tok/s"] = lc.torch_best_tokens_per_s;
    state.counters["x_torch"] = tokens_per_s / lc.torch_best_tokens_per_s;
  }
}

// The best form's tokens/s from moe_layer_torch.py's JSON for `preset` in `dir`, 0 when the file
// is absent; throws naming the file when it is unreadable or lacks the fields.
double torch_best(const std::string& dir, const std::string& preset, int64_t tokens) {
  const std::filesystem::path path =
      std::filesystem::path(dir) / ("moe_layer_torch_" + preset + ".json");
  if (!std::filesystem::exists(path)) return 0.0;
  std::ifstream in(path);
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.contains("best") || !j.contains("forms") || !j.contains("tokens"))
    throw std::runtime_error(
        fmt::format("{}: not moe_layer_torch.py's JSON (best, forms, tokens)", path.string()));
  if (j.value("device", std::string()) == "cpu")
    throw std::runtime_error(fmt::format(
        "{}: measured on the CPU (--device cpu, a smoke check): x_torch needs the same GPU",
        path.string()));
  if (j["tokens"].get<int64_t>() != tokens)
    throw std::runtime_error(fmt::format("{}: measured {} tokens, this benchmark runs {}",
                                         path.string(), j["tokens"].dump(), tokens));
  return j["forms"][j["best"].get<std::string>()]["tokens_per_s"].get<double>();
}

}  // namespace

int main(int argc, char** argv) {
  std::string torch_dir;
  bool cpu = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--torch-dir=", 0) == 0)
      torch_dir = a.substr(12);
    else if (a == "--cpu")
      cpu = true;
    else
      args.push_back(argv[i]);
  }
  std::vector<LayerCase> cases;
  if (cpu) {
    cases.push_back({"tiny", 512, true});
  } else {
    for (const char* preset : {"small", "mid"}) cases.push_back({preset});
  }
  try {
    for (LayerCase& lc : cases)
      if (!torch_dir.empty())
        lc.torch_best_tokens_per_s = torch_best(torch_dir, lc.preset, lc.tokens);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_moe_layer: --torch-dir=%s: %s\n", torch_dir.c_str(), e.what());
    return 2;
  }
  for (const LayerCase& lc : cases) {
    auto* bm = benchmark::RegisterBenchmark(("BM_MoeLayer/" + lc.preset).c_str(),
                                            [lc](benchmark::State& s) { BM_MoeLayer(s, lc); });
    if (lc.cpu)
      bm->Arg(0);
    else
      bm->Arg(0)->Arg(1);
    bm->ArgNames({"kernel_wgrad"})->Unit(benchmark::kMillisecond)->UseRealTime();
  }
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
