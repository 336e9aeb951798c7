// Backend: the op set the model is written against. The CPU backend
// (engine/cpu) is the readable fp32 reference (f64 too, for gradient checks);
// the CUDA backend (engine/cuda) is the fast path. Model code never touches
// element data directly except through these ops and host copies.
//
// Conventions
// - Row-major, contiguous. N = tokens, C = channels, V = vocab, E = experts,
//   K = experts per token (top-k), F = FFN width, H = heads, D = head dim.
// - Float tensors of one call share one dtype (f32 or f64 on the CPU); index
//   tensors are i32. bf16 tensors may stand in for f32 ones, mixed freely with f32
//   but never with f64: bf16 storage, f32 arithmetic, each output rounded once
//   (engine/mixed_precision.h has the exact rule; the CPU backend follows it for every op).
// - "backward" ops ACCUMULATE into weight gradients (dw += ...) and WRITE
//   input gradients (dx = ...) unless the comment says otherwise.
// - Every op gives bit-identical results whatever the number of threads.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/caching_allocator.h"
#include "engine/tensor.h"

namespace fm {

// Next-token sampling parameters (model/sampling.h's SamplingConfig, as raw numbers).
struct SamplingParams {
  double temperature = 1.0;  // 0: greedy (argmax, lowest id on ties)
  int64_t top_k = 0;         // 0: every token
  double top_p = 1.0;        // 1: every token
  int64_t vocab = 0;         // sample ids below this (<= V); 0: all V
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual const char* name() const = 0;

  // Makes this backend's device (and, on CUDA, its stream) the calling thread's current
  // one: where Tensor::empty allocates and which pool of the caching allocator serves it.
  // Every op and empty() call it; cheap.
  virtual void activate() const {}

  // Index-range checks that need device data (embedding ids, row indices, KV-cache slot and
  // position, top-k ids of gather_cols / scatter_add_cols): on a device backend each costs a
  // synchronisation, so a caller that built every index tensor of some work on the host and
  // validated it there may turn them off around that work (IndexChecksOff) - the KV-cached
  // forward does, which keeps decode from draining the GPU once per layer. The CPU backend's
  // checks cost nothing and always run. On by default.
  virtual void set_device_index_checks(bool on) { (void)on; }
  virtual bool device_index_checks() const { return true; }
  // While its index checks are off, a device backend also defers the checks that read back
  // what a kernel found in device data (top-k's NaN rows, sort_assignments' key range): the
  // kernels record the first bad row in a device status, and their outputs stay in range (a
  // NaN row selects experts 0..K-1, a bad key sorts as 0) so later ops read nothing wild.
  // raise_deferred_errors reads that status (one synchronisation) and throws the first error
  // recorded since its last call, with the op's message. The CPU backend checks eagerly:
  // nothing is ever deferred there.
  virtual void raise_deferred_errors() {}

  // --- memory ---------------------------------------------------------------
  Tensor empty(Shape shape, DType dtype) {
    activate();
    return Tensor::empty(std::move(shape), dtype, device());
  }
  Tensor zeros(Shape shape, DType dtype);
  virtual void fill(Tensor& x, double value) = 0;
  // Copies between any two devices this backend can reach (host <-> device included).
  virtual void copy(Tensor& dst, const Tensor& src) = 0;
  // dst = src converted between float dtypes (f32, f64, bf16; same shape, any devices this
  // backend reaches); narrowing rounds to nearest even. Equal dtypes copy. The default
  // converts on the host (staging device tensors there); device backends override it.
  virtual void convert(Tensor& dst, const Tensor& src);
  Tensor to_host(const Tensor& x);
  // Host data -> a new tensor on this backend. Float data converts to `dtype` (f32, f64, or
  // bf16: rounded to nearest even through f32, as convert does).
  Tensor upload(const std::vector<double>& host, Shape shape, DType dtype);
  Tensor upload(const std::vector<int32_t>& host, Shape shape);
  // Any f32, f64 or bf16 tensor -> host doubles (exact); any i32 tensor -> host ints.
  std::vector<double> download_f64(const Tensor& x);
  std::vector<int32_t> download_i32(const Tensor& x);
  virtual void synchronize() {}

