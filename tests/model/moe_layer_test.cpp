// MoeLayer (model/moe_layer.h): one MoE block on its own.
// - The forward equals a per-token reference written here from the layer's definition
//   (softmax router, top-k, renormalised gates, SwiGLU experts, shared expert), in f64.
// - The backward equals central finite differences of sum(y * r) + s * balance_loss in f64
//   (input, router, routed and shared expert weights).
// - bf16 compute stays close to f32 and accumulates into f32 gradients; runs are bitwise
//   repeatable; bad inputs are refused naming the tensor.
// - On a GPU (skipped without one) the layer on the CUDA backend matches the CPU backend in
//   f32 and bf16 (bf16 with either grouped weight-gradient path): the parity check behind
//   bench/bench_moe_layer.cpp's figures.
#include "model/moe_layer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "engine/error.h"
#include "engine/rng.h"
#include "support/cuda_parity.h"
#include "support/model_fixtures.h"

namespace fm {
namespace {

using testing::expect_error;

constexpr int64_t kTokens = 11;

std::vector<double> random_values(int64_t n, uint64_t seed) {
  Rng rng(seed, 0);
  std::vector<double> v(static_cast<size_t>(n));
  rng.normal(v.data(), n, 0.0, 1.0);
  return v;
}

// ||got - want|| / ||want|| (L2); want must not be all zero.
double relative_l2(const std::vector<double>& got, const std::vector<double>& want) {
  double norm = 0.0, diff = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    norm += want[i] * want[i];
    diff += (got[i] - want[i]) * (got[i] - want[i]);
  }
  EXPECT_GT(norm, 0.0);
  return std::sqrt(diff / norm);
}

// y = W x for W [rows, cols] (row-major, at `w`), x [cols].
std::vector<double> matvec(const double* w, int64_t rows, int64_t cols, const double* x) {
  std::vector<double> y(static_cast<size_t>(rows), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) y[r] += w[r * cols + c] * x[c];
  return y;
}

// down (silu(gate x) * (up x)) for one expert's [F, H], [F, H], [H, F] weights.
std::vector<double> swiglu_ffn(const double* gate, const double* up, const double* down, int64_t F,
                               int64_t H, const double* x) {
  const std::vector<double> g = matvec(gate, F, H, x), u = matvec(up, F, H, x);
  std::vector<double> h(static_cast<size_t>(F));
  for (int64_t f = 0; f < F; ++f) h[f] = g[f] / (1.0 + std::exp(-g[f])) * u[f];
  return matvec(down, H, F, h.data());
}

struct Reference {
  std::vector<double> y;     // [N, H]
  std::vector<int32_t> ids;  // [N, K], by descending probability
};

// The layer from its definition, token by token, from the host copies of the weights.
Reference reference_forward(MoeLayer& layer, Backend& b, const std::vector<double>& x) {
  const ModelConfig& c = layer.config();
  const int64_t H = c.hidden, E = c.n_experts, K = c.top_k, F = c.moe_ffn;
  const LayerWeights& w = layer.weights();
  const std::vector<double> router = b.download_f64(w.router);
  const std::vector<double> gate = b.download_f64(w.experts.w_gate),
                            up = b.download_f64(w.experts.w_up),
                            down = b.download_f64(w.experts.w_down);
  const int64_t N = static_cast<int64_t>(x.size()) / H;
  Reference r;
  r.y.assign(x.size(), 0.0);
  for (int64_t n = 0; n < N; ++n) {
    const double* xn = x.data() + n * H;
    std::vector<double> p = matvec(router.data(), E, H, xn);
    const double mx = *std::max_element(p.begin(), p.end());
    double z = 0.0;
    for (double& v : p) z += (v = std::exp(v - mx));
    for (double& v : p) v /= z;
    std::vector<int32_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t q) { return p[a] > p[q]; });
    double sel = 0.0;
    for (int64_t k = 0; k < K; ++k) sel += p[order[k]];
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = order[k];
      r.ids.push_back(e);
      const double g = c.norm_topk_prob ? p[e] / sel : p[e];
      const std::vector<double> out = swiglu_ffn(gate.data() + e * F * H, up.data() + e * F * H,
                                                 down.data() + e * H * F, F, H, xn);
      for (int64_t h = 0; h < H; ++h) r.y[n * H + h] += g * out[h];
    }
    if (c.n_shared_experts > 0) {
      const int64_t S = c.n_shared_experts * c.shared_ffn;
      const std::vector<double> out =
          swiglu_ffn(b.download_f64(w.shared.w_gate).data(), b.download_f64(w.shared.w_up).data(),
                     b.download_f64(w.shared.w_down).data(), S, H, xn);
      for (int64_t h = 0; h < H; ++h) r.y[n * H + h] += out[h];
    }
  }
  return r;
}

