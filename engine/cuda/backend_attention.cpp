// CudaBackend ops: embedding, RoPE, attention. Each checks its arguments the way the
// CPU backend does (engine/cpu/cpu_gemm_attention.cpp), then calls the launchers of
// attention.cu (attention_kernels.h); the embedding lookup and its backward are the row
// gather and scatter-add of routing.cu, as on the CPU (index checks: index_checks.h).
//
// Index checks need device data on the host, so they cost a stream synchronisation:
// - ids (embedding), slot and pos (attention_cached): one kernel finds the first
//   out-of-range entry, one copy brings back 8 bytes per checked tensor, then
//   one sync per op call (two more tiny copies on the error path, for the message);
// - seq_off (attention_forward/backward): copied to the host (S + 1 ints) and
//   checked there, one sync per op call.
// The kernels themselves never see a bad index.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <climits>

#include "engine/cuda/attention_kernels.h"
#include "engine/cuda/index_checks.h"

namespace fm::cuda {

namespace {

// Checks q, k, v, seq_off shapes and dtypes as the CPU backend does (placement is checked
// by the caller); returns the dims.
AttentionShape check_attention(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& seq_off) {
  check_float(q, 3, op, "q");
  const int64_t n = q.dim(0), hq = q.dim(1), dim = q.dim(2);
  FM_CHECK(k.dtype() == q.dtype() && k.rank() == 3 && k.dim(0) == n && k.dim(2) == dim &&
               k.dim(1) > 0 && hq % k.dim(1) == 0,
           "CUDA backend: {}: k must be {}[{}, Hkv, {}] with Hkv dividing Hq = {} but is {}", op,
           dtype_name(q.dtype()), n, dim, hq, k.describe());
  check_like(v, k, op, "v");
  FM_CHECK(seq_off.dtype() == DType::i32 && seq_off.rank() == 1 && seq_off.dim(0) >= 1,
           "CUDA backend: {}: seq_off must be i32[S + 1] but is {}", op, seq_off.describe());
  FM_CHECK(dim <= kAttentionMaxHeadDim,
           "CUDA backend: {}: head dim {} is above the kernels' limit of {} (q is {})", op, dim,
           kAttentionMaxHeadDim, q.describe());
  return {n, hq, k.dim(1), dim};
}

// seq_off lives on the device: copied to the host (S + 1 ints, one sync) and checked
// there with the CPU's rules: 0 = seq_off[0] <= ... <= seq_off[S] = N.
std::vector<int32_t> check_seq_off(cudaStream_t stream, const char* op, const Tensor& seq_off,
                                   int64_t n) {
  std::vector<int32_t> off(static_cast<size_t>(seq_off.numel()));
  FM_CUDA_CHECK(cudaMemcpyAsync(off.data(), seq_off.raw(), sizeof(int32_t) * off.size(),
                                cudaMemcpyDeviceToHost, stream));
  FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  const size_t s = off.size() - 1;
  FM_CHECK(off[0] == 0 && off[s] == n,
           "CUDA backend: {}: seq_off must run from 0 to N = {} but is {}..{}", op, n, off[0],
           off[s]);
  for (size_t i = 0; i < s; ++i)
    FM_CHECK(off[i] <= off[i + 1],
             "CUDA backend: {}: seq_off must be non-decreasing but seq_off[{}] = {} > "
             "seq_off[{}] = {}",
             op, i, off[i], i + 1, off[i + 1]);
  return off;
}

// The arguments both directions pass to cuDNN's attention: the inputs and the scale.
SdpaArgs sdpa_inputs(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  SdpaArgs a;
  a.q = q.raw();
  a.k = k.raw();
  a.v = v.raw();
  a.scale = static_cast<float>(scale);
  return a;
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace

// cuDNN's THD form (cudnn_sdpa.h, sdpa_layout.h) over the non-empty sequences of `off`: their
// lengths (i32 [B]) and ragged offsets (i64), uploaded through the staging ring (no sync).
bool CudaBackend::try_cudnn_attention(const char* op, SdpaProblem p,
                                      const std::vector<int32_t>& off, SdpaArgs a) {
  if (attention_ != CudaAttention::cudnn) return false;
  const auto fall_back = [&](std::string why) {
    ++attention_stats_.cudnn_fallbacks;
    if (why != attention_stats_.last_fallback)
      spdlog::warn(
          "CUDA backend: {}: cuDNN attention cannot run this call ({}); foremoe's "
          "attention kernel runs it",
          op, why);
    attention_stats_.last_fallback = std::move(why);
    return false;
  };
  const SdpaLayout layout = sdpa_layout(off, p.hq, p.hkv, p.dim);
  if (layout.batch == 0) return fall_back("no token to attend");
  if (p.dim % 8 != 0) return fall_back(fmt::format("head dim {} is not a multiple of 8", p.dim));
  for (const void* ptr : {a.q, a.k, a.v, a.dout, a.out_in, static_cast<const void*>(a.lse_in),
                          static_cast<const void*>(a.out), static_cast<const void*>(a.lse),
                          static_cast<const void*>(a.dq), static_cast<const void*>(a.dk),
                          static_cast<const void*>(a.dv)})
    if (ptr != nullptr && !aligned16(ptr)) return fall_back("a tensor is not 16-byte aligned");
  p.batch = layout.batch;
  p.max_len = layout.max_len;
  if (!sdpa_) sdpa_ = std::make_unique<CudnnSdpa>(stream_);
  size_t workspace_bytes = 0;
  std::string why;
  if (!sdpa_->prepare(p, &workspace_bytes, &why)) return fall_back(why);

  const int64_t b = p.batch;
  Tensor host_len = Tensor::empty({b}, DType::i32);
  std::copy(layout.seq_len.begin(), layout.seq_len.end(), host_len.data<int32_t>());
  const int64_t entries = static_cast<int64_t>(layout.offsets.size());
  Tensor host_off = Tensor::empty({entries}, DType::i64);
  std::copy(layout.offsets.begin(), layout.offsets.end(), host_off.data<int64_t>());
  Tensor dev_len = empty({b}, DType::i32), dev_off = empty({entries}, DType::i64);
  copy(dev_len, host_len);
  copy(dev_off, host_off);
  a.seq_len = ptr<int32_t>(dev_len);
  a.ragged_qo = ptr<int64_t>(dev_off);
  a.ragged_kv = a.ragged_qo + layout.segment;
  a.ragged_stats = a.ragged_qo + 2 * layout.segment;
  Tensor workspace =
      empty({std::max<int64_t>(1, static_cast<int64_t>(workspace_bytes))}, DType::u8);
  sdpa_->run(p, a, workspace.raw());
  return true;
}

// --- embedding --------------------------------------------------------------------------

void CudaBackend::embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) {
  const char* op = "embedding_forward";
  on_device(out, op, "out");
  on_device(table, op, "table");
  on_device(ids, op, "ids");
  if (!(is_bf16(out) && is_bf16(table)))  // bf16 rows are copied as they are
    if (WidenedArgs w(*this, op, {{&out, kOut}, {&table, kIn}}); w.any()) {
      embedding_forward(w[0], w[1], ids);
      return w.finish();
    }
  check_float(table, 2, op, "table");
  const int64_t vocab = table.dim(0), cols = table.dim(1);
  check_shape(ids, {ids.numel()}, op, "ids");
  check_same_dtype(ids, DType::i32, op, "ids");
  check_shape(out, {ids.numel(), cols}, op, "out");
  check_same_dtype(out, table.dtype(), op, "out");
  activate();
  check_indices(*this, stream_, op, {{"ids", &ids, vocab}});
  if (is_bf16(table)) {
    launch_gather_rows<uint16_t>(ptr<uint16_t>(out), ptr<uint16_t>(table), ptr<int32_t>(ids),
                                 ids.numel(), cols, stream_);
    return;
  }
  dispatch_float(table.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_gather_rows<T>(ptr<T>(out), ptr<T>(table), ptr<int32_t>(ids), ids.numel(), cols,
                          stream_);
  });
}

void CudaBackend::embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) {
  const char* op = "embedding_backward";
  on_device(dtable, op, "dtable");
  on_device(dout, op, "dout");
  on_device(ids, op, "ids");
  if (!(is_bf16(dtable) && is_bf16(dout)))
    if (WidenedArgs w(*this, op, {{&dtable, kInOut}, {&dout, kIn}}); w.any()) {
      embedding_backward(w[0], w[1], ids);
      return w.finish();
    }
  check_float(dtable, 2, op, "dtable");
  const int64_t vocab = dtable.dim(0), cols = dtable.dim(1), n = ids.numel();
  check_shape(ids, {n}, op, "ids");
  check_same_dtype(ids, DType::i32, op, "ids");
  check_shape(dout, {n, cols}, op, "dout");
  check_same_dtype(dout, dtable.dtype(), op, "dout");
  FM_CHECK(n <= INT_MAX, "CUDA backend: {}: {} ids is above the sort's limit of {}", op, n,
           INT_MAX);
  activate();
  check_indices(*this, stream_, op, {{"ids", &ids, vocab}});
  if (n == 0 || cols == 0) return;
  const size_t bytes = rows_by_destination_workspace_bytes(n, vocab);
  Tensor workspace = empty({static_cast<int64_t>(bytes)}, DType::u8);
  dispatch_storage(dtable.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_scatter_add_rows<T>(ptr<T>(dtable), ptr<T>(dout), ptr<int32_t>(ids), nullptr, n, vocab,
                               cols, workspace.raw(), bytes, stream_);
  });
}