  // --- dense linear algebra ---------------------------------------------------
  // c = alpha * op(a) @ op(b) + beta * c, op(a) [M, K], op(b) [K, N], c [M, N].
  virtual void matmul(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                      double alpha = 1.0, double beta = 0.0) = 0;
  // Grouped GEMM over row groups: rows [off[g], off[g+1]) of x and y belong to
  // group g (off.size() == G + 1, off.back() == rows).
  //   y_g = x_g @ (trans_w ? w[g]^T : w[g]),  w [G, R, S]
  virtual void grouped_matmul(Tensor& y, const Tensor& x, const Tensor& w, bool trans_w,
                              const std::vector<int64_t>& off) = 0;
  //   dw[g] += dy_g^T @ x_g,  dy [rows, R], x [rows, S], dw [G, R, S]
  virtual void grouped_weight_grad(Tensor& dw, const Tensor& dy, const Tensor& x,
                                   const std::vector<int64_t>& off) = 0;
  // grouped_matmul with the offsets in an i32 [G + 1] tensor on this backend, as
  // sort_assignments makes them: a device backend runs it without a host round trip (the
  // decode path). off must be a valid partition (0 = off[0] <= ... <= off[G] = rows); a device
  // backend trusts it. The default downloads off and calls grouped_matmul.
  virtual void grouped_matmul_device(Tensor& y, const Tensor& x, const Tensor& w, bool trans_w,
                                     const Tensor& off);

  // --- elementwise and reductions ----------------------------------------------
  virtual void axpy(Tensor& y, double alpha, const Tensor& x) = 0;  // y += alpha * x
  virtual void scale(Tensor& x, double alpha) = 0;                  // x *= alpha
  virtual double sum_squares(const Tensor& x) = 0;                  // sum of x^2, in f64
  // out[n] = sum_c a[n, c] * b[n, c]
  virtual void rowwise_dot(Tensor& out, const Tensor& a, const Tensor& b) = 0;
  // out[c] = sum_n x[n, c]   (written, not accumulated)
  virtual void column_sum(Tensor& out, const Tensor& x) = 0;
  // x[n, c] += alpha * v[c]
  virtual void add_row_vector(Tensor& x, const Tensor& v, double alpha) = 0;

  // out[m, :] = w[m] * x[m, :]  (x, out [M, C], w [M]). The default composes scatter_add_rows;
  // backends override it with a direct kernel.
  virtual void scale_rows(Tensor& out, const Tensor& x, const Tensor& w);

