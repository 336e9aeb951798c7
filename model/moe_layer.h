// MoeLayer: one routed MoE FFN block on its own -- the model's MoE layer (softmax router,
// top-k selection with the config's balancing, tokens permuted by expert, grouped SwiGLU
// expert GEMMs, gate-weighted combine, shared experts when the config has them) without the
// attention, norms and residual stream around it. It runs the very code of the model's layer
// (model/src/moe_block.cpp), so a figure measured here is the model's MoE layer: issue 7's
// MoE-layer benchmark against PyTorch (bench/bench_moe_layer.cpp,
// bench/reference/moe_layer_torch.py) and studies of one layer read it.
//
// The parameters are those of the MoE layer of a one-layer model of the config (router
// [E, H], experts gate/up [E, F, H] and down [E, H, F], shared experts), initialised as
// MoeTransformer::init_weights does, in f32 (master weights). Compute is f32, or bf16 as the
// model's mixed precision (MoeTransformer::set_compute_dtype): a bf16 copy of the weights,
// bf16 activations, the router in f32, the gradients accumulated into the f32 master
// gradients; or f64 throughout (parameters too), for finite-difference checks on the CPU.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/backend.h"
#include "model/config.h"
#include "model/moe_transformer.h"

namespace fm {

class MoeLayer {
 public:
  // `c` must have n_experts >= 1 and 1 <= top_k <= n_experts (its attention and vocabulary
  // fields are not used). compute: f32, bf16 or f64. Throws naming the problem otherwise.
  MoeLayer(const ModelConfig& c, Backend& backend, DType compute = DType::f32);
  ~MoeLayer();
  MoeLayer(const MoeLayer&) = delete;
  MoeLayer& operator=(const MoeLayer&) = delete;

  const ModelConfig& config() const { return model_->config(); }
  DType compute_dtype() const { return model_->compute_dtype(); }
  void init_weights(uint64_t seed) { model_->init_weights(seed); }

  // y [N, H] = the layer of x [N, H] (both in the compute dtype, on the backend); keeps what
  // backward needs (x is held, not copied: leave it unchanged until backward).
  void forward(Tensor& y, const Tensor& x);
  // dx [N, H] from dy [N, H] through the last forward, plus balance_scale times the config's
  // balancing loss; the weight gradients accumulate into grads().
  void backward(Tensor& dx, const Tensor& dy, double balance_scale = 1.0);
  void zero_grad() { model_->zero_grad(); }

  // The master weights and gradients (f32; f64 for f64 compute) (mutable: a caller may set the
  // weights; call touch_weights() after writing them so the bf16 copy refreshes).
  LayerWeights& weights() { return model_->params().weights().layers[0]; }
  LayerWeights& grads() { return model_->grads().weights().layers[0]; }
  void touch_weights() { model_->params().touch(); }
  // The last forward's expert choices [N * K] (token n's k-th at n * K + k) and its load [E].
  const std::vector<int32_t>& routes() const;
  const std::vector<int64_t>& load() const;
  // The config's balancing loss of the last forward (0 for none and loss_free); backward adds
  // balance_scale times its gradient.
  double balance_loss() const;

 private:
  struct State;
  std::unique_ptr<MoeTransformer> model_;  // a one-layer model: the parameters and their copy
  std::unique_ptr<State> state_;           // the last forward's activations
};

}  // namespace fm