// --- rotary position embedding --------------------------------------------------------------

void CudaBackend::rope(Tensor& x, const Tensor& pos, double theta, bool inverse) {
  const char* op = "rope";
  on_device(x, op, "x");
  on_device(pos, op, "pos");
  check_float(x, 3, op, "x");  // bf16 rotates natively
  const int64_t n = x.dim(0), heads = x.dim(1), dim = x.dim(2);
  FM_CHECK(dim % 2 == 0, "CUDA backend: rope: the head dim of x must be even but x is {}",
           x.describe());
  FM_CHECK(theta > 0, "CUDA backend: rope: theta must be > 0 but is {}", theta);
  check_shape(pos, {n}, op, "pos");
  check_same_dtype(pos, DType::i32, op, "pos");
  activate();
  dispatch_storage(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_rope<T>(ptr<T>(x), ptr<int32_t>(pos), n, heads, dim, theta, inverse, stream_);
  });
}

// --- attention ------------------------------------------------------------------------------

void CudaBackend::attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                                    const Tensor& v, const Tensor& seq_off, double scale) {
  const char* op = "attention_forward";
  on_device(out, op, "out");
  on_device(lse, op, "lse");
  on_device(q, op, "q");
  on_device(k, op, "k");
  on_device(v, op, "v");
  on_device(seq_off, op, "seq_off");
  // bf16 q, k, v, out with an f32 lse: native (computed in f32, each output rounded once).
  const bool native_bf16 =
      is_bf16(out) && is_bf16(q) && is_bf16(k) && is_bf16(v) && lse.dtype() == DType::f32;
  if (!native_bf16)
    if (WidenedArgs w(*this, op, {{&out, kOut}, {&lse, kOut}, {&q, kIn}, {&k, kIn}, {&v, kIn}});
        w.any()) {
      attention_forward(w[0], w[1], w[2], w[3], w[4], seq_off, scale);
      return w.finish();
    }
  const AttentionShape d = check_attention(op, q, k, v, seq_off);
  check_like(out, q, op, "out");
  check_shape(lse, {d.n, d.hq}, op, "lse");
  check_same_dtype(lse, native_bf16 ? DType::f32 : q.dtype(), op, "lse");
  activate();
  const std::vector<int32_t> off = check_seq_off(stream_, op, seq_off, d.n);
  if (native_bf16 && d.n > 0) {
    SdpaArgs a = sdpa_inputs(q, k, v, scale);
    a.out = out.raw();
    a.lse = ptr<float>(lse);
    if (try_cudnn_attention(op, {false, 0, 0, d.hq, d.hkv, d.dim}, off, a)) {
      ++attention_stats_.cudnn_forward;
      return;
    }
  }
  ++attention_stats_.kernel_forward;
  dispatch_storage(q.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    launch_attention_forward<T>(ptr<T>(out), ptr<C>(lse), ptr<T>(q), ptr<T>(k), ptr<T>(v),
                                ptr<int32_t>(seq_off), seq_off.numel() - 1, d,
                                static_cast<C>(scale), stream_);
  });
}

