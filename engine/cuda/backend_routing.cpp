// CudaBackend ops: top-k and the router's column ops, token permutation, the LM-head
// log-prob. Each checks its arguments the way the CPU backend does
// (engine/cpu/cpu_routing.cpp), then calls the launchers of routing.cu and logprob.cu
// (routing_kernels.h).
//
// Errors the CPU finds in device data cost one small read back and a stream sync per op
// call (plus one or two 4-byte reads on the error path, for the message):
// - index tensors the kernel dereferences (ids of gather_cols / scatter_add_cols, idx of
//   the row ops): checked before the kernel runs (launch_find_bad_id, shared with the
//   embedding), so a bad call leaves accumulated outputs untouched, as on the CPU;
//   scatter_rows reads back its range and repeat checks together (16 bytes);
// - topk's NaN keys and logprob's targets >= V: reported by the op's kernel itself and
//   read back after it (outputs are then unspecified, as the CPU's throw leaves them).
#include <climits>

#include "engine/cuda/index_checks.h"

namespace fm::cuda {

namespace {

// ids i32 [N, K] on the device (the CPU's check for the [N, K] column ops).
void check_ids_matrix(const Tensor& ids, int64_t n, const char* op) {
  FM_CHECK(ids.dtype() == DType::i32 && ids.rank() == 2 && ids.dim(0) == n,
           "CUDA backend: {}: ids must be i32[{}, K] but is {}", op, n, ids.describe());
}

// idx i32 [M] with M <= INT_MAX (the sort's item count is an int).
void check_row_index(const Tensor& idx, const char* op) {
  check_shape(idx, {idx.numel()}, op, "idx");
  check_same_dtype(idx, DType::i32, op, "idx");
  FM_CHECK(idx.numel() <= INT_MAX, "CUDA backend: {}: idx has {} entries, above the limit of {}",
           op, idx.numel(), INT_MAX);
}

// A per-row value of the LM-head ops: dtype [N].
void check_per_row(const Tensor& t, int64_t n, DType dtype, const char* op, const char* name) {
  check_shape(t, {n}, op, name);
  check_same_dtype(t, dtype, op, name);
}

// targets >= V reported by a logprob kernel (status: the first bad row, or -1).
void throw_if_bad_target(cudaStream_t stream, int64_t bad, const char* op, const Tensor& targets,
                         int64_t vocab) {
  if (bad < 0) return;
  throw Error(
      fmt::format("CUDA backend: {}: targets[{}] = {} is out of range (V = {}; negative = no "
                  "target)",
                  op, bad, read_id(stream, targets, bad), vocab));
}

}  // namespace

// --- router pieces ----------------------------------------------------------------------

void CudaBackend::topk(Tensor& ids, const Tensor& scores, const Tensor& bias) {
  const char* op = "topk";
  on_device(ids, op, "ids");
  on_device(scores, op, "scores");
  if (WidenedArgs w(*this, op, {{&scores, kIn}, {&bias, kIn}}); w.any())
    return topk(ids, w[0], w[1]);
  check_float(scores, 2, op, "scores");
  const int64_t n = scores.dim(0), e = scores.dim(1);
  FM_CHECK(ids.dtype() == DType::i32 && ids.rank() == 2 && ids.dim(0) == n && ids.dim(1) <= e,
           "CUDA backend: topk: ids must be i32[{}, K] with K <= E = {} but is {}", n, e,
           ids.describe());
  FM_CHECK(e < INT_MAX, "CUDA backend: topk: E = {} is above the kernel's limit", e);
  if (bias.defined()) {
    on_device(bias, op, "bias");
    check_shape(bias, {e}, op, "bias");
    check_same_dtype(bias, scores.dtype(), op, "bias");
  }
  activate();
  const StatusWord status = status_word(kTopkNan);
  dispatch_float(scores.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_topk<T>(ptr<int32_t>(ids), status.word, ptr<T>(scores),
                   bias.defined() ? ptr<T>(bias) : nullptr, n, e, ids.dim(1), stream_);
  });
  if (status.deferred()) return;
  const int64_t nan_row = read_status(stream_, status.owned)[0];
  FM_CHECK(nan_row < 0, "CUDA backend: topk: row {} of scores + bias contains a NaN", nan_row);
}

