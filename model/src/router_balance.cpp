#include "model/router_balance.h"

#include <algorithm>
#include <cmath>

namespace fm {

LayerBalanceState::LayerBalanceState(int64_t n_experts)
    : bias(static_cast<size_t>(n_experts), 0.0),
      ema(static_cast<size_t>(n_experts),
          n_experts > 0 ? 1.0 / static_cast<double>(n_experts) : 0.0),
      step_load(static_cast<size_t>(n_experts), 0),
      step_prob_sum(static_cast<size_t>(n_experts), 0.0) {}

std::vector<double> phi_price(PhiPotential potential, const std::vector<double>& m) {
  std::vector<double> q(m.size());
  for (size_t e = 0; e < m.size(); ++e)
    q[e] = potential == PhiPotential::l2 ? m[e] : std::log(std::max(m[e], 1e-30)) + 1.0;
  return q;
}

std::vector<double> phi_ema(const RouterBalanceConfig& cfg, const std::vector<double>& m,
                            const std::vector<double>& p) {
  const double w_new = cfg.eta_weights_new ? cfg.eta : 1.0 - cfg.eta;
  std::vector<double> out(m.size());
  for (size_t e = 0; e < m.size(); ++e) out[e] = (1.0 - w_new) * m[e] + w_new * p[e];
  return out;
}

BalanceTerm balance_term(const RouterBalanceConfig& cfg, const LayerBalanceState& state,
                         const std::vector<double>& prob_sum, const std::vector<int64_t>& load,
                         int64_t n_tokens, int64_t top_k) {
  BalanceTerm t;
  const size_t E = prob_sum.size();
  if (n_tokens == 0) return t;
  const double N = static_cast<double>(n_tokens);
  switch (cfg.method) {
    case BalanceMethod::none:
    case BalanceMethod::loss_free:
      return t;
    case BalanceMethod::switch_aux:
    case BalanceMethod::global_aux: {
      // L = alpha * E * sum_i f_i P_i,  f_i = load_i / (K * T),  P_i = prob_sum_i / N.
      // global_aux takes f over the step so far (earlier micro-batches + this one).
      std::vector<double> f(E);
      const bool global = cfg.method == BalanceMethod::global_aux;
      const double T = global ? static_cast<double>(state.step_tokens) + N : N;
      for (size_t e = 0; e < E; ++e) {
        const double l = static_cast<double>(load[e] + (global ? state.step_load[e] : 0));
        f[e] = l / (static_cast<double>(top_k) * T);
      }
      t.dprobs.resize(E);
      for (size_t e = 0; e < E; ++e) {
        t.loss += cfg.alpha * static_cast<double>(E) * f[e] * prob_sum[e] / N;
        t.dprobs[e] = cfg.alpha * static_cast<double>(E) * f[e] / N;
      }
      return t;
    }
    case BalanceMethod::phi: {
      // p_t = batch mean of soft probabilities; m' = EMA(m, stopgrad(p_t)); q = grad phi(m');
      // L = alpha * sum_e q_e p_t,e (gradient through p_t only).
      std::vector<double> p(E);
      for (size_t e = 0; e < E; ++e) p[e] = prob_sum[e] / N;
      const std::vector<double> q = phi_price(cfg.potential, phi_ema(cfg, state.ema, p));
      t.dprobs.resize(E);
      for (size_t e = 0; e < E; ++e) {
        t.loss += cfg.alpha * q[e] * p[e];
        t.dprobs[e] = cfg.alpha * q[e] / N;
      }
      return t;
    }
  }
  return t;
}

void accumulate_step_stats(LayerBalanceState& s, const std::vector<double>& prob_sum,
                           const std::vector<int64_t>& load, int64_t n_tokens) {
  for (size_t e = 0; e < s.step_load.size(); ++e) {
    s.step_load[e] += load[e];
    s.step_prob_sum[e] += prob_sum[e];
  }
  s.step_tokens += n_tokens;
}

void end_balance_step(const RouterBalanceConfig& cfg, LayerBalanceState& s) {
  const size_t E = s.step_load.size();
  if (s.step_tokens > 0) {
    if (cfg.method == BalanceMethod::loss_free) {
      // b_i += u * sign(mean_load - load_i)
      double mean = 0.0;
      for (int64_t l : s.step_load) mean += static_cast<double>(l);
      mean /= static_cast<double>(E);
      for (size_t e = 0; e < E; ++e) {
        const double diff = mean - static_cast<double>(s.step_load[e]);
        s.bias[e] += cfg.bias_rate * static_cast<double>((diff > 0) - (diff < 0));
      }
    } else if (cfg.method == BalanceMethod::phi) {
      std::vector<double> p(E);
      for (size_t e = 0; e < E; ++e) p[e] = s.step_prob_sum[e] / static_cast<double>(s.step_tokens);
      s.ema = phi_ema(cfg, s.ema, p);
    }
  }
  std::fill(s.step_load.begin(), s.step_load.end(), 0);
  std::fill(s.step_prob_sum.begin(), s.step_prob_sum.end(), 0.0);
  s.step_tokens = 0;
}

double gini(const std::vector<int64_t>& load) {
  if (load.empty()) return 0.0;
  std::vector<double> x(load.begin(), load.end());
  std::sort(x.begin(), x.end());
  double sum = 0.0, weighted = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    sum += x[i];
    weighted += static_cast<double>(i + 1) * x[i];
  }
  if (sum == 0.0) return 0.0;
  const double n = static_cast<double>(x.size());
  return (2.0 * weighted) / (n * sum) - (n + 1.0) / n;
}

}  // namespace fm
