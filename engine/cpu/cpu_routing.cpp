// CpuBackend ops (cpu_backend.h): the router pieces (engine/cpu/router.h), token permutation
// (engine/cpu/rows.h) and the LM-head loss (engine/cpu/loss.h).
#include "engine/cpu/cpu_backend.h"

namespace fm::cpu {

void CpuBackend::softmax_forward(Tensor& probs, const Tensor& logits) {
  if (widened("softmax_forward", {{&probs, kOut}, {&logits, kIn}},
              [&](auto& f) { softmax_forward(f[0], f[1]); }))
    return;
  ArgCheck chk("softmax_forward");
  const DType dt = chk.float_dtype("logits", logits, 2);
  chk.same("probs", probs, "logits", logits);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::softmax_forward<T>(probs.data<T>(), logits.data<T>(), logits.dim(0), logits.dim(1));
  });
}

void CpuBackend::softmax_backward(Tensor& dlogits, const Tensor& dprobs, const Tensor& probs) {
  if (widened("softmax_backward", {{&dlogits, kOut}, {&dprobs, kIn}, {&probs, kIn}},
              [&](auto& f) { softmax_backward(f[0], f[1], f[2]); }))
    return;
  ArgCheck chk("softmax_backward");
  const DType dt = chk.float_dtype("probs", probs, 2);
  chk.same("dprobs", dprobs, "probs", probs);
  chk.same("dlogits", dlogits, "probs", probs);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::softmax_backward<T>(dlogits.data<T>(), dprobs.data<T>(), probs.data<T>(), probs.dim(0),
                             probs.dim(1));
  });
}

void CpuBackend::topk(Tensor& ids, const Tensor& scores, const Tensor& bias) {
  if (widened("topk", {{&scores, kIn}, {&bias, kIn}}, [&](auto& f) { topk(ids, f[0], f[1]); }))
    return;
  ArgCheck chk("topk");
  const DType dt = chk.float_dtype("scores", scores, 2);
  const int64_t N = scores.dim(0), E = scores.dim(1);
  chk.cpu("ids", ids);
  FM_CHECK(ids.dtype() == DType::i32 && ids.rank() == 2 && ids.dim(0) == N && ids.dim(1) <= E,
           "topk: ids must be i32[{}, K] with K <= E = {} but is {}", N, E, ids.describe());
  const int64_t K = ids.dim(1);
  if (bias.defined()) chk.is("bias", bias, dt, {E});
  int64_t nan_row = -1;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    nan_row = cpu::topk<T>(ids.data<int32_t>(), scores.data<T>(), data_or_null<T>(bias), N, E, K);
  });
  FM_CHECK(nan_row < 0, "topk: row {} of scores + bias contains a NaN", nan_row);
}

void CpuBackend::gather_cols(Tensor& out, const Tensor& x, const Tensor& ids) {
  if (widened("gather_cols", {{&out, kOut}, {&x, kIn}},
              [&](auto& f) { gather_cols(f[0], f[1], ids); }))
    return;
  ArgCheck chk("gather_cols");
  const DType dt = chk.float_dtype("x", x, 2);
  const int64_t N = x.dim(0), E = x.dim(1);
  chk.cpu("ids", ids);
  FM_CHECK(ids.dtype() == DType::i32 && ids.rank() == 2 && ids.dim(0) == N,
           "gather_cols: ids must be i32[{}, K] but is {}", N, ids.describe());
  const int64_t K = ids.dim(1);
  chk.is("out", out, dt, {N, K});
  chk.ids_below("ids", ids, E);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::gather_cols<T>(out.data<T>(), x.data<T>(), ids.data<int32_t>(), N, E, K);
  });
}

void CpuBackend::scatter_add_cols(Tensor& dx, const Tensor& dout, const Tensor& ids) {
  if (widened("scatter_add_cols", {{&dx, kInOut}, {&dout, kIn}},
              [&](auto& f) { scatter_add_cols(f[0], f[1], ids); }))
    return;
  ArgCheck chk("scatter_add_cols");
  const DType dt = chk.float_dtype("dx", dx, 2);
  const int64_t N = dx.dim(0), E = dx.dim(1);
  chk.cpu("ids", ids);
  FM_CHECK(ids.dtype() == DType::i32 && ids.rank() == 2 && ids.dim(0) == N,
           "scatter_add_cols: ids must be i32[{}, K] but is {}", N, ids.describe());
  const int64_t K = ids.dim(1);
  chk.is("dout", dout, dt, {N, K});
  chk.ids_below("ids", ids, E);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::scatter_add_cols<T>(dx.data<T>(), dout.data<T>(), ids.data<int32_t>(), N, E, K);
  });
}

void CpuBackend::normalize_rows_forward(Tensor& g, const Tensor& p) {
  if (widened("normalize_rows_forward", {{&g, kOut}, {&p, kIn}},
              [&](auto& f) { normalize_rows_forward(f[0], f[1]); }))
    return;
  ArgCheck chk("normalize_rows_forward");
  const DType dt = chk.float_dtype("p", p, 2);
  chk.same("g", g, "p", p);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::normalize_rows_forward<T>(g.data<T>(), p.data<T>(), p.dim(0), p.dim(1));
  });
}

void CpuBackend::normalize_rows_backward(Tensor& dp, const Tensor& dg, const Tensor& p) {
  if (widened("normalize_rows_backward", {{&dp, kOut}, {&dg, kIn}, {&p, kIn}},
              [&](auto& f) { normalize_rows_backward(f[0], f[1], f[2]); }))
    return;
  ArgCheck chk("normalize_rows_backward");
  const DType dt = chk.float_dtype("p", p, 2);
  chk.same("dg", dg, "p", p);
  chk.same("dp", dp, "p", p);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::normalize_rows_backward<T>(dp.data<T>(), dg.data<T>(), p.data<T>(), p.dim(0), p.dim(1));
  });
}

