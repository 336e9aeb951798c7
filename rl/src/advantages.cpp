#include "rl/advantages.h"

#include <cmath>
#include <map>

#include "engine/collectives.h"
#include "engine/config.h"
#include "engine/error.h"

namespace fm {

const char* advantage_estimator_name(AdvantageEstimator e) {
  switch (e) {
    case AdvantageEstimator::grpo:
      return "grpo";
    case AdvantageEstimator::drgrpo:
      return "drgrpo";
    case AdvantageEstimator::rloo:
      return "rloo";
    case AdvantageEstimator::gae:
      return "gae";
  }
  return "?";
}

AdvantageConfig AdvantageConfig::from_yaml(const ConfigNode& n) {
  AdvantageConfig c;
  const std::string e = n.get_choice("adv_estimator", {"grpo", "drgrpo", "rloo", "gae"}, "grpo");
  c.estimator = e == "gae"      ? AdvantageEstimator::gae
                : e == "rloo"   ? AdvantageEstimator::rloo
                : e == "drgrpo" ? AdvantageEstimator::drgrpo
                                : AdvantageEstimator::grpo;
  c.norm_adv_by_std_in_grpo = n.get<bool>("norm_adv_by_std_in_grpo", c.norm_adv_by_std_in_grpo);
  c.gamma = n.get_in_range("gamma", 0.0, 1.0, c.gamma);
  c.lam = n.get_in_range("lam", 0.0, 1.0, c.lam);
  return c;
}

std::vector<double> group_advantages(const AdvantageConfig& cfg, const std::vector<double>& scores,
                                     const std::vector<int64_t>& groups) {
  FM_CHECK(cfg.estimator != AdvantageEstimator::gae,
           "group_advantages: gae needs token rewards and values (use gae())");
  FM_CHECK(scores.size() == groups.size(), "group_advantages: {} scores for {} group ids",
           scores.size(), groups.size());
  for (size_t i = 0; i < scores.size(); ++i)
    FM_CHECK(std::isfinite(scores[i]), "group_advantages: score {} is not finite ({})", i,
             scores[i]);
  std::map<int64_t, std::vector<size_t>> members;
  for (size_t i = 0; i < groups.size(); ++i) members[groups[i]].push_back(i);
  std::vector<double> adv(scores.size(), 0.0);
  for (const auto& [g, idx] : members) {
    const double n = static_cast<double>(idx.size());
    if (idx.size() < 2) continue;  // no baseline: advantage 0
    double mean = 0.0;
    for (size_t i : idx) mean += scores[i];
    mean /= n;
    double var = 0.0;
    for (size_t i : idx) var += (scores[i] - mean) * (scores[i] - mean);
    const double std = std::sqrt(var / (n - 1.0));
    for (size_t i : idx) {
      const double centred = scores[i] - mean;
      switch (cfg.estimator) {
        case AdvantageEstimator::grpo:
          adv[i] = cfg.norm_adv_by_std_in_grpo ? centred / (std + cfg.epsilon) : centred;
          break;
        case AdvantageEstimator::drgrpo:
          adv[i] = centred;
          break;
        case AdvantageEstimator::rloo:
          adv[i] = n / (n - 1.0) * centred;
          break;
        case AdvantageEstimator::gae:
          break;
      }
    }
  }
  return adv;
}

GaeResult gae(const std::vector<double>& rewards, const std::vector<double>& values, double gamma,
              double lam) {
  FM_CHECK(rewards.size() == values.size(), "gae: {} rewards for {} values", rewards.size(),
           values.size());
  const size_t T = rewards.size();
  GaeResult r{std::vector<double>(T), std::vector<double>(T)};
  double next_value = 0.0, next_adv = 0.0;
  for (size_t t = T; t-- > 0;) {
    const double delta = rewards[t] + gamma * next_value - values[t];
    next_adv = delta + gamma * lam * next_adv;
    r.advantages[t] = next_adv;
    r.returns[t] = next_adv + values[t];
    next_value = values[t];
  }
  return r;
}

void whiten(std::vector<double>& x, const std::vector<uint8_t>& mask, double eps,
            Communicator* comm) {
  FM_CHECK(x.size() == mask.size(), "whiten: {} values for {} mask entries", x.size(), mask.size());
  double n = 0, mean = 0;
  for (size_t i = 0; i < x.size(); ++i)
    if (mask[i]) mean += x[i], n += 1;
  std::vector<double> sums = {mean, n};
  sum_over_ranks(comm, sums);
  mean = sums[0], n = sums[1];
  if (n == 0) return;
  mean /= n;
  double var = 0;
  for (size_t i = 0; i < x.size(); ++i)
    if (mask[i]) var += (x[i] - mean) * (x[i] - mean);
  var = sum_over_ranks(comm, var);
  const double std = std::sqrt(var / n);
  for (size_t i = 0; i < x.size(); ++i)
    if (mask[i]) x[i] = (x[i] - mean) / (std + eps);
}

}  // namespace fm