void CudaBackend::sort_assignments(Tensor& offsets, Tensor& perm_assign, Tensor& perm_token,
                                   const Tensor& key) {
  const char* op = "sort_assignments";
  on_device(offsets, op, "offsets");
  on_device(perm_assign, op, "perm_assign");
  on_device(perm_token, op, "perm_token");
  on_device(key, op, "key");
  FM_CHECK(key.dtype() == DType::i32 && key.rank() == 2 && key.dim(1) > 0,
           "CUDA backend: {}: key must be an i32 [N, K] tensor with K > 0 but is {}", op,
           key.describe());
  const int64_t nk = key.numel();
  FM_CHECK(offsets.dtype() == DType::i32 && offsets.rank() == 1 && offsets.dim(0) >= 1,
           "CUDA backend: {}: offsets must be an i32 [G + 1] tensor but is {}", op,
           offsets.describe());
  const int64_t groups = offsets.dim(0) - 1;
  check_per_row(perm_assign, nk, DType::i32, op, "perm_assign");
  check_per_row(perm_token, nk, DType::i32, op, "perm_token");
  FM_CHECK(nk < INT_MAX && groups < INT_MAX,
           "CUDA backend: {}: {} assignments over {} keys "
           "exceed the kernel's 32-bit positions",
           op, nk, groups);
  activate();
  const StatusWord status = status_word(kSortKeyRange);
  const size_t bytes = sort_assignments_workspace_bytes(nk, groups);
  Tensor workspace = empty({static_cast<int64_t>(bytes)}, DType::u8);
  launch_sort_assignments(ptr<int32_t>(offsets), ptr<int32_t>(perm_assign),
                          ptr<int32_t>(perm_token), status.word, ptr<int32_t>(key), nk, key.dim(1),
                          groups, workspace.raw(), bytes, stream_);
  if (status.deferred()) return;
  const int64_t bad = read_status(stream_, status.owned)[0];
  if (bad >= 0)
    throw Error(fmt::format("CUDA backend: {}: key[{}] = {} is out of range [0, {})", op, bad,
                            read_id(stream_, key, bad), groups));
}

CudaBackend::StatusWord CudaBackend::status_word(DeferredCheck check) {
  if (!index_checks_) return {Tensor(), deferred_ + check};
  Tensor t = empty({1}, DType::i64);
  FM_CUDA_CHECK(cudaMemsetAsync(t.raw(), 0xff, sizeof(int64_t), stream_));  // -1
  return {t, ptr<int64_t>(t)};
}

void CudaBackend::raise_deferred_errors() {
  activate();
  int64_t host[kDeferredChecks];
  FM_CUDA_CHECK(cudaMemcpyAsync(host, deferred_, sizeof host, cudaMemcpyDeviceToHost, stream_));
  FM_CUDA_CHECK(cudaMemsetAsync(deferred_, 0xff, sizeof host, stream_));
  FM_CUDA_CHECK(cudaStreamSynchronize(stream_));
  FM_CHECK(host[kTopkNan] < 0,
           "CUDA backend: topk (checked after the fact): row {} of scores + bias contains a NaN",
           host[kTopkNan]);
  FM_CHECK(host[kSortKeyRange] < 0,
           "CUDA backend: sort_assignments (checked after the fact): key[{}] is out of range",
           host[kSortKeyRange]);
}

