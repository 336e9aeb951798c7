// Advantage estimators (see RESEARCH.md). Outcome-reward estimators work on one
// score per sequence and the group (prompt) each sequence was sampled for; the
// sequence's advantage is then given to every one of its response tokens.
//   grpo    A_i = (r_i - mean_g) / (std_g + eps)   std unbiased (n - 1), as veRL
//           (norm_adv_by_std_in_grpo: false gives Dr.GRPO's A_i = r_i - mean_g)
//   drgrpo  A_i = r_i - mean_g
//   rloo    A_i = r_i - mean of the other n - 1 samples of the group = n / (n - 1) (r_i - mean_g)
// A group of one sample has no baseline: its advantage is 0 under every estimator.
//   gae     per token, from token rewards and critic values (PPO):
//           delta_t = r_t + gamma V_{t+1} - V_t (V_T = 0),  A_t = delta_t + gamma lambda A_{t+1},
//           returns_t = A_t + V_t
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fm {

class Communicator;

class ConfigNode;

enum class AdvantageEstimator { grpo, drgrpo, rloo, gae };

struct AdvantageConfig {
  AdvantageEstimator estimator = AdvantageEstimator::grpo;
  bool norm_adv_by_std_in_grpo = true;
  double epsilon = 1e-6;  // grpo: added to the group std
  double gamma = 1.0;     // gae
  double lam = 1.0;       // gae
  // Reads adv_estimator, norm_adv_by_std_in_grpo, gamma, lam (veRL's names).
  static AdvantageConfig from_yaml(const ConfigNode& node);
};

const char* advantage_estimator_name(AdvantageEstimator e);

// One advantage per sequence from its score and group id (any integer labels).
std::vector<double> group_advantages(const AdvantageConfig& config,
                                     const std::vector<double>& scores,
                                     const std::vector<int64_t>& groups);

struct GaeResult {
  std::vector<double> advantages;  // [T]
  std::vector<double> returns;     // [T] value targets
};
// One sequence's response tokens: rewards[t], values[t] for t in [0, T).
GaeResult gae(const std::vector<double>& rewards, const std::vector<double>& values, double gamma,
              double lam);

// (x - mean) / (std + eps) over the entries with mask 1 (population std, as veRL's
// masked_whiten); entries with mask 0 are left unchanged. With comm, the mean and std are
// over every rank's entries (a collective).
void whiten(std::vector<double>& x, const std::vector<uint8_t>& mask, double eps = 1e-8,
            Communicator* comm = nullptr);

}  // namespace fm