  // --- embedding ----------------------------------------------------------------
  // out[n, :] = table[ids[n], :]; ids out of [0, V) throw.
  virtual void embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) = 0;
  // dtable[ids[n], :] += dout[n, :]
  virtual void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) = 0;

  // --- RMSNorm over the last dim: y = x / sqrt(mean(x^2) + eps) * w -------------------
  // x, y [N, C], w [C], rstd [N] (saved for backward).
  virtual void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w,
                               double eps) = 0;
  // dx = d/dx (written), dw += d/dw
  virtual void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x,
                                const Tensor& w, const Tensor& rstd) = 0;

  // --- rotary position embedding, in place on x [N, H, D] (D even) --------------------
  // Pairs (i, i + D/2) rotate by angle pos[n] * theta^(-2i/D) (the "rotate_half" layout).
  // inverse = true rotates by the negative angle, which is the backward.
  virtual void rope(Tensor& x, const Tensor& pos, double theta, bool inverse) = 0;

  // --- causal attention over packed variable-length sequences ------------------------
  // q [N, Hq, D], k/v [N, Hkv, D] (Hq % Hkv == 0, grouped-query), seq_off i32 [S + 1]:
  // sequence s is tokens [seq_off[s], seq_off[s + 1]); token i attends to j <= i of its own
  // sequence. out [N, Hq, D]; lse [N, Hq] (log-sum-exp of the scaled scores, for backward).
  virtual void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                                 const Tensor& v, const Tensor& seq_off, double scale) = 0;
  // dq, dk, dv written.
  virtual void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                                  const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, const Tensor& seq_off,
                                  double scale) = 0;

  // Attention of N new tokens against a KV cache. k_cache/v_cache [S, T, Hkv, D]; q, out
  // [N, Hq, D]; slot, pos i32 [N]: token n is at position pos[n] of cache slot slot[n] (its
  // own k/v already written there) and attends to positions 0 .. pos[n] of that slot. Rows
  // equal attention_forward's for the same keys (prefill and decode share one op).
  virtual void attention_cached(Tensor& out, const Tensor& q, const Tensor& k_cache,
                                const Tensor& v_cache, const Tensor& slot, const Tensor& pos,
                                double scale) = 0;

  // --- SwiGLU: h = silu(gate) * up, all [N, F] ------------------------------------------
  virtual void swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up) = 0;
  virtual void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dh, const Tensor& gate,
                               const Tensor& up) = 0;

  // --- router pieces --------------------------------------------------------------------
  // Row softmax: probs [N, E] from logits [N, E]; backward writes dlogits.
  virtual void softmax_forward(Tensor& probs, const Tensor& logits) = 0;
  virtual void softmax_backward(Tensor& dlogits, const Tensor& dprobs, const Tensor& probs) = 0;
  // Top-k selection by score + bias (bias [E] may be undefined = zero). ids [N, K] i32 in
  // descending order of (score + bias), ties to the lower expert id.
  virtual void topk(Tensor& ids, const Tensor& scores, const Tensor& bias) = 0;
  // out[n, k] = x[n, ids[n, k]]
  virtual void gather_cols(Tensor& out, const Tensor& x, const Tensor& ids) = 0;
  // dx[n, ids[n, k]] += dout[n, k]
  virtual void scatter_add_cols(Tensor& dx, const Tensor& dout, const Tensor& ids) = 0;
  // g = p / sum_k p over each row of [N, K]; backward writes dp.
  virtual void normalize_rows_forward(Tensor& g, const Tensor& p) = 0;
  virtual void normalize_rows_backward(Tensor& dp, const Tensor& dg, const Tensor& p) = 0;

  // --- token permutation for experts ----------------------------------------------------
  // out[m, :] = src[idx[m], :]
  virtual void gather_rows(Tensor& out, const Tensor& src, const Tensor& idx) = 0;
  // dst[idx[m], :] = src[m, :] (idx entries distinct): e.g. writing new keys into a KV cache.
  virtual void scatter_rows(Tensor& dst, const Tensor& src, const Tensor& idx) = 0;
  // dst[idx[m], :] += w[m] * src[m, :] (w [M] may be undefined = 1), summed in order of m.
  virtual void scatter_add_rows(Tensor& dst, const Tensor& src, const Tensor& idx,
                                const Tensor& w) = 0;
  // The expert permutation of key i32 [N, K] (expert ids in [0, G), G = offsets.numel() - 1),
  // engine/assignments.h's sort_assignments_host where the ids live: perm_assign i32 [N*K]
  // the assignments n*K + k grouped by key, ascending within a key; perm_token i32 [N*K]
  // their tokens; offsets i32 [G + 1] the group starts. A key outside [0, G) throws (deferred
  // while index checks are off, see raise_deferred_errors). The default sorts on the host.
  virtual void sort_assignments(Tensor& offsets, Tensor& perm_assign, Tensor& perm_token,
                                const Tensor& key);

  // --- LM head loss pieces --------------------------------------------------------------
  // From logits [N, V] and targets i32 [N]: logp[n] = log softmax(logits[n])[targets[n]],
  // entropy[n] = -sum_v p log p, lse[n] = logsumexp(logits[n]) (saved for backward).
  // A target < 0 means "no target": logp[n] = 0.
  virtual void logprob_forward(Tensor& logp, Tensor& entropy, Tensor& lse, const Tensor& logits,
                               const Tensor& targets) = 0;
  // dlogits[n, :] = dlogp[n] * d logp[n]/d logits[n] + dentropy[n] * d entropy[n]/d logits[n]
  // (written). dentropy may be undefined (= 0).
  virtual void logprob_backward(Tensor& dlogits, const Tensor& dlogp, const Tensor& dentropy,
                                const Tensor& logits, const Tensor& lse, const Tensor& targets) = 0;

  // --- next-token sampling on the device ----------------------------------------------------
  // Backends that return true implement sample_rows; generation otherwise downloads the
  // logits and samples on the host (model/sampling.h).
  virtual bool samples_on_device() const { return false; }
  // Row r of logits [R, V] with the uniform u[r] (f64 [R], in [0, 1)): the token
  // model/sampling.h's sample_token draws for `params`. Writes ids i32 [R], logp f64 [R]
  // (log-probability under the sampling distribution) and model_logp f64 [R] (log softmax
  // over all V at temperature 1). Throws for a non-finite logit below params.vocab.
  virtual void sample_rows(Tensor& ids, Tensor& logp, Tensor& model_logp, const Tensor& logits,
                           const Tensor& u, const SamplingParams& params);

  // --- optimizer --------------------------------------------------------------------------
  // AdamW with decoupled weight decay on param/grad/m/v of equal shape (each f32 or bf16):
  //   m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2
  //   p -= lr * (m / (1-b1^t) / (sqrt(v / (1-b2^t)) + eps) + wd * p)
  virtual void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr,
                          double beta1, double beta2, double eps, double weight_decay,
                          int64_t step) = 0;
};

