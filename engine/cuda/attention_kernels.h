// Launchers for the CUDA backend's RoPE and attention kernels (attention.cu; the
// embedding ops use the row gather / scatter-add of routing_kernels.h): raw device pointers, sizes
// and the stream. Shape, dtype and index checks happen in the caller (backend_attention.cpp); these
// only launch and check the launch. Each template is instantiated for float, double and bf16
// storage (__nv_bfloat16, kernels.h): T is the storage of q, k, v, out and their gradients (and
// the KV cache); lse, delta and scale are compute_t<T> (f32 for bf16), so a bf16 call computes
// exactly what the f32 kernel does on the widened values and rounds each stored output once.
//
// Like kernels.h this header is shared by nvcc (C++17) and the host compiler,
// so it includes no engine header outside engine/cuda/.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "engine/cuda/kernels.h"

namespace fm::cuda {

// --- attention.cu -------------------------------------------------------------
// x [N, H, D] in place, pos [N]; angles in f64 as in engine/cpu/rope.h. T: float, double,
// or bf16 (__nv_bfloat16, kernels.h), rotated in f32.
template <class T>
void launch_rope(T* x, const int32_t* pos, int64_t n, int64_t heads, int64_t dim, double theta,
                 bool inverse, cudaStream_t s);

// The widest head dim the attention kernels take (each lane keeps D / 32 accumulators).
inline constexpr int64_t kAttentionMaxHeadDim = 512;

struct AttentionShape {
  int64_t n;    // tokens (N)
  int64_t hq;   // query heads
  int64_t hkv;  // key/value heads, dividing hq
  int64_t dim;  // head dim D <= kAttentionMaxHeadDim
};

// Causal packed attention. seq_off [S + 1] already checked (0 = seq_off[0] <= ... =
// seq_off[S] = N). out [N, Hq, D], lse [N, Hq].
template <class T>
void launch_attention_forward(T* out, compute_t<T>* lse, const T* q, const T* k, const T* v,
                              const int32_t* seq_off, int64_t num_seqs, const AttentionShape& d,
                              compute_t<T> scale, cudaStream_t s);

// dq [N, Hq, D], dk/dv [N, Hkv, D] written; delta [N, Hq] = rowwise dout . out, computed by
// the caller (launch_rowwise_dot<T, compute_t<T>>).
template <class T>
void launch_attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k,
                               const T* v, const compute_t<T>* lse, const compute_t<T>* delta,
                               const int32_t* seq_off, int64_t num_seqs, const AttentionShape& d,
                               compute_t<T> scale, cudaStream_t s);

// Attention against a KV cache [S, T, Hkv, D]; slot/pos [N] already checked. Rows are
// bit-identical to launch_attention_forward's for the same keys (one row function).
template <class T>
void launch_attention_cached(T* out, const T* q, const T* k_cache, const T* v_cache,
                             const int32_t* slot, const int32_t* pos, const AttentionShape& d,
                             int64_t max_len, compute_t<T> scale, cudaStream_t s);

}  // namespace fm::cuda