TEST(MoeLayer, ForwardMatchesAPerTokenReference) {
  const ModelConfig c = testing::micro_config();
  auto b = make_cpu_backend();
  for (DType dt : {DType::f32, DType::f64}) {
    MoeLayer layer(c, *b, dt);
    layer.init_weights(3);
    const std::vector<double> x = random_values(kTokens * c.hidden, 5);
    Tensor xt = b->upload(x, {kTokens, c.hidden}, dt), y = b->empty({kTokens, c.hidden}, dt);
    layer.forward(y, xt);
    const Reference ref = reference_forward(layer, *b, x);
    const std::vector<double> got = b->download_f64(y);
    const double tol = dt == DType::f64 ? 1e-12 : 2e-5;
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_NEAR(got[i], ref.y[i], tol * (1.0 + std::abs(ref.y[i])))
          << dtype_name(dt) << " element " << i;
    // The same experts per token (the layer keeps them in its top-k order).
    ASSERT_EQ(layer.routes(), ref.ids) << dtype_name(dt);
    int64_t assigned = 0;
    for (int64_t l : layer.load()) assigned += l;
    EXPECT_EQ(assigned, kTokens * c.top_k);
  }
}

// sum(y * r) + s * balance_loss after a forward of x: the scalar the backward differentiates.
double objective(MoeLayer& layer, Backend& b, const std::vector<double>& x,
                 const std::vector<double>& r, double s) {
  const int64_t H = layer.config().hidden, N = static_cast<int64_t>(x.size()) / H;
  Tensor xt = b.upload(x, {N, H}, DType::f64), y = b.empty({N, H}, DType::f64);
  layer.forward(y, xt);
  const std::vector<double> yv = b.download_f64(y);
  double sum = s * layer.balance_loss();
  for (size_t i = 0; i < yv.size(); ++i) sum += yv[i] * r[i];
  return sum;
}

// Central differences of the objective in one element of a weight tensor.
double weight_fd(MoeLayer& layer, Backend& b, Tensor& w, int64_t i, const std::vector<double>& x,
                 const std::vector<double>& r, double s, double eps) {
  std::vector<double> host = b.download_f64(w);
  const double w0 = host[i];
  auto at = [&](double v) {
    host[i] = v;
    b.copy(w, b.upload(host, w.shape(), DType::f64));
    layer.touch_weights();
    return objective(layer, b, x, r, s);
  };
  const double d = (at(w0 + eps) - at(w0 - eps)) / (2 * eps);
  at(w0);
  return d;
}

TEST(MoeLayer, BackwardMatchesFiniteDifferences) {
  const ModelConfig c = testing::micro_config();  // switch_aux balancing, a shared expert
  auto b = make_cpu_backend();
  MoeLayer layer(c, *b, DType::f64);
  layer.init_weights(7);
  const int64_t H = c.hidden;
  const std::vector<double> x = random_values(kTokens * H, 8), r = random_values(kTokens * H, 9);
  const double s = 0.5, eps = 1e-6;

  layer.zero_grad();
  objective(layer, *b, x, r, s);
  Tensor dx = b->empty({kTokens, H}, DType::f64);
  layer.backward(dx, b->upload(r, {kTokens, H}, DType::f64), s);
  const std::vector<double> dxv = b->download_f64(dx);
  const std::vector<int32_t> routes = layer.routes();

  for (int64_t i : {int64_t{0}, int64_t{17}, kTokens * H / 2, kTokens * H - 1}) {
    std::vector<double> xp = x, xm = x;
    xp[i] += eps;
    xm[i] -= eps;
    const double fd = (objective(layer, *b, xp, r, s) - objective(layer, *b, xm, r, s)) / (2 * eps);
    EXPECT_NEAR(dxv[i], fd, 1e-6 * (1.0 + std::abs(fd))) << "dx[" << i << "]";
  }
  objective(layer, *b, x, r, s);
  ASSERT_EQ(layer.routes(), routes) << "the perturbations must not change the routing";

  LayerWeights& w = layer.weights();
  LayerWeights& g = layer.grads();
  const std::vector<std::pair<const char*, std::pair<Tensor*, Tensor*>>> params = {
      {"router", {&w.router, &g.router}},
      {"experts.w_gate", {&w.experts.w_gate, &g.experts.w_gate}},
      {"experts.w_up", {&w.experts.w_up, &g.experts.w_up}},
      {"experts.w_down", {&w.experts.w_down, &g.experts.w_down}},
      {"shared.w_down", {&w.shared.w_down, &g.shared.w_down}},
  };
  for (const auto& [name, pair] : params) {
    const std::vector<double> grad = b->download_f64(*pair.second);
    const int64_t n = pair.first->numel();
    for (int64_t i : {int64_t{1}, n / 3, n - 2}) {
      const double fd = weight_fd(layer, *b, *pair.first, i, x, r, s, eps);
      EXPECT_NEAR(grad[i], fd, 1e-6 * (1.0 + std::abs(fd))) << name << "[" << i << "]";
    }
  }
}