// Turns a backend's device index checks off for its lifetime, then restores them.
class IndexChecksOff {
 public:
  explicit IndexChecksOff(Backend& backend)
      : backend_(backend), was_on_(backend.device_index_checks()) {
    backend_.set_device_index_checks(false);
  }
  ~IndexChecksOff() { backend_.set_device_index_checks(was_on_); }
  IndexChecksOff(const IndexChecksOff&) = delete;
  IndexChecksOff& operator=(const IndexChecksOff&) = delete;

 private:
  Backend& backend_;
  bool was_on_;
};

// The CPU reference backend (always available).
std::unique_ptr<Backend> make_cpu_backend();
// The CUDA backend; throws when the build has no CUDA or no GPU is present.
std::unique_ptr<Backend> make_cuda_backend(int device_index = 0);
// True when this build has the CUDA backend and a GPU is visible.
bool cuda_available();
// GPUs visible to this process (0 without the CUDA backend or a driver).
int cuda_device_count();

// Where a job runs, by name: "cpu", "cuda" (the GPU of the rank's local index modulo the
// visible GPUs: one GPU per rank of a node, or all ranks on one GPU) or "cuda:N".
struct DeviceChoice {
  DeviceKind kind = DeviceKind::cpu;
  int index = -1;  // cuda: the GPU, or -1 for "by local rank"
};
// Throws naming `name` when it is none of the three forms.
DeviceChoice parse_device(const std::string& name);
// The backend for `name` on the rank of local index `local_rank`; throws (naming the device)
// when the build or the machine has no such GPU.
std::unique_ptr<Backend> make_backend(const std::string& name, int local_rank = 0);
// The CUDA caching allocator's figures (engine/caching_allocator.h: bytes in use and reserved,
// their peaks); all zero in builds without CUDA. Peak GPU memory per preset is read here.
CacheStats cuda_memory_stats();
void reset_cuda_memory_peak();