void CpuBackend::gather_rows(Tensor& out, const Tensor& src, const Tensor& idx) {
  if (widened("gather_rows", {{&out, kOut}, {&src, kIn}},
              [&](auto& f) { gather_rows(f[0], f[1], idx); }))
    return;
  ArgCheck chk("gather_rows");
  const DType dt = chk.float_dtype("src", src, 2);
  const int64_t R = src.dim(0), C = src.dim(1);
  chk.is("idx", idx, DType::i32, {idx.numel()});
  const int64_t M = idx.numel();
  chk.is("out", out, dt, {M, C});
  chk.ids_below("idx", idx, R);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::gather_rows<T>(out.data<T>(), src.data<T>(), idx.data<int32_t>(), M, C);
  });
}

void CpuBackend::scatter_rows(Tensor& dst, const Tensor& src, const Tensor& idx) {
  if (widened("scatter_rows", {{&dst, kInOut}, {&src, kIn}},
              [&](auto& f) { scatter_rows(f[0], f[1], idx); }))
    return;
  ArgCheck chk("scatter_rows");
  const DType dt = chk.float_dtype("dst", dst, 2);
  const int64_t R = dst.dim(0), C = dst.dim(1);
  chk.is("idx", idx, DType::i32, {idx.numel()});
  const int64_t M = idx.numel();
  chk.is("src", src, dt, {M, C});
  chk.ids_below("idx", idx, R);
  std::vector<char> seen(static_cast<size_t>(R), 0);
  for (int64_t m = 0; m < M; ++m) {
    const int32_t r = idx.data<int32_t>()[m];
    FM_CHECK(!seen[r], "scatter_rows: idx[{}] = {} repeats an earlier destination row", m, r);
    seen[r] = 1;
  }
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::scatter_rows<T>(dst.data<T>(), src.data<T>(), idx.data<int32_t>(), M, C);
  });
}

void CpuBackend::scatter_add_rows(Tensor& dst, const Tensor& src, const Tensor& idx,
                                  const Tensor& w) {
  if (widened("scatter_add_rows", {{&dst, kInOut}, {&src, kIn}, {&w, kIn}},
              [&](auto& f) { scatter_add_rows(f[0], f[1], idx, f[2]); }))
    return;
  ArgCheck chk("scatter_add_rows");
  const DType dt = chk.float_dtype("dst", dst, 2);
  const int64_t R = dst.dim(0), C = dst.dim(1);
  chk.is("idx", idx, DType::i32, {idx.numel()});
  const int64_t M = idx.numel();
  chk.is("src", src, dt, {M, C});
  if (w.defined()) chk.is("w", w, dt, {M});
  chk.ids_below("idx", idx, R);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::scatter_add_rows<T>(dst.data<T>(), src.data<T>(), idx.data<int32_t>(), data_or_null<T>(w),
                             M, R, C);
  });
}

void CpuBackend::check_targets(const ArgCheck& chk, const Tensor& targets, int64_t N, int64_t V) {
  chk.is("targets", targets, DType::i32, {N});
  const int32_t* t = targets.data<int32_t>();
  for (int64_t n = 0; n < N; ++n)
    FM_CHECK(t[n] < V, "{}: targets[{}] = {} is out of range (V = {}; negative = no target)",
             chk.op(), n, t[n], V);
}

void CpuBackend::logprob_forward(Tensor& logp, Tensor& entropy, Tensor& lse, const Tensor& logits,
                                 const Tensor& targets) {
  if (widened("logprob_forward", {{&logp, kOut}, {&entropy, kOut}, {&lse, kOut}, {&logits, kIn}},
              [&](auto& f) { logprob_forward(f[0], f[1], f[2], f[3], targets); }))
    return;
  ArgCheck chk("logprob_forward");
  const DType dt = chk.float_dtype("logits", logits, 2);
  const int64_t N = logits.dim(0), V = logits.dim(1);
  FM_CHECK(V > 0, "logprob_forward: logits must have at least one column but is {}",
           logits.describe());
  check_targets(chk, targets, N, V);
  chk.is("logp", logp, dt, {N});
  chk.is("entropy", entropy, dt, {N});
  chk.is("lse", lse, dt, {N});
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::logprob_forward<T>(logp.data<T>(), entropy.data<T>(), lse.data<T>(), logits.data<T>(),
                            targets.data<int32_t>(), N, V);
  });
}

void CpuBackend::logprob_backward(Tensor& dlogits, const Tensor& dlogp, const Tensor& dentropy,
                                  const Tensor& logits, const Tensor& lse, const Tensor& targets) {
  if (widened("logprob_backward",
              {{&dlogits, kOut}, {&dlogp, kIn}, {&dentropy, kIn}, {&logits, kIn}, {&lse, kIn}},
              [&](auto& f) { logprob_backward(f[0], f[1], f[2], f[3], f[4], targets); }))
    return;
  ArgCheck chk("logprob_backward");
  const DType dt = chk.float_dtype("logits", logits, 2);
  const int64_t N = logits.dim(0), V = logits.dim(1);
  check_targets(chk, targets, N, V);
  chk.same("dlogits", dlogits, "logits", logits);
  chk.is("dlogp", dlogp, dt, {N});
  if (dentropy.defined()) chk.is("dentropy", dentropy, dt, {N});
  chk.is("lse", lse, dt, {N});
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::logprob_backward<T>(dlogits.data<T>(), dlogp.data<T>(), data_or_null<T>(dentropy),
                             logits.data<T>(), lse.data<T>(), targets.data<int32_t>(), N, V);
  });
}

}  // namespace fm::cpu
