// Causal attention forward + backward on the CUDA backend in bf16, cuDNN's fused flash attention
// (set_cuda_attention: the default in builds with cuDNN) against foremoe's own kernels, at the
// attention shapes of the small (Hq 12, Hkv 4, D 64) and mid (Hq 10, Hkv 2, D 128) presets,
// for packed batches of equal sequences (16 x 1024 and 4 x 4096 tokens). Reports tokens/s of a
// forward + backward and attention TFLOP/s by the usual flash-attention count: 4 Hq D sum(len^2)
// / 2 FLOPs forward (two matmuls, causal half), 2.5x that backward (five matmuls, one of them
// the recomputed scores). The path argument: 0 cuDNN, 1 the kernels. A cuDNN case whose call
// fell back to the kernel reports an error instead of the kernel's figure.
// Without a visible GPU, or on the cuDNN path in a build without cuDNN, every case says why
// and measures nothing.
//   build/bench/bench_attention_gpu --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <cmath>
#include <vector>

#include "engine/backend.h"

namespace {

void BM_Attention(benchmark::State& state) {
  const bool cudnn = state.range(0) == 0;
  const int64_t seqs = state.range(1), len = state.range(2), hq = state.range(3),
                hkv = state.range(4), d = state.range(5);
  if (!fm::cuda_available()) return state.SkipWithError("no CUDA GPU visible: nothing measured");
  if (cudnn && !fm::cuda_has_cudnn())
    return state.SkipWithError("this build has no cuDNN: nothing measured");
  auto gpu = fm::make_cuda_backend(0);
  fm::set_cuda_attention(*gpu, cudnn ? fm::CudaAttention::cudnn : fm::CudaAttention::kernel);
  const int64_t n = seqs * len;
  const auto bf16 = fm::DType::bf16;
  fm::Tensor q = gpu->empty({n, hq, d}, bf16), k = gpu->empty({n, hkv, d}, bf16);
  fm::Tensor v = gpu->empty({n, hkv, d}, bf16), dout = gpu->empty({n, hq, d}, bf16);
  gpu->fill(q, 0.01);
  gpu->fill(k, -0.02);
  gpu->fill(v, 0.5);
  gpu->fill(dout, 0.25);
  std::vector<int32_t> offsets;
  for (int64_t s = 0; s <= seqs; ++s) offsets.push_back(static_cast<int32_t>(s * len));
  fm::Tensor host_off = fm::Tensor::empty({seqs + 1}, fm::DType::i32);
  std::copy(offsets.begin(), offsets.end(), host_off.data<int32_t>());
  fm::Tensor seq_off = gpu->empty({seqs + 1}, fm::DType::i32);
  gpu->copy(seq_off, host_off);
  fm::Tensor out = gpu->empty({n, hq, d}, bf16), lse = gpu->empty({n, hq}, fm::DType::f32);
  fm::Tensor dq = gpu->empty({n, hq, d}, bf16), dk = gpu->empty({n, hkv, d}, bf16);
  fm::Tensor dv = gpu->empty({n, hkv, d}, bf16);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const auto step = [&] {
    gpu->attention_forward(out, lse, q, k, v, seq_off, scale);
    gpu->attention_backward(dq, dk, dv, dout, q, k, v, out, lse, seq_off, scale);
  };
  step();  // warm-up: cuDNN's plans (a kernel compile each) and the allocator's blocks
  gpu->synchronize();
  if (cudnn && fm::cuda_attention_stats(*gpu).cudnn_fallbacks > 0)
    return state.SkipWithError(
        ("cuDNN fell back to the kernel: " + fm::cuda_attention_stats(*gpu).last_fallback).c_str());
  for (auto _ : state) {
    step();
    gpu->synchronize();
  }
  const double fwd_flops = 4.0 * hq * d * seqs * static_cast<double>(len) * len / 2.0;
  const double iters = static_cast<double>(state.iterations());
  state.counters["tokens/s"] = benchmark::Counter(n * iters, benchmark::Counter::kIsRate);
  state.counters["TFLOP/s"] =
      benchmark::Counter(3.5 * fwd_flops * 1e-12 * iters, benchmark::Counter::kIsRate);
}

// path, sequences, length, Hq, Hkv, D
BENCHMARK(BM_Attention)
    ->ArgNames({"kernel", "seqs", "len", "hq", "hkv", "d"})
    ->Args({0, 16, 1024, 12, 4, 64})
    ->Args({1, 16, 1024, 12, 4, 64})
    ->Args({0, 16, 1024, 10, 2, 128})
    ->Args({1, 16, 1024, 10, 2, 128})
    ->Args({0, 4, 4096, 10, 2, 128})
    ->Args({1, 4, 4096, 10, 2, 128})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