// The cuBLAS API behind a CUDA backend's dense matmul in f32 and bf16 (f64 always runs on
// classic cuBLAS): cuBLASLt, the default (engine/cuda/gemm_lt.h: one plan per shape with the
// heuristic's algorithm), or classic cuBLAS (cublasSgemm / cublasGemmEx), kept to check the two
// against each other and to measure them (bench_model_gpu). Grouped expert GEMMs are not
// affected (cuBLAS's grouped-batched calls). Throws unless `cuda_backend` is a CUDA backend.
enum class CudaDenseGemm { lt, classic };
void set_cuda_dense_gemm(Backend& cuda_backend, CudaDenseGemm api);
// The path of a CUDA backend's grouped_weight_grad with bf16 dy and x (an f32 or bf16 dw; f32
// and f64 always run cuBLAS's grouped-batched call): cuBLAS, the default (an f32 dw: one
// cublasGemmEx per non-empty group, since cuBLAS's grouped-batched call takes no bf16-in /
// f32-out; a bf16 dw: one grouped-batched call), or our kernel (engine/cuda/grouped_gemm.cu:
// every group in one launch, the host offsets uploaded), kept selectable until a GPU has
// measured which is faster. Throws unless `cuda_backend` is a CUDA backend.
enum class CudaGroupedWgrad { cublas, kernel };
void set_cuda_grouped_wgrad(Backend& cuda_backend, CudaGroupedWgrad path);
// The path of a CUDA backend's attention_forward and attention_backward when q, k, v (and
// out, dout, dq, dk, dv) are bf16 and lse f32: cuDNN's fused flash attention through its graph
// API (engine/cuda/cudnn_sdpa.h), the default in builds with cuDNN, or our kernels
// (engine/cuda/attention.cu), which f32 and f64 always use, as do attention_cached (decode
// over the KV cache), head dims that are not multiples of 8, tensors not 16-byte aligned and
// any shape for which cuDNN finds no engine (counted in cudnn_fallbacks, its reason kept).
// Both compute the same lse, so a forward on one and a backward on the other agree. Throws
// unless `cuda_backend` is a CUDA backend, or when asked for cudnn in a build without cuDNN.
enum class CudaAttention { cudnn, kernel };
void set_cuda_attention(Backend& cuda_backend, CudaAttention path);
bool cuda_has_cudnn();  // the build has cuDNN (false without CUDA)
// Attention calls so far on a CUDA backend, per path, and the cuDNN plans built.
struct CudaAttentionStats {
  int64_t cudnn_forward = 0, cudnn_backward = 0, kernel_forward = 0, kernel_backward = 0;
  int64_t cudnn_plans = 0;
  int64_t cudnn_fallbacks = 0;  // calls on the cudnn path that cuDNN could not run
  std::string last_fallback;    // why the latest of them fell back
};
CudaAttentionStats cuda_attention_stats(const Backend& cuda_backend);
// GEMM calls so far on a CUDA backend: dense matmuls run on cuBLASLt, on classic cuBLAS
// (chosen, or f64), and sent back to classic cuBLAS because cuBLASLt had no algorithm for the
// shape; the cuBLASLt plans built (one per distinct shape, strides and alignments); and the
// bf16 grouped_weight_grad calls on each CudaGroupedWgrad path (calls with a non-empty dw,
// however many groups each covers).
struct CudaGemmStats {
  int64_t lt_calls = 0, classic_calls = 0, lt_fallbacks = 0, lt_plans = 0;
  int64_t grouped_wgrad_cublas_calls = 0, grouped_wgrad_kernel_calls = 0;
};
CudaGemmStats cuda_gemm_stats(const Backend& cuda_backend);
// Host-to-device copies a CUDA backend has queued through its pinned staging ring (without
// waiting for its stream) so far.
int64_t cuda_staged_uploads(const Backend& cuda_backend);

}  // namespace fm
