// CpuBackend ops (cpu_backend.h): memory, elementwise and reductions, embedding, RMSNorm,
// RoPE, SwiGLU, AdamW; and the factory.
#include "engine/cpu/cpu_backend.h"

namespace fm::cpu {

void CpuBackend::fill(Tensor& x, double value) {
  ArgCheck chk("fill");
  chk.cpu("x", x);
  switch (x.dtype()) {
    case DType::f32:
      return fill_as<float>(x, static_cast<float>(value));
    case DType::f64:
      return fill_as<double>(x, value);
    case DType::bf16:
      return fill_as<uint16_t>(x, f32_to_bf16(static_cast<float>(value)));
    case DType::f16:
      return fill_as<uint16_t>(x, f32_to_f16(static_cast<float>(value)));
    case DType::i32:
      return fill_integer<int32_t>(chk.op(), x, value);
    case DType::i64:
      return fill_integer<int64_t>(chk.op(), x, value);
    case DType::u8:
      return fill_integer<uint8_t>(chk.op(), x, value);
    case DType::u16:
      return fill_integer<uint16_t>(chk.op(), x, value);
  }
  throw Error(fmt::format("fill: unknown dtype of {}", x.describe()));
}

void CpuBackend::copy(Tensor& dst, const Tensor& src) {
  FM_CHECK(dst.defined() && src.defined(), "copy: dst and src must be defined");
  for (const Tensor* t : {static_cast<const Tensor*>(&dst), &src})
    FM_CHECK(t->is_cpu(),
             "copy: the CPU backend cannot reach {} (tensor {}); copy with the "
             "backend of that device",
             device_name(t->device()), t->describe());
  FM_CHECK(dst.dtype() == src.dtype() && dst.shape() == src.shape(),
           "copy: dst {} and src {} must have the same dtype and shape", dst.describe(),
           src.describe());
  if (dst.nbytes() > 0) std::memmove(dst.raw(), src.raw(), src.nbytes());
}

void CpuBackend::axpy(Tensor& y, double alpha, const Tensor& x) {
  if (widened("axpy", {{&y, kInOut}, {&x, kIn}}, [&](auto& f) { axpy(f[0], alpha, f[1]); })) return;
  ArgCheck chk("axpy");
  const DType dt = chk.float_dtype("y", y, y.rank());
  chk.same("x", x, "y", y);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::axpy<T>(y.data<T>(), static_cast<T>(alpha), x.data<T>(), y.numel());
  });
}

void CpuBackend::scale(Tensor& x, double alpha) {
  if (widened("scale", {{&x, kInOut}}, [&](auto& f) { scale(f[0], alpha); })) return;
  ArgCheck chk("scale");
  const DType dt = chk.float_dtype("x", x, x.rank());
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::scale<T>(x.data<T>(), static_cast<T>(alpha), x.numel());
  });
}

double CpuBackend::sum_squares(const Tensor& x) {
  double r = 0;
  if (widened("sum_squares", {{&x, kIn}}, [&](auto& f) { r = sum_squares(f[0]); })) return r;
  ArgCheck chk("sum_squares");
  const DType dt = chk.float_dtype("x", x, x.rank());
  double result = 0;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    result = cpu::sum_squares<T>(x.data<T>(), x.numel());
  });
  return result;
}

void CpuBackend::rowwise_dot(Tensor& out, const Tensor& a, const Tensor& b) {
  if (widened("rowwise_dot", {{&out, kOut}, {&a, kIn}, {&b, kIn}},
              [&](auto& f) { rowwise_dot(f[0], f[1], f[2]); }))
    return;
  ArgCheck chk("rowwise_dot");
  const DType dt = chk.float_dtype("a", a, 2);
  chk.same("b", b, "a", a);
  chk.is("out", out, dt, {a.dim(0)});
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::rowwise_dot<T>(out.data<T>(), a.data<T>(), b.data<T>(), a.dim(0), a.dim(1));
  });
}

void CpuBackend::column_sum(Tensor& out, const Tensor& x) {
  if (widened("column_sum", {{&out, kOut}, {&x, kIn}}, [&](auto& f) { column_sum(f[0], f[1]); }))
    return;
  ArgCheck chk("column_sum");
  const DType dt = chk.float_dtype("x", x, 2);
  chk.is("out", out, dt, {x.dim(1)});
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::column_sum<T>(out.data<T>(), x.data<T>(), x.dim(0), x.dim(1));
  });
}

