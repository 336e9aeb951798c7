// MoeLayer (model/moe_layer.h): the model's MoE block (blocks::moe_forward / moe_backward)
// over the parameters of a one-layer MoeTransformer, which supplies the initialisation, the
// bf16 compute copy and the f32 gradients exactly as the model does for its own layers.
#include "model/moe_layer.h"

#include "engine/error.h"
#include "model/src/blocks.h"

namespace fm {

struct MoeLayer::State {
  blocks::MoeActs acts;
  Tensor x;  // the last forward's input; undefined before the first forward completes
};

namespace {

ModelConfig one_layer(const ModelConfig& c) {
  FM_CHECK(
      c.n_experts >= 1 && c.top_k >= 1 && c.top_k <= c.n_experts && c.hidden >= 1 && c.moe_ffn >= 1,
      "MoeLayer: model '{}' has no MoE layer to build (n_experts {}, top_k {}, hidden {}, "
      "moe_ffn {})",
      c.name, c.n_experts, c.top_k, c.hidden, c.moe_ffn);
  ModelConfig one = c;
  one.n_layers = 1;
  one.first_k_dense = 0;
  one.vocab_size = 1;  // the embedding and head are never used
  one.tie_embeddings = true;
  one.head = "lm";
  return one;
}

}  // namespace

MoeLayer::MoeLayer(const ModelConfig& c, Backend& backend, DType compute)
    : state_(std::make_unique<State>()) {
  FM_CHECK(compute == DType::f32 || compute == DType::bf16 || compute == DType::f64,
           "MoeLayer: compute dtype must be f32, bf16 or f64 (got {})", dtype_name(compute));
  const DType params = compute == DType::f64 ? DType::f64 : DType::f32;
  model_ = std::make_unique<MoeTransformer>(one_layer(c), backend, params);
  if (compute == DType::bf16) model_->set_compute_dtype(compute);
}

MoeLayer::~MoeLayer() = default;

void MoeLayer::forward(Tensor& y, const Tensor& x) {
  const ModelConfig& c = config();
  Backend& b = model_->backend();
  const DType dt = compute_dtype();
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&x, "x"}, {&y, "y"}}) {
    FM_CHECK(t->defined() && t->rank() == 2 && t->dim(1) == c.hidden && t->dtype() == dt &&
                 t->device() == b.device(),
             "MoeLayer::forward: {} is {}, expected a [N, {}] {} tensor on {}", name, t->describe(),
             c.hidden, dtype_name(dt), device_name(b.device()));
  }
  FM_CHECK(y.dim(0) == x.dim(0), "MoeLayer::forward: y has {} rows, x has {}", y.dim(0), x.dim(0));
  state_->x = Tensor();
  state_->acts = blocks::MoeActs{};
  const LayerWeights& w = model_->compute_weights().layers[0];
  blocks::moe_forward(b, c, w, model_->balance_state()[0], nullptr, state_->acts, y, x);
  state_->x = x;
}

void MoeLayer::backward(Tensor& dx, const Tensor& dy, double balance_scale) {
  FM_CHECK(state_->x.defined(), "MoeLayer::backward: no forward to backpropagate through");
  const Tensor& x = state_->x;
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&dy, "dy"}, {&dx, "dx"}}) {
    FM_CHECK(t->defined() && t->shape() == x.shape() && t->dtype() == x.dtype() &&
                 t->device() == x.device(),
             "MoeLayer::backward: {} is {}, expected {} like the forward's x", name, t->describe(),
             x.describe());
  }
  Backend& b = model_->backend();
  const LayerWeights& w = model_->compute_weights().layers[0];
  blocks::moe_backward(b, config(), w, grads(), state_->acts, dx, dy, x, balance_scale);
}

const std::vector<int32_t>& MoeLayer::routes() const {
  return state_->acts.host_ids;
}
const std::vector<int64_t>& MoeLayer::load() const {
  return state_->acts.load;
}
double MoeLayer::balance_loss() const {
  return state_->acts.balance.loss;
}

}  // namespace fm