void CudaBackend::attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                                     const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& out, const Tensor& lse, const Tensor& seq_off,
                                     double scale) {
  const char* op = "attention_backward";
  on_device(dq, op, "dq");
  on_device(dk, op, "dk");
  on_device(dv, op, "dv");
  on_device(dout, op, "dout");
  on_device(q, op, "q");
  on_device(k, op, "k");
  on_device(v, op, "v");
  on_device(out, op, "out");
  on_device(lse, op, "lse");
  on_device(seq_off, op, "seq_off");
  // bf16 dq, dk, dv, dout, q, k, v, out with an f32 lse: native (delta in f32).
  const bool native_bf16 = is_bf16(dq) && is_bf16(dk) && is_bf16(dv) && is_bf16(dout) &&
                           is_bf16(q) && is_bf16(k) && is_bf16(v) && is_bf16(out) &&
                           lse.dtype() == DType::f32;
  if (!native_bf16)
    if (WidenedArgs w(*this, op,
                      {{&dq, kOut},
                       {&dk, kOut},
                       {&dv, kOut},
                       {&dout, kIn},
                       {&q, kIn},
                       {&k, kIn},
                       {&v, kIn},
                       {&out, kIn},
                       {&lse, kIn}});
        w.any()) {
      attention_backward(w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], seq_off, scale);
      return w.finish();
    }
  const AttentionShape d = check_attention(op, q, k, v, seq_off);
  check_like(out, q, op, "out");
  check_like(dout, q, op, "dout");
  check_like(dq, q, op, "dq");
  check_like(dk, k, op, "dk");
  check_like(dv, k, op, "dv");
  const DType compute = native_bf16 ? DType::f32 : q.dtype();  // of lse and delta
  check_shape(lse, {d.n, d.hq}, op, "lse");
  check_same_dtype(lse, compute, op, "lse");
  activate();
  const std::vector<int32_t> off = check_seq_off(stream_, op, seq_off, d.n);
  if (native_bf16 && d.n > 0) {
    SdpaArgs a = sdpa_inputs(q, k, v, scale);
    a.out_in = out.raw();
    a.lse_in = ptr<float>(lse);
    a.dout = dout.raw();
    a.dq = dq.raw();
    a.dk = dk.raw();
    a.dv = dv.raw();
    if (try_cudnn_attention(op, {true, 0, 0, d.hq, d.hkv, d.dim}, off, a)) {
      ++attention_stats_.cudnn_backward;
      return;
    }
  }
  ++attention_stats_.kernel_backward;
  Tensor delta = empty({d.n, d.hq}, compute);  // delta[i, h] = dO_i . O_i
  dispatch_storage(q.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    launch_rowwise_dot<T, C>(ptr<C>(delta), ptr<T>(dout), ptr<T>(out), d.n * d.hq, d.dim, stream_);
    launch_attention_backward<T>(ptr<T>(dq), ptr<T>(dk), ptr<T>(dv), ptr<T>(dout), ptr<T>(q),
                                 ptr<T>(k), ptr<T>(v), ptr<C>(lse), ptr<C>(delta),
                                 ptr<int32_t>(seq_off), seq_off.numel() - 1, d,
                                 static_cast<C>(scale), stream_);
  });
}