void CpuBackend::add_row_vector(Tensor& x, const Tensor& v, double alpha) {
  if (widened("add_row_vector", {{&x, kInOut}, {&v, kIn}},
              [&](auto& f) { add_row_vector(f[0], f[1], alpha); }))
    return;
  ArgCheck chk("add_row_vector");
  const DType dt = chk.float_dtype("x", x, 2);
  chk.is("v", v, dt, {x.dim(1)});
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::add_row_vector<T>(x.data<T>(), v.data<T>(), static_cast<T>(alpha), x.dim(0), x.dim(1));
  });
}

void CpuBackend::scale_rows(Tensor& out, const Tensor& x, const Tensor& w) {
  if (widened("scale_rows", {{&out, kOut}, {&x, kIn}, {&w, kIn}},
              [&](auto& f) { scale_rows(f[0], f[1], f[2]); }))
    return;
  ArgCheck chk("scale_rows");
  const DType dt = chk.float_dtype("x", x, 2);
  chk.is("w", w, dt, {x.dim(0)});
  chk.same("out", out, "x", x);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::scale_rows<T>(out.data<T>(), x.data<T>(), w.data<T>(), x.dim(0), x.dim(1));
  });
}

void CpuBackend::embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) {
  if (widened("embedding_forward", {{&out, kOut}, {&table, kIn}},
              [&](auto& f) { embedding_forward(f[0], f[1], ids); }))
    return;
  ArgCheck chk("embedding_forward");
  const DType dt = chk.float_dtype("table", table, 2);
  const int64_t V = table.dim(0), C = table.dim(1);
  chk.is("ids", ids, DType::i32, {ids.numel()});
  chk.is("out", out, dt, {ids.numel(), C});
  chk.ids_below("ids", ids, V);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::gather_rows<T>(out.data<T>(), table.data<T>(), ids.data<int32_t>(), ids.numel(), C);
  });
}

void CpuBackend::embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) {
  if (widened("embedding_backward", {{&dtable, kInOut}, {&dout, kIn}},
              [&](auto& f) { embedding_backward(f[0], f[1], ids); }))
    return;
  ArgCheck chk("embedding_backward");
  const DType dt = chk.float_dtype("dtable", dtable, 2);
  const int64_t V = dtable.dim(0), C = dtable.dim(1);
  chk.is("ids", ids, DType::i32, {ids.numel()});
  chk.is("dout", dout, dt, {ids.numel(), C});
  chk.ids_below("ids", ids, V);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::scatter_add_rows<T>(dtable.data<T>(), dout.data<T>(), ids.data<int32_t>(), nullptr,
                             ids.numel(), V, C);
  });
}

void CpuBackend::rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w,
                                 double eps) {
  if (widened("rmsnorm_forward", {{&y, kOut}, {&rstd, kOut}, {&x, kIn}, {&w, kIn}},
              [&](auto& f) { rmsnorm_forward(f[0], f[1], f[2], f[3], eps); }))
    return;
  ArgCheck chk("rmsnorm_forward");
  const DType dt = chk.float_dtype("x", x, 2);
  const int64_t N = x.dim(0), C = x.dim(1);
  chk.is("w", w, dt, {C});
  chk.is("y", y, dt, {N, C});
  chk.is("rstd", rstd, dt, {N});
  FM_CHECK(eps >= 0, "rmsnorm_forward: eps must be >= 0 but is {}", eps);
  FM_CHECK(C > 0, "rmsnorm_forward: x must have at least one column but is {}", x.describe());
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::rmsnorm_forward<T>(y.data<T>(), rstd.data<T>(), x.data<T>(), w.data<T>(), N, C,
                            static_cast<T>(eps));
  });
}