void CudaBackend::gather_cols(Tensor& out, const Tensor& x, const Tensor& ids) {
  const char* op = "gather_cols";
  on_device(out, op, "out");
  on_device(x, op, "x");
  on_device(ids, op, "ids");
  if (WidenedArgs w(*this, op, {{&out, kOut}, {&x, kIn}}); w.any()) {
    gather_cols(w[0], w[1], ids);
    return w.finish();
  }
  check_float(x, 2, op, "x");
  const int64_t n = x.dim(0), e = x.dim(1);
  check_ids_matrix(ids, n, op);
  const int64_t k = ids.dim(1);
  check_shape(out, {n, k}, op, "out");
  check_same_dtype(out, x.dtype(), op, "out");
  activate();
  check_indices(*this, stream_, op, {{"ids", &ids, e}});
  dispatch_float(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_gather_cols<T>(ptr<T>(out), ptr<T>(x), ptr<int32_t>(ids), n, e, k, stream_);
  });
}

void CudaBackend::scatter_add_cols(Tensor& dx, const Tensor& dout, const Tensor& ids) {
  const char* op = "scatter_add_cols";
  on_device(dx, op, "dx");
  on_device(dout, op, "dout");
  on_device(ids, op, "ids");
  if (WidenedArgs w(*this, op, {{&dx, kInOut}, {&dout, kIn}}); w.any()) {
    scatter_add_cols(w[0], w[1], ids);
    return w.finish();
  }
  check_float(dx, 2, op, "dx");
  const int64_t n = dx.dim(0), e = dx.dim(1);
  check_ids_matrix(ids, n, op);
  const int64_t k = ids.dim(1);
  check_shape(dout, {n, k}, op, "dout");
  check_same_dtype(dout, dx.dtype(), op, "dout");
  activate();
  check_indices(*this, stream_, op, {{"ids", &ids, e}});
  dispatch_float(dx.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_scatter_add_cols<T>(ptr<T>(dx), ptr<T>(dout), ptr<int32_t>(ids), n, e, k, stream_);
  });
}

void CudaBackend::normalize_rows_forward(Tensor& g, const Tensor& p) {
  const char* op = "normalize_rows_forward";
  on_device(g, op, "g");
  on_device(p, op, "p");
  if (WidenedArgs w(*this, op, {{&g, kOut}, {&p, kIn}}); w.any()) {
    normalize_rows_forward(w[0], w[1]);
    return w.finish();
  }
  check_float(p, 2, op, "p");
  check_like(g, p, op, "g");
  activate();
  dispatch_float(p.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_normalize_rows_forward<T>(ptr<T>(g), ptr<T>(p), p.dim(0), p.dim(1), stream_);
  });
}

void CudaBackend::normalize_rows_backward(Tensor& dp, const Tensor& dg, const Tensor& p) {
  const char* op = "normalize_rows_backward";
  on_device(dp, op, "dp");
  on_device(dg, op, "dg");
  on_device(p, op, "p");
  if (WidenedArgs w(*this, op, {{&dp, kOut}, {&dg, kIn}, {&p, kIn}}); w.any()) {
    normalize_rows_backward(w[0], w[1], w[2]);
    return w.finish();
  }
  check_float(p, 2, op, "p");
  check_like(dg, p, op, "dg");
  check_like(dp, p, op, "dp");
  activate();
  dispatch_float(p.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_normalize_rows_backward<T>(ptr<T>(dp), ptr<T>(dg), ptr<T>(p), p.dim(0), p.dim(1),
                                      stream_);
  });
}

// --- token permutation ------------------------------------------------------------------

void CudaBackend::gather_rows(Tensor& out, const Tensor& src, const Tensor& idx) {
  const char* op = "gather_rows";
  on_device(out, op, "out");
  on_device(src, op, "src");
  on_device(idx, op, "idx");
  if (!(is_bf16(out) && is_bf16(src)))  // bf16 rows are copied as they are
    if (WidenedArgs w(*this, op, {{&out, kOut}, {&src, kIn}}); w.any()) {
      gather_rows(w[0], w[1], idx);
      return w.finish();
    }
  check_float(src, 2, op, "src");
  const int64_t r = src.dim(0), c = src.dim(1);
  check_row_index(idx, op);
  const int64_t m = idx.numel();
  check_shape(out, {m, c}, op, "out");
  check_same_dtype(out, src.dtype(), op, "out");
  activate();
  check_indices(*this, stream_, op, {{"idx", &idx, r}});
  if (is_bf16(src)) {
    launch_gather_rows<uint16_t>(ptr<uint16_t>(out), ptr<uint16_t>(src), ptr<int32_t>(idx), m, c,
                                 stream_);
    return;
  }
  dispatch_float(src.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_gather_rows<T>(ptr<T>(out), ptr<T>(src), ptr<int32_t>(idx), m, c, stream_);
  });
}

