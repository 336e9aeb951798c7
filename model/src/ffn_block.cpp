// Dense SwiGLU FFN: y = Wd (silu(Wg x) * (Wu x)). Used by dense layers and
// the shared experts of MoE layers.
#include "model/src/blocks.h"

namespace fm::blocks {

void ffn_forward(Backend& b, const FfnWeights& w, FfnActs& a, Tensor& y, const Tensor& x) {
  const int64_t N = x.dim(0), F = w.w_gate.dim(0);
  a.gate = b.empty({N, F}, x.dtype());
  a.up = b.empty({N, F}, x.dtype());
  a.h = b.empty({N, F}, x.dtype());
  linear_forward(b, a.gate, x, w.w_gate);
  linear_forward(b, a.up, x, w.w_up);
  b.swiglu_forward(a.h, a.gate, a.up);
  linear_forward(b, y, a.h, w.w_down);
}

void ffn_backward(Backend& b, const FfnWeights& w, FfnWeights& g, const FfnActs& a, Tensor& dx,
                  double dx_beta, const Tensor& dy, const Tensor& x) {
  const int64_t N = x.dim(0), F = w.w_gate.dim(0);
  Tensor dh = b.empty({N, F}, x.dtype());
  linear_backward(b, &dh, 0.0, g.w_down, dy, a.h, w.w_down);
  Tensor dgate = b.empty({N, F}, x.dtype()), dup = b.empty({N, F}, x.dtype());
  b.swiglu_backward(dgate, dup, dh, a.gate, a.up);
  linear_backward(b, &dx, dx_beta, g.w_gate, dgate, x, w.w_gate);
  linear_backward(b, &dx, 1.0, g.w_up, dup, x, w.w_up);
}

}  // namespace fm::blocks
