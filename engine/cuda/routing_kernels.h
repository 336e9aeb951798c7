// Launchers for the CUDA backend's routing, LM-head loss and sampling kernels (routing.cu,
// logprob.cu, sampling.cu): raw device pointers, sizes and the stream. Shape and dtype checks, and
// the range checks of index tensors the kernels would dereference, happen in the caller
// (backend_routing.cpp); these only launch and check the launch. Each template is
// instantiated for float and double.
//
// Error reports from inside a kernel go to one device int64 (`first_bad` below): the
// launcher sets it to -1, the kernel lowers it to the first bad row with an atomic min
// (order-independent), and the caller reads it back once.
//
// Like kernels.h this header is shared by nvcc (C++17) and the host compiler, so it
// includes no engine header.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fm::cuda {

// --- routing.cu: index checks (also used by the embedding and attention ops) -------------
// *first_bad = the smallest n with ids[n] outside [0, bound), or n_ids when there is none
// (first_bad: one device int64, overwritten).
void launch_find_bad_id(int64_t* first_bad, const int32_t* ids, int64_t n_ids, int64_t bound,
                        cudaStream_t s);

// --- routing.cu: top-k and the router's column ops over [N, E] / [N, K] ---------------
// ids [N, K] = the K largest scores[n, e] + bias[e] (bias may be null), descending, ties
// to the lower e. A row whose keys hold a NaN gets ids 0..K-1 and lowers *first_bad to its
// index (not reset here: the word may collect several calls). K <= E.
template <class T>
void launch_topk(int32_t* ids, int64_t* first_bad, const T* scores, const T* bias, int64_t rows,
                 int64_t experts, int64_t k, cudaStream_t s);
template <class T>  // out [N, K] = x [N, E] at columns ids [N, K] (ids in [0, E))
void launch_gather_cols(T* out, const T* x, const int32_t* ids, int64_t rows, int64_t experts,
                        int64_t k, cudaStream_t s);
template <class T>  // dx [N, E] at columns ids [N, K] += dout [N, K], over k in order
void launch_scatter_add_cols(T* dx, const T* dout, const int32_t* ids, int64_t rows,
                             int64_t experts, int64_t k, cudaStream_t s);
template <class T>  // g [N, K] = p / sum_k p over each row
void launch_normalize_rows_forward(T* g, const T* p, int64_t rows, int64_t k, cudaStream_t s);
template <class T>  // dp = dg / S - sum_j dg_j p_j / S^2, S = sum_j p_j
void launch_normalize_rows_backward(T* dp, const T* dg, const T* p, int64_t rows, int64_t k,
                                    cudaStream_t s);

// --- routing.cu: token permutation over rows of [R, C] / [M, C] ------------------------
// The row copies also take uint16_t: bf16 rows moved as bit patterns.
template <class T>  // out [M, C] = src [R, C] at rows idx [M] (idx in [0, R))
void launch_gather_rows(T* out, const T* src, const int32_t* idx, int64_t m, int64_t cols,
                        cudaStream_t s);
template <class T>  // dst [R, C] at rows idx [M] = src [M, C] (idx in [0, R), distinct)
void launch_scatter_rows(T* dst, const T* src, const int32_t* idx, int64_t m, int64_t cols,
                         cudaStream_t s);

// Device scratch bytes for grouping m <= INT32_MAX sources by destination row below `rows`
// (a stable radix sort): launch_find_repeated_row and launch_scatter_add_rows need it.
size_t rows_by_destination_workspace_bytes(int64_t m, int64_t rows);
// The expert permutation (Backend::sort_assignments): key [nk] i32, k per token, grouped
// by key with a stable radix sort. perm_assign[p] = the p-th assignment j in (key, j) order,
// perm_token[p] = j / k, offsets [n_keys + 1] the first position of each key (offsets[n_keys]
// = nk). A key outside [0, n_keys) sorts as 0 and lowers *first_bad (not reset) to its j.
size_t sort_assignments_workspace_bytes(int64_t nk, int64_t n_keys);
void launch_sort_assignments(int32_t* offsets, int32_t* perm_assign, int32_t* perm_token,
                             int64_t* first_bad, const int32_t* key, int64_t nk, int64_t k,
                             int64_t n_keys, void* workspace, size_t workspace_bytes,
                             cudaStream_t s);
// *first_bad = the smallest m whose idx[m] equals an earlier idx[m'], or -1. Entries outside
// [0, rows) are never dereferenced (they may give a wrong answer: range-check them too).
void launch_find_repeated_row(int64_t* first_bad, const int32_t* idx, int64_t m, int64_t rows,
                              void* workspace, size_t workspace_bytes, cudaStream_t s);
// dst [R, C] at rows idx [M] += w[m] * src [M, C] (w may be null = 1). Each destination row
// adds its sources in ascending m, one rounding per multiply and per add as the CPU does:
// no float atomics, so the result repeats bit for bit. idx already checked in [0, R).
// T: float, double, or bf16 (summed in f32, each destination rounded once).
template <class T>
void launch_scatter_add_rows(T* dst, const T* src, const int32_t* idx, const T* w, int64_t m,
                             int64_t rows, int64_t cols, void* workspace, size_t workspace_bytes,
                             cudaStream_t s);

// --- logprob.cu: LM-head log-prob over logits [N, V] ------------------------------------
// logp, entropy, lse [N]; targets [N] (< 0: no target, logp 0). *first_bad = the first row
// whose target is >= V (its outputs are unspecified), or -1. TL, the logits' (and dlogits')
// storage: T, or bf16 (__nv_bfloat16) with T = float, computed in f32.
template <class T, class TL = T>
void launch_logprob_forward(T* logp, T* entropy, T* lse, int64_t* first_bad, const TL* logits,
                            const int32_t* targets, int64_t rows, int64_t vocab, cudaStream_t s);
// dlogits [N, V] written; dentropy may be null (= 0). *first_bad as for the forward.
template <class T, class TL = T>
void launch_logprob_backward(TL* dlogits, int64_t* first_bad, const T* dlogp, const T* dentropy,
                             const TL* logits, const T* lse, const int32_t* targets, int64_t rows,
                             int64_t vocab, cudaStream_t s);

// --- sampling.cu: next-token sampling over logits [R, V] ------------------------------------
// Row r: the token model/sampling.h's sample_token draws with u[r] over the columns below
// `vocab` (<= V) for temperature (0: greedy), top_k (0: all) and top_p (1: all): ids [R],
// logp [R] (under the truncated, renormalised distribution), model_logp [R] (log softmax over
// all V). *first_bad = the first row with a non-finite logit below `vocab` (its outputs
// unspecified), or -1. rows x vocab <= INT32_MAX. Workspace: sample_rows_workspace_bytes
// (zero unless top_k or top_p truncates, which sorts each row).
template <class T>
size_t sample_rows_workspace_bytes(int64_t rows, int64_t vocab, int64_t top_k, double top_p,
                                   double temperature);
template <class T>
void launch_sample_rows(int32_t* ids, double* logp, double* model_logp, int64_t* first_bad,
                        const T* logits, const double* u, int64_t rows, int64_t V, int64_t vocab,
                        double temperature, int64_t top_k, double top_p, void* workspace,
                        size_t workspace_bytes, cudaStream_t s);

}  // namespace fm::cuda