TEST(MoeLayer, Bf16ComputeIsCloseToF32WithF32GradientsAndRepeats) {
  ModelConfig c = testing::micro_config();
  auto b = make_cpu_backend();
  const std::vector<double> x = random_values(kTokens * c.hidden, 12),
                            r = random_values(kTokens * c.hidden, 13);
  struct Run {
    std::vector<double> y, dx, grad_gate;
    std::vector<int32_t> routes;
  };
  auto run = [&](DType dt) {
    MoeLayer layer(c, *b, dt);
    layer.init_weights(4);
    layer.zero_grad();
    Tensor xt = b->upload(x, {kTokens, c.hidden}, dt), y = b->empty({kTokens, c.hidden}, dt);
    layer.forward(y, xt);
    Tensor dx = b->empty({kTokens, c.hidden}, dt);
    layer.backward(dx, b->upload(r, {kTokens, c.hidden}, dt));
    EXPECT_EQ(layer.grads().experts.w_gate.dtype(), DType::f32) << dtype_name(dt);
    return Run{b->download_f64(y), b->download_f64(dx),
               b->download_f64(layer.grads().experts.w_gate), layer.routes()};
  };
  const Run f32 = run(DType::f32), bf16 = run(DType::bf16), again = run(DType::bf16);
  EXPECT_EQ(bf16.y, again.y);
  EXPECT_EQ(bf16.dx, again.dx);
  EXPECT_EQ(bf16.grad_gate, again.grad_gate);
  // Tokens whose experts agree (bf16 may flip a near-tie) stay within bf16 error.
  const int64_t H = c.hidden, K = c.top_k;
  int64_t compared = 0;
  for (int64_t n = 0; n < kTokens; ++n) {
    if (!std::equal(f32.routes.begin() + n * K, f32.routes.begin() + (n + 1) * K,
                    bf16.routes.begin() + n * K))
      continue;
    ++compared;
    for (int64_t h = 0; h < H; ++h)
      EXPECT_NEAR(bf16.y[n * H + h], f32.y[n * H + h], 3e-2 * (1.0 + std::abs(f32.y[n * H + h])))
          << "token " << n;
  }
  EXPECT_GE(compared, kTokens - 2);
  EXPECT_LT(relative_l2(bf16.grad_gate, f32.grad_gate), 0.1)
      << "relative L2 error of the bf16 expert gradient";
}

TEST(MoeLayer, BadInputsAreRefusedNamingTheTensor) {
  const ModelConfig c = testing::micro_config();
  auto b = make_cpu_backend();
  MoeLayer layer(c, *b, DType::f32);
  layer.init_weights(1);
  Tensor y = b->empty({4, c.hidden}, DType::f32), dx = b->empty({4, c.hidden}, DType::f32);
  expect_error(
      [&] {
        layer.backward(dx, b->zeros({4, c.hidden}, DType::f32));
      },
      {"MoeLayer::backward", "no forward"});
  expect_error(
      [&] {
        layer.forward(y, b->zeros({4, c.hidden + 1}, DType::f32));
      },
      {"MoeLayer::forward", "x is", "[N, 16]"});
  expect_error(
      [&] {
        layer.forward(y, b->zeros({4, c.hidden}, DType::f64));
      },
      {"MoeLayer::forward", "x is", "f32"});
  expect_error(
      [&] {
        layer.forward(y, b->zeros({5, c.hidden}, DType::f32));
      },
      {"MoeLayer::forward", "y has 4 rows, x has 5"});
  layer.forward(y, b->zeros({4, c.hidden}, DType::f32));
  expect_error(
      [&] {
        layer.backward(dx, b->zeros({3, c.hidden}, DType::f32));
      },
      {"MoeLayer::backward", "dy is"});
  expect_error([&] { MoeLayer bad(c, *b, DType::i32); }, {"MoeLayer", "compute dtype"});
  ModelConfig no_moe = c;
  no_moe.top_k = 0;
  expect_error([&] { MoeLayer bad(no_moe, *b); }, {"MoeLayer", "no MoE layer", "top_k 0"});
}