void CudaBackend::scatter_rows(Tensor& dst, const Tensor& src, const Tensor& idx) {
  const char* op = "scatter_rows";
  on_device(dst, op, "dst");
  on_device(src, op, "src");
  on_device(idx, op, "idx");
  if (!(is_bf16(dst) && is_bf16(src)))  // bf16 rows are copied as they are
    if (WidenedArgs w(*this, op, {{&dst, kInOut}, {&src, kIn}}); w.any()) {
      scatter_rows(w[0], w[1], idx);
      return w.finish();
    }
  check_float(dst, 2, op, "dst");
  const int64_t r = dst.dim(0), c = dst.dim(1);
  check_row_index(idx, op);
  const int64_t m = idx.numel();
  check_shape(src, {m, c}, op, "src");
  check_same_dtype(src, dst.dtype(), op, "src");
  activate();
  if (m == 0) return;
  if (index_checks_) {
    // Range and repeats together, one read: [0] first out-of-range position (m: none),
    // [1] first m repeating an earlier destination (-1: none; meaningful when [0] is clean).
    Tensor status = empty({2}, DType::i64);
    launch_find_bad_id(ptr<int64_t>(status), ptr<int32_t>(idx), m, r, stream_);
    const size_t bytes = rows_by_destination_workspace_bytes(m, r);
    Tensor workspace = empty({static_cast<int64_t>(bytes)}, DType::u8);
    launch_find_repeated_row(ptr<int64_t>(status) + 1, ptr<int32_t>(idx), m, r, workspace.raw(),
                             bytes, stream_);
    const std::vector<int64_t> bad = read_status(stream_, status);
    throw_if_bad_id(stream_, bad[0], op, "idx", idx, r);
    if (bad[1] >= 0)
      throw Error(fmt::format("CUDA backend: {}: idx[{}] = {} repeats an earlier destination row",
                              op, bad[1], read_id(stream_, idx, bad[1])));
  }
  if (is_bf16(dst)) {
    launch_scatter_rows<uint16_t>(ptr<uint16_t>(dst), ptr<uint16_t>(src), ptr<int32_t>(idx), m, c,
                                  stream_);
    return;
  }
  dispatch_float(dst.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_scatter_rows<T>(ptr<T>(dst), ptr<T>(src), ptr<int32_t>(idx), m, c, stream_);
  });
}

void CudaBackend::scatter_add_rows(Tensor& dst, const Tensor& src, const Tensor& idx,
                                   const Tensor& w) {
  const char* op = "scatter_add_rows";
  on_device(dst, op, "dst");
  on_device(src, op, "src");
  on_device(idx, op, "idx");
  if (!(is_bf16(dst) && is_bf16(src) && (!w.defined() || is_bf16(w))))
    if (WidenedArgs wa(*this, op, {{&dst, kInOut}, {&src, kIn}, {&w, kIn}}); wa.any()) {
      scatter_add_rows(wa[0], wa[1], idx, wa[2]);
      return wa.finish();
    }
  check_float(dst, 2, op, "dst");
  const int64_t r = dst.dim(0), c = dst.dim(1);
  check_row_index(idx, op);
  const int64_t m = idx.numel();
  check_shape(src, {m, c}, op, "src");
  check_same_dtype(src, dst.dtype(), op, "src");
  if (w.defined()) {
    on_device(w, op, "w");
    check_shape(w, {m}, op, "w");
    check_same_dtype(w, dst.dtype(), op, "w");
  }
  activate();
  check_indices(*this, stream_, op, {{"idx", &idx, r}});
  if (m == 0 || c == 0) return;
  const size_t bytes = rows_by_destination_workspace_bytes(m, r);
  Tensor workspace = empty({static_cast<int64_t>(bytes)}, DType::u8);
  dispatch_storage(dst.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    launch_scatter_add_rows<T>(ptr<T>(dst), ptr<T>(src), ptr<int32_t>(idx),
                               w.defined() ? ptr<T>(w) : nullptr, m, r, c, workspace.raw(), bytes,
                               stream_);
  });
}

