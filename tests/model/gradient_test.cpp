// Whole-model gradient checks: the analytic backward against central finite
// differences of the forward, in f64 on the CPU backend, with the routing
// replayed so that finite-difference perturbations cannot flip a top-k choice.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "support/model_fixtures.h"

namespace fm {
namespace {

struct Objective {
  std::vector<double> c_logp, c_entropy;
  double balance_scale = 0.7;
  double value(const ForwardResult& r) const {
    double j = balance_scale * r.balance_loss;
    for (size_t n = 0; n < r.logp.size(); ++n)
      j += c_logp[n] * r.logp[n] + c_entropy[n] * r.entropy[n];
    return j;
  }
};

Objective random_objective(int64_t n, uint64_t seed) {
  Rng rng(seed, 5);
  Objective o;
  o.c_logp.resize(n);
  o.c_entropy.resize(n);
  rng.uniform(o.c_logp.data(), n, -1.0, 1.0);
  rng.uniform(o.c_entropy.data(), n, -0.5, 0.5);
  return o;
}

// Checks d objective / d param for a spread of entries of every parameter tensor.
void check_gradients(const ModelConfig& config, const RoutingTrace* forced_routes) {
  auto backend = make_cpu_backend();
  MoeTransformer model(config, *backend, DType::f64);
  model.init_weights(11);
  const Batch batch = testing::random_batch(config, {5, 1, 4}, 3);
  const Objective obj = random_objective(batch.size(), 9);

  ForwardOptions record{.replay = forced_routes, .training = false};
  const RoutingTrace routes = model.forward(batch, record).routes;
  model.zero_grad();
  model.backward(obj.c_logp, obj.c_entropy, obj.balance_scale);

  const ForwardOptions replay{.replay = &routes, .training = false};
  double* p = model.params().flat().data<double>();
  const double* g = model.grads().flat().data<double>();
  int64_t offset = 0, checked = 0;
  double router_grad_norm = 0.0;
  for (const ParamSlot& s : model.params().slots()) {
    const int64_t n = shape_numel(s.shape);
    Rng pick(static_cast<uint64_t>(offset) + 1, 3);
    for (int probe = 0; probe < std::min<int64_t>(n, 6); ++probe) {
      const int64_t i = offset + static_cast<int64_t>(pick.next_below(static_cast<uint64_t>(n)));
      const double saved = p[i];
      // eps = 1e-5: truncation error ~eps^2 * |J'''| ~ 1e-10, rounding ~1e-16 * |J| / eps ~ 1e-11.
      const double eps = 1e-5;
      p[i] = saved + eps;
      const double up = obj.value(model.forward(batch, replay));
      p[i] = saved - eps;
      const double down = obj.value(model.forward(batch, replay));
      p[i] = saved;
      const double fd = (up - down) / (2 * eps);
      // Tolerance: 1e-7 absolute + 1e-6 relative, far above the FD error estimate above and far
      // below any real mistake (a wrong term changes a gradient by O(its size)).
      EXPECT_NEAR(g[i], fd, 1e-7 + 1e-6 * std::fabs(fd)) << s.name << " entry " << i - offset;
      ++checked;
    }
    if (s.name.find("mlp.gate.weight") != std::string::npos)
      for (int64_t i = offset; i < offset + n; ++i) router_grad_norm += g[i] * g[i];
    offset += n;
  }
  EXPECT_GT(checked, 50);
  if (config.n_moe_layers() > 0) {
    EXPECT_GT(std::sqrt(router_grad_norm), 1e-4) << "router gradient vanished";
  }
}

TEST(ModelGradient, WholeTinyModelMatchesFiniteDifferences) {
  check_gradients(testing::micro_config(), nullptr);
}

TEST(ModelGradient, DenseModelWithoutMoeLayersMatchesFiniteDifferences) {
  // first_k_dense = n_layers: every layer dense (a dense PPO critic, for one); no routing.
  ModelConfig c = testing::micro_config();
  c.first_k_dense = c.n_layers;
  ASSERT_EQ(c.n_moe_layers(), 0);
  check_gradients(c, nullptr);
}

TEST(ModelGradient, PhiBalancingObjectiveMatchesFiniteDifferencesWithFrozenPrice) {
  // phi's price depends on the batch only through stopgrad(p): with the routing replayed and
  // eta = 0 (price from the EMA state alone) the objective is exactly differentiable.
  check_gradients(testing::micro_config("method: phi\n    alpha: 0.2\n    eta: 0.0"), nullptr);
}

TEST(ModelGradient, ReplayedNonTopKRoutingKeepsRouterGradient) {
  // Replay ids that are NOT the router's own top-k (as after a policy update): the gates are
  // gathered from the full softmax at the replayed ids, so the router still gets a gradient,
  // and it matches finite differences.
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer model(c, *backend, DType::f64);
  model.init_weights(11);
  const Batch batch = testing::random_batch(c, {5, 1, 4}, 3);
  RoutingTrace forced = model.forward(batch, {.replay = nullptr, .training = false}).routes;
  for (int64_t n = 0; n < forced.tokens(); ++n)
    for (int64_t l = 0; l < forced.n_moe_layers; ++l) {
      // Shift every choice to the next experts: still distinct, rarely the top-k.
      for (int64_t k = 0; k < forced.top_k; ++k)
        forced.at(n, l, k) = static_cast<uint16_t>((forced.at(n, l, 0) + 1 + k) % c.n_experts);
    }
  check_gradients(c, &forced);
}

TEST(ModelGradient, Float32BackwardAgreesWithFloat64) {
  const ModelConfig c = testing::micro_config();
  auto backend = make_cpu_backend();
  MoeTransformer m32(c, *backend, DType::f32), m64(c, *backend, DType::f64);
  m32.init_weights(4);
  m64.init_weights(4);
  const Batch batch = testing::random_batch(c, {6, 7}, 8);
  const Objective obj = random_objective(batch.size(), 2);
  const RoutingTrace routes = m64.forward(batch, {.replay = nullptr, .training = false}).routes;
  const ForwardOptions replay{.replay = &routes, .training = false};
  const ForwardResult r32 = m32.forward(batch, replay);
  const ForwardResult r64 = m64.forward(batch, replay);
  for (size_t n = 0; n < r32.logp.size(); ++n) EXPECT_NEAR(r32.logp[n], r64.logp[n], 1e-5);
  m32.zero_grad();
  m64.zero_grad();
  m32.backward(obj.c_logp, obj.c_entropy, obj.balance_scale);
  m64.backward(obj.c_logp, obj.c_entropy, obj.balance_scale);
  const float* g32 = m32.grads().flat().data<float>();
  const double* g64 = m64.grads().flat().data<double>();
  double max_abs = 0.0, max_err = 0.0;
  for (int64_t i = 0; i < m32.grads().flat().numel(); ++i) {
    max_abs = std::max(max_abs, std::fabs(g64[i]));
    max_err = std::max(max_err, std::fabs(g32[i] - g64[i]));
  }
  // fp32 has ~7 digits; through a few layers of sums the error stays ~1e-5 of the gradient scale.
  EXPECT_LT(max_err, 1e-4 * max_abs);
}

}  // namespace
}  // namespace fm