void CudaBackend::attention_cached(Tensor& out, const Tensor& q, const Tensor& k_cache,
                                   const Tensor& v_cache, const Tensor& slot, const Tensor& pos,
                                   double scale) {
  const char* op = "attention_cached";
  on_device(out, op, "out");
  on_device(q, op, "q");
  on_device(k_cache, op, "k_cache");
  on_device(v_cache, op, "v_cache");
  on_device(slot, op, "slot");
  on_device(pos, op, "pos");
  // bf16 out, q and KV cache: native, the cache read in place (never widened). Other mixes
  // with bf16 widen every bf16 argument, the whole cache included.
  const bool native_bf16 = is_bf16(out) && is_bf16(q) && is_bf16(k_cache) && is_bf16(v_cache);
  if (!native_bf16)
    if (WidenedArgs w(*this, op, {{&out, kOut}, {&q, kIn}, {&k_cache, kIn}, {&v_cache, kIn}});
        w.any()) {
      attention_cached(w[0], w[1], w[2], w[3], slot, pos, scale);
      return w.finish();
    }
  check_float(q, 3, op, "q");
  const int64_t n = q.dim(0), hq = q.dim(1), dim = q.dim(2);
  FM_CHECK(k_cache.dtype() == q.dtype() && k_cache.rank() == 4 && k_cache.dim(3) == dim &&
               k_cache.dim(2) > 0 && hq % k_cache.dim(2) == 0,
           "CUDA backend: attention_cached: k_cache must be {}[S, T, Hkv, {}] with Hkv dividing "
           "Hq = {} but is {}",
           dtype_name(q.dtype()), dim, hq, k_cache.describe());
  FM_CHECK(dim <= kAttentionMaxHeadDim,
           "CUDA backend: {}: head dim {} is above the kernels' limit of {} (q is {})", op, dim,
           kAttentionMaxHeadDim, q.describe());
  const int64_t slots = k_cache.dim(0), max_len = k_cache.dim(1), hkv = k_cache.dim(2);
  check_like(v_cache, k_cache, op, "v_cache");
  check_like(out, q, op, "out");
  check_shape(slot, {n}, op, "slot");
  check_same_dtype(slot, DType::i32, op, "slot");
  check_shape(pos, {n}, op, "pos");
  check_same_dtype(pos, DType::i32, op, "pos");
  activate();
  check_indices(*this, stream_, op, {{"slot", &slot, slots}, {"pos", &pos, max_len}});
  dispatch_storage(q.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_attention_cached<T>(ptr<T>(out), ptr<T>(q), ptr<T>(k_cache), ptr<T>(v_cache),
                               ptr<int32_t>(slot), ptr<int32_t>(pos), {n, hq, hkv, dim}, max_len,
                               static_cast<compute_t<T>>(scale), stream_);
  });
}

}  // namespace fm::cuda
