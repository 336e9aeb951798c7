// Dense row-major GEMMs on cuBLASLt (private to the CUDA backend): the path the backend's
// matmul takes for f32 and bf16 (f64 stays on cublasDgemm). One LtGemm per backend: its
// cuBLASLt handle, one workspace allocated once at construction (no cudaMalloc in the step
// loop), and a plan per problem shape (layouts, operation descriptor, the heuristic's first
// algorithm) built on the shape's first call and reused, so a repeated shape never re-runs the
// heuristic. cuBLASLt results for one algorithm, workspace and GPU are bit-reproducible run to
// run; the plan fixes the algorithm, so the same shapes repeat bit-exactly.
//
// Epilogues: none is used. This architecture's linear layers have no bias and no GELU (the
// activation is SwiGLU on two projections, fused in a kernel of ours); the one fusable
// epilogue, the residual add, is already in the GEMM itself as beta = 1 (c accumulates), and
// a bias gradient (BGRAD epilogues) has no bias to serve. A shape for which the heuristic
// finds no algorithm (an unusual alignment or stride) runs on classic cuBLAS instead.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <map>

#include "engine/cuda/gemm.h"

namespace fm::cuda {

// The problems LtGemm runs (TypedGemm, gemm.h; m, n, k >= 1): a and b f32 with an f32 c
// (CUBLAS_COMPUTE_32F: full fp32, no TF32), or a and b bf16 with a bf16 or f32 c (f32
// accumulation on tensor cores, one rounding of a bf16 c).
class LtGemm {
 public:
  // 32 MiB: what cuBLASLt's Hopper kernels use at most for split-K and stream-K partials.
  static constexpr size_t kWorkspaceBytes = size_t{32} << 20;
  // Plans kept at most; past it the cache starts over (RL micro-batches have ever new token
  // counts, so the set of shapes grows with the run; a plan costs one heuristic call).
  static constexpr size_t kMaxPlans = 4096;

  LtGemm();
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // Queues the GEMM on `stream`. Returns false, having queued nothing, when cuBLASLt has no
  // algorithm for the problem (the caller then runs classic cuBLAS); throws on any error.
  bool run(cudaStream_t stream, const TypedGemm& p, float alpha, float beta);

  // Plans built so far (one per distinct shape, types, strides and pointer alignments).
  size_t plans() const { return plans_.size(); }

 private:
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool found = false;  // false: the heuristic returned no algorithm
  };
  // types, transposes, m, n, k, strides, and the operands' pointer alignments
  using Key = std::array<int64_t, 13>;

  Plan& plan_for(const TypedGemm& p);
  static void destroy(Plan& plan) noexcept;

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  std::map<Key, Plan> plans_;
};

}  // namespace fm::cuda
