#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/config.h"
#include "engine/error.h"

namespace fm {

SamplingConfig SamplingConfig::from_yaml(const ConfigNode& n) {
  SamplingConfig c;
  c.temperature = n.get_in_range("temperature", 0.0, 100.0, c.temperature);
  c.top_p = n.get_in_range("top_p", 0.0, 1.0, c.top_p);
  if (c.top_p <= 0.0) n.fail("top_p", "must be > 0 (1 keeps every token)");
  c.top_k = n.get<int64_t>("top_k", c.top_k);
  if (c.top_k < 0)
    n.fail("top_k", fmt::format("must be >= 0 (0 keeps every token; got {})", c.top_k));
  return c;
}

static double log_sum_exp(const double* x, int64_t n, double scale) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i] * scale);
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] * scale - m);
  return m + std::log(s);
}

static int32_t argmax(const double* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return static_cast<int32_t>(best);
}

std::vector<std::pair<int32_t, double>> sampling_distribution(const double* logits, int64_t V_model,
                                                              const SamplingConfig& cfg) {
  FM_CHECK(V_model > 0, "sampling: empty logits row");
  const int64_t V = cfg.vocab_limit > 0 ? std::min(cfg.vocab_limit, V_model) : V_model;
  for (int64_t v = 0; v < V; ++v)
    FM_CHECK(std::isfinite(logits[v]), "sampling: logit {} is not finite ({})", v, logits[v]);
  if (cfg.greedy()) return {{argmax(logits, V), 1.0}};

  const double inv_t = 1.0 / cfg.temperature;
  const double lse = log_sum_exp(logits, V, inv_t);
  std::vector<std::pair<int32_t, double>> p(static_cast<size_t>(V));
  for (int64_t v = 0; v < V; ++v)
    p[v] = {static_cast<int32_t>(v), std::exp(logits[v] * inv_t - lse)};
  if (cfg.top_k == 0 && cfg.top_p >= 1.0) return p;  // no truncation: id order, no sort
  auto more_likely = [](const auto& a, const auto& b) {
    return a.second != b.second ? a.second > b.second : a.first < b.first;
  };
  const int64_t k = cfg.top_k > 0 ? std::min(cfg.top_k, V) : V;
  std::partial_sort(p.begin(), p.begin() + k, p.end(), more_likely);
  p.resize(static_cast<size_t>(k));

  // Nucleus: the shortest prefix whose mass (within the top-k set) reaches top_p.
  double total = 0.0;
  for (const auto& e : p) total += e.second;
  size_t keep = p.size();
  if (cfg.top_p < 1.0) {
    double cum = 0.0;
    for (size_t i = 0; i < p.size(); ++i) {
      cum += p[i].second;
      if (cum >= cfg.top_p * total) {
        keep = i + 1;
        break;
      }
    }
  }
  p.resize(keep);
  double kept_mass = 0.0;
  for (const auto& e : p) kept_mass += e.second;
  for (auto& e : p) e.second /= kept_mass;
  return p;
}

SampledToken sample_token(const double* logits, int64_t V, const SamplingConfig& cfg, double u) {
  const std::vector<std::pair<int32_t, double>> dist = sampling_distribution(logits, V, cfg);
  size_t i = 0;
  double cum = dist[0].second;
  while (u >= cum && i + 1 < dist.size()) cum += dist[++i].second;
  SampledToken t;
  t.id = dist[i].first;
  t.logp = std::log(dist[i].second);
  t.model_logp = logits[t.id] - log_sum_exp(logits, V, 1.0);
  return t;
}

std::vector<SampledToken> sample_rows(Backend& b, const Tensor& logits,
                                      const std::vector<double>& u, const SamplingConfig& cfg) {
  const auto rows = static_cast<int64_t>(u.size());
  std::vector<SampledToken> out(u.size());
  if (rows == 0) return out;
  FM_CHECK(logits.defined() && logits.rank() == 2 && logits.dim(0) == rows,
           "sampling: {} uniforms for logits {}", rows,
           logits.defined() ? logits.describe() : std::string("(undefined)"));
  const int64_t V = logits.dim(1);
  if (!b.samples_on_device()) {
    const std::vector<double> host = b.download_f64(logits);
    for (int64_t r = 0; r < rows; ++r)
      out[static_cast<size_t>(r)] =
          sample_token(host.data() + r * V, V, cfg, u[static_cast<size_t>(r)]);
    return out;
  }
  for (int64_t r = 0; r < rows; ++r)
    FM_CHECK(u[static_cast<size_t>(r)] >= 0.0 && u[static_cast<size_t>(r)] < 1.0,
             "sampling: u[{}] = {} is not in [0, 1)", r, u[static_cast<size_t>(r)]);
  Tensor ids = b.empty({rows}, DType::i32);
  Tensor logp = b.empty({rows}, DType::f64);
  Tensor model_logp = b.empty({rows}, DType::f64);
  const Tensor ut = b.upload(u, {rows}, DType::f64);
  b.sample_rows(ids, logp, model_logp, logits, ut,
                {cfg.temperature, cfg.top_k, cfg.top_p, cfg.vocab_limit});
  const std::vector<int32_t> id = b.download_i32(ids);
  const std::vector<double> lp = b.download_f64(logp);
  const std::vector<double> mlp = b.download_f64(model_logp);
  for (size_t r = 0; r < out.size(); ++r) out[r] = {id[r], lp[r], mlp[r]};
  return out;
}

}  // namespace fm