// --- LM head loss -----------------------------------------------------------------------

void CudaBackend::logprob_forward(Tensor& logp, Tensor& entropy, Tensor& lse, const Tensor& logits,
                                  const Tensor& targets) {
  const char* op = "logprob_forward";
  on_device(logp, op, "logp");
  on_device(entropy, op, "entropy");
  on_device(lse, op, "lse");
  on_device(logits, op, "logits");
  on_device(targets, op, "targets");
  // bf16 logits with f32 per-row values: native (the logits are read once, never widened).
  const bool native_bf16 = is_bf16(logits) && logp.dtype() == DType::f32 &&
                           entropy.dtype() == DType::f32 && lse.dtype() == DType::f32;
  if (!native_bf16)
    if (WidenedArgs w(*this, op, {{&logp, kOut}, {&entropy, kOut}, {&lse, kOut}, {&logits, kIn}});
        w.any()) {
      logprob_forward(w[0], w[1], w[2], w[3], targets);
      return w.finish();
    }
  check_float(logits, 2, op, "logits");
  const int64_t n = logits.dim(0), v = logits.dim(1);
  FM_CHECK(v > 0, "CUDA backend: logprob_forward: logits must have at least one column but is {}",
           logits.describe());
  check_shape(targets, {n}, op, "targets");
  check_same_dtype(targets, DType::i32, op, "targets");
  const DType per_row = native_bf16 ? DType::f32 : logits.dtype();
  check_per_row(logp, n, per_row, op, "logp");
  check_per_row(entropy, n, per_row, op, "entropy");
  check_per_row(lse, n, per_row, op, "lse");
  activate();
  Tensor status = empty({1}, DType::i64);
  if (native_bf16)
    launch_logprob_forward<float, bf16>(ptr<float>(logp), ptr<float>(entropy), ptr<float>(lse),
                                        ptr<int64_t>(status), ptr<bf16>(logits),
                                        ptr<int32_t>(targets), n, v, stream_);
  else
    dispatch_float(logits.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      launch_logprob_forward<T>(ptr<T>(logp), ptr<T>(entropy), ptr<T>(lse), ptr<int64_t>(status),
                                ptr<T>(logits), ptr<int32_t>(targets), n, v, stream_);
    });
  throw_if_bad_target(stream_, read_status(stream_, status)[0], op, targets, v);
}