void CpuBackend::rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x,
                                  const Tensor& w, const Tensor& rstd) {
  if (widened("rmsnorm_backward",
              {{&dx, kOut}, {&dw, kInOut}, {&dy, kIn}, {&x, kIn}, {&w, kIn}, {&rstd, kIn}},
              [&](auto& f) { rmsnorm_backward(f[0], f[1], f[2], f[3], f[4], f[5]); }))
    return;
  ArgCheck chk("rmsnorm_backward");
  const DType dt = chk.float_dtype("x", x, 2);
  const int64_t N = x.dim(0), C = x.dim(1);
  chk.is("w", w, dt, {C});
  chk.is("dw", dw, dt, {C});
  chk.is("dy", dy, dt, {N, C});
  chk.is("dx", dx, dt, {N, C});
  chk.is("rstd", rstd, dt, {N});
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::rmsnorm_backward<T>(dx.data<T>(), dw.data<T>(), dy.data<T>(), x.data<T>(), w.data<T>(),
                             rstd.data<T>(), N, C);
  });
}

void CpuBackend::rope(Tensor& x, const Tensor& pos, double theta, bool inverse) {
  if (widened("rope", {{&x, kInOut}}, [&](auto& f) { rope(f[0], pos, theta, inverse); })) return;
  ArgCheck chk("rope");
  const DType dt = chk.float_dtype("x", x, 3);
  const int64_t N = x.dim(0), H = x.dim(1), D = x.dim(2);
  FM_CHECK(D % 2 == 0, "rope: the head dim of x must be even but x is {}", x.describe());
  FM_CHECK(theta > 0, "rope: theta must be > 0 but is {}", theta);
  chk.is("pos", pos, DType::i32, {N});
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::rope<T>(x.data<T>(), pos.data<int32_t>(), N, H, D, theta, inverse);
  });
}

void CpuBackend::swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up) {
  if (widened("swiglu_forward", {{&h, kOut}, {&gate, kIn}, {&up, kIn}},
              [&](auto& f) { swiglu_forward(f[0], f[1], f[2]); }))
    return;
  ArgCheck chk("swiglu_forward");
  const DType dt = chk.float_dtype("gate", gate, 2);
  chk.same("up", up, "gate", gate);
  chk.same("h", h, "gate", gate);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::swiglu_forward<T>(h.data<T>(), gate.data<T>(), up.data<T>(), gate.numel());
  });
}

void CpuBackend::swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dh, const Tensor& gate,
                                 const Tensor& up) {
  if (widened("swiglu_backward",
              {{&dgate, kOut}, {&dup, kOut}, {&dh, kIn}, {&gate, kIn}, {&up, kIn}},
              [&](auto& f) { swiglu_backward(f[0], f[1], f[2], f[3], f[4]); }))
    return;
  ArgCheck chk("swiglu_backward");
  const DType dt = chk.float_dtype("gate", gate, 2);
  chk.same("up", up, "gate", gate);
  chk.same("dh", dh, "gate", gate);
  chk.same("dgate", dgate, "gate", gate);
  chk.same("dup", dup, "gate", gate);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::swiglu_backward<T>(dgate.data<T>(), dup.data<T>(), dh.data<T>(), gate.data<T>(),
                            up.data<T>(), gate.numel());
  });
}

void CpuBackend::adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr,
                            double beta1, double beta2, double eps, double weight_decay,
                            int64_t step) {
  if (widened("adamw_step", {{&param, kInOut}, {&grad, kIn}, {&m, kInOut}, {&v, kInOut}},
              [&](auto& f) {
                adamw_step(f[0], f[1], f[2], f[3], lr, beta1, beta2, eps, weight_decay, step);
              }))
    return;
  ArgCheck chk("adamw_step");
  const DType dt = chk.float_dtype("param", param, param.rank());
  chk.same("grad", grad, "param", param);
  chk.same("m", m, "param", param);
  chk.same("v", v, "param", param);
  FM_CHECK(step >= 1, "adamw_step: step must be >= 1 (bias corrections use beta^step) but is {}",
           step);
  FM_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1,
           "adamw_step: beta1 and beta2 must be in [0, 1) but are {} and {}", beta1, beta2);
  const cpu::AdamWConfig cfg{lr, beta1, beta2, eps, weight_decay, step};
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    cpu::adamw_step<T>(param.data<T>(), grad.data<T>(), m.data<T>(), v.data<T>(), param.numel(),
                       cfg);
  });
}

}  // namespace fm::cpu

namespace fm {

std::unique_ptr<Backend> make_cpu_backend() {
  return std::make_unique<cpu::CpuBackend>();
}

}  // namespace fm
