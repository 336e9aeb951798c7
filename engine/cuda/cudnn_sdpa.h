// cuDNN's fused flash attention for the CUDA backend (private to engine/cuda/): causal
// scaled-dot-product attention over packed variable-length sequences, forward (writing the
// log-sum-exp statistics) and backward, built as cuDNN backend operation graphs (the "graph
// API": matmul, pointwise, reduction and gen-index operations that cuDNN's runtime fusion
// engines recognise as flash attention and compile into one kernel each way).
//
// Layout (cuDNN's "THD" ragged form): q, out, dout, dq [N, Hq, D]; k, v, dk, dv [N, Hkv, D],
// bf16, tokens of sequence b at rows [start_b, start_b + len_b); the statistics f32 [N, Hq],
// exactly the lse of Backend::attention_forward (natural log-sum-exp of the scaled scores), so
// a forward on cuDNN and a backward on foremoe's kernel (or the reverse) agree. The graph sees
// [B, H, S, D] tensors whose batch offsets come from ragged-offset tensors (in elements) and
// whose rows past len_b are masked out (padding mask with the sequence lengths) -- S is an
// upper bound of the lengths, rounded up to a power of two so a plan serves many batches.
//
// One CudnnSdpa per backend: a cuDNN handle on the backend's stream and one execution plan
// per (direction, batch, S bound, Hq, Hkv, D), built on first use (the heuristic's first
// engine that finalises) and kept. A shape cuDNN has no engine for is remembered with the
// reason, and the caller runs its own kernel. The header names no cuDNN or CUDA type, so it
// builds without them too (cudnn_sdpa_stub.cpp, in builds without cuDNN or without CUDA:
// available() is false).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "engine/cuda/sdpa_layout.h"

struct CUstream_st;  // cudaStream_t, without the CUDA headers (CPU-only builds test this)

namespace fm::cuda {

struct SdpaProblem {
  bool backward = false;
  int64_t batch = 0;    // sequences B (each non-empty)
  int64_t max_len = 0;  // S: >= every sequence's length
  int64_t hq = 0, hkv = 0, dim = 0;
};

// Device pointers of one call. seq_len int32 [B]; the ragged offsets int64 [B + 1], in
// elements: qo = start * Hq * D (q, out, dout, dq), kv = start * Hkv * D (k, v, dk, dv),
// stats = start * Hq (lse).
struct SdpaArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;            // forward: written
  float* lse = nullptr;           // forward: written
  const void* out_in = nullptr;   // backward: the forward's out
  const float* lse_in = nullptr;  // backward: the forward's lse
  const void* dout = nullptr;     // backward
  void* dq = nullptr;             // backward: written (and dk, dv)
  void* dk = nullptr;
  void* dv = nullptr;
  const int32_t* seq_len = nullptr;
  const int64_t* ragged_qo = nullptr;
  const int64_t* ragged_kv = nullptr;
  const int64_t* ragged_stats = nullptr;
  float scale = 1.0f;
};

// What check_graph found: cuDNN's refusal ("" when it accepted everything), the graph's
// operation count and, with a device description, the engine cuDNN chose (its global index),
// whether the compiled plan also loaded (not where the CUDA driver is the toolkit's stub,
// which compiles but cannot load), and then its workspace.
struct SdpaCheck {
  std::string refusal;
  size_t operations = 0;
  int64_t engine = -1;
  bool loaded = false;
  size_t workspace = 0;
};

class CudnnSdpa {
 public:
  // Whether this build has cuDNN at all.
  static bool available();
  // Builds the graph of `p` (the deterministic backward or the one with an f32 dQ buffer)
  // without a device: every tensor and operation descriptor and the operation graph,
  // finalised by cuDNN, which checks their shapes, types and links; with `device_json` (a
  // cuDNN device-properties description, see tests/engine/cuda_cudnn_attention_test.cpp)
  // also cuDNN's engine choice and the execution plan for that device, compiled without it
  // (cuDNN's compiler needs a CUDA driver library: a real one, or the toolkit's stub loaded
  // first). Lets a machine without a GPU check the graphs.
  static SdpaCheck check_graph(const SdpaProblem& p, bool deterministic,
                               const std::string& device_json = "");

  // Creates the cuDNN handle on `stream` (the device must be current). Throws naming the
  // failing call.
  explicit CudnnSdpa(CUstream_st* stream);
  ~CudnnSdpa();
  CudnnSdpa(const CudnnSdpa&) = delete;
  CudnnSdpa& operator=(const CudnnSdpa&) = delete;

  // The plan for `p`, built on first use: true and its workspace size, or false and why
  // cuDNN cannot run `p` (no engine, a head dim it does not take); the answer is kept.
  bool prepare(const SdpaProblem& p, size_t* workspace_bytes, std::string* why);
  // Queues the prepared problem on the stream; `workspace` holds the prepared size.
  void run(const SdpaProblem& p, const SdpaArgs& args, void* workspace);

  size_t plans() const;  // plans built (problems cuDNN runs)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fm::cuda