void CudaBackend::logprob_backward(Tensor& dlogits, const Tensor& dlogp, const Tensor& dentropy,
                                   const Tensor& logits, const Tensor& lse, const Tensor& targets) {
  const char* op = "logprob_backward";
  on_device(dlogits, op, "dlogits");
  on_device(dlogp, op, "dlogp");
  on_device(logits, op, "logits");
  on_device(lse, op, "lse");
  on_device(targets, op, "targets");
  // bf16 logits and dlogits with f32 per-row values: native.
  const bool native_bf16 = is_bf16(logits) && is_bf16(dlogits) && dlogp.dtype() == DType::f32 &&
                           lse.dtype() == DType::f32 &&
                           (!dentropy.defined() || dentropy.dtype() == DType::f32);
  if (!native_bf16)
    if (WidenedArgs w(
            *this, op,
            {{&dlogits, kOut}, {&dlogp, kIn}, {&dentropy, kIn}, {&logits, kIn}, {&lse, kIn}});
        w.any()) {
      logprob_backward(w[0], w[1], w[2], w[3], w[4], targets);
      return w.finish();
    }
  check_float(logits, 2, op, "logits");
  const int64_t n = logits.dim(0), v = logits.dim(1);
  check_shape(targets, {n}, op, "targets");
  check_same_dtype(targets, DType::i32, op, "targets");
  check_like(dlogits, logits, op, "dlogits");
  const DType per_row = native_bf16 ? DType::f32 : logits.dtype();
  check_per_row(dlogp, n, per_row, op, "dlogp");
  if (dentropy.defined()) {
    on_device(dentropy, op, "dentropy");
    check_per_row(dentropy, n, per_row, op, "dentropy");
  }
  check_per_row(lse, n, per_row, op, "lse");
  activate();
  Tensor status = empty({1}, DType::i64);
  if (native_bf16)
    launch_logprob_backward<float, bf16>(
        ptr<bf16>(dlogits), ptr<int64_t>(status), ptr<float>(dlogp),
        dentropy.defined() ? ptr<float>(dentropy) : nullptr, ptr<bf16>(logits), ptr<float>(lse),
        ptr<int32_t>(targets), n, v, stream_);
  else
    dispatch_float(logits.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      launch_logprob_backward<T>(ptr<T>(dlogits), ptr<int64_t>(status), ptr<T>(dlogp),
                                 dentropy.defined() ? ptr<T>(dentropy) : nullptr, ptr<T>(logits),
                                 ptr<T>(lse), ptr<int32_t>(targets), n, v, stream_);
    });
  throw_if_bad_target(stream_, read_status(stream_, status)[0], op, targets, v);
}

void CudaBackend::sample_rows(Tensor& ids, Tensor& logp, Tensor& model_logp, const Tensor& logits,
                              const Tensor& u, const SamplingParams& params) {
  const char* op = "sample_rows";
  on_device(ids, op, "ids");
  on_device(logp, op, "logp");
  on_device(model_logp, op, "model_logp");
  on_device(logits, op, "logits");
  on_device(u, op, "u");
  // Only the logits are widened: u, logp and model_logp are f64 by the op's contract.
  if (WidenedArgs w(*this, op, {{&logits, kIn}}); w.any())
    return sample_rows(ids, logp, model_logp, w[0], u, params);
  check_float(logits, 2, op, "logits");
  const int64_t rows = logits.dim(0), v = logits.dim(1);
  FM_CHECK(v > 0, "CUDA backend: sample_rows: logits must have at least one column but is {}",
           logits.describe());
  const int64_t vocab = params.vocab > 0 ? std::min(params.vocab, v) : v;
  FM_CHECK(params.temperature >= 0 && params.top_k >= 0 && params.top_p > 0 && params.top_p <= 1,
           "CUDA backend: sample_rows: bad parameters (temperature {}, top_k {}, top_p {})",
           params.temperature, params.top_k, params.top_p);
  FM_CHECK(rows * vocab <= INT32_MAX,
           "CUDA backend: sample_rows: {} rows x {} columns is more than one sort handles", rows,
           vocab);
  check_per_row(u, rows, DType::f64, op, "u");
  check_per_row(ids, rows, DType::i32, op, "ids");
  check_per_row(logp, rows, DType::f64, op, "logp");
  check_per_row(model_logp, rows, DType::f64, op, "model_logp");
  activate();
  Tensor status = empty({1}, DType::i64);
  dispatch_float(logits.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const size_t bytes =
        sample_rows_workspace_bytes<T>(rows, vocab, params.top_k, params.top_p, params.temperature);
    Tensor workspace = empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, DType::u8);
    launch_sample_rows<T>(ptr<int32_t>(ids), ptr<double>(logp), ptr<double>(model_logp),
                          ptr<int64_t>(status), ptr<T>(logits), ptr<double>(u), rows, v, vocab,
                          params.temperature, params.top_k, params.top_p, workspace.raw(), bytes,
                          stream_);
  });
  const int64_t bad = read_status(stream_, status)[0];
  FM_CHECK(bad < 0, "CUDA backend: sample_rows: row {} of logits {} has a non-finite logit", bad,
           logits.describe());
}

}  // namespace fm::cuda