TEST(CudaMoeLayer, ForwardAndBackwardMatchTheCpu) {
  FM_SKIP_WITHOUT_GPU();
  ModelConfig c = testing::micro_config();
  c.hidden = 64;  // tensor-core-sized rows (multiples of 8) with several experts
  c.moe_ffn = 48;
  c.n_experts = 8;
  c.top_k = 2;
  testing::Backends be;
  const int64_t N = 96, H = c.hidden;
  const std::vector<double> x = random_values(N * H, 21), r = random_values(N * H, 22);
  struct Run {
    std::vector<double> y, dx;
    std::vector<std::vector<double>> grads;
    std::vector<int32_t> routes;
  };
  auto run = [&](Backend& b, DType dt, bool kernel_wgrad = false) {
    if (kernel_wgrad) set_cuda_grouped_wgrad(b, CudaGroupedWgrad::kernel);
    MoeLayer layer(c, b, dt);
    layer.init_weights(5);
    layer.zero_grad();
    Tensor xt = b.upload(x, {N, H}, dt), y = b.empty({N, H}, dt), dx = b.empty({N, H}, dt);
    layer.forward(y, xt);
    layer.backward(dx, b.upload(r, {N, H}, dt));
    const LayerWeights& g = layer.grads();
    if (kernel_wgrad) set_cuda_grouped_wgrad(b, CudaGroupedWgrad::cublas);  // the default
    return Run{b.download_f64(y),
               b.download_f64(dx),
               {b.download_f64(g.router), b.download_f64(g.experts.w_gate),
                b.download_f64(g.experts.w_up), b.download_f64(g.experts.w_down)},
               layer.routes()};
  };
  // bf16 twice: the expert weight gradients by cuBLAS (the default) and by our kernel.
  for (const auto& [dt, kernel_wgrad] :
       {std::pair{DType::f32, false}, std::pair{DType::bf16, false},
        std::pair{DType::bf16, true}}) {
    const Run cpu = run(*be.cpu, dt), gpu = run(*be.gpu, dt, kernel_wgrad);
    const double rel = dt == DType::f32 ? 1e-4 : 3e-2;
    // Compared where both chose the same experts (bf16 arithmetic differs slightly between the
    // backends, so a near-tie may flip): at least all but a few tokens.
    int64_t same = 0;
    for (int64_t n = 0; n < N; ++n) {
      if (!std::equal(cpu.routes.begin() + n * c.top_k, cpu.routes.begin() + (n + 1) * c.top_k,
                      gpu.routes.begin() + n * c.top_k))
        continue;
      ++same;
      for (int64_t h = 0; h < H; ++h) {
        EXPECT_NEAR(gpu.y[n * H + h], cpu.y[n * H + h], rel * (1.0 + std::abs(cpu.y[n * H + h])))
            << dtype_name(dt) << " y token " << n;
        EXPECT_NEAR(gpu.dx[n * H + h], cpu.dx[n * H + h], rel * (1.0 + std::abs(cpu.dx[n * H + h])))
            << dtype_name(dt) << " dx token " << n;
      }
    }
    EXPECT_GE(same, dt == DType::f32 ? N : N - 3) << dtype_name(dt);
    if (same != N) continue;  // the gradients sum over every token
    for (size_t p = 0; p < cpu.grads.size(); ++p) {
      EXPECT_LT(relative_l2(gpu.grads[p], cpu.grads[p]), dt == DType::f32 ? 1e-5 : 1e-2)
          << dtype_name(dt) << " gradient " << p << " kernel_wgrad " << kernel_wgrad;
    }
  }
}

}  // namespace
}  // namespace fm
