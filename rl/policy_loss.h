// The PPO / GRPO policy loss on the host: clipped surrogate with dual clip,
// optional KL-to-reference loss and entropy bonus, aggregated over one
// micro-batch of packed sequences, with its exact gradient w.r.t. the token
// log-probs and entropies. Knob names follow veRL's actor config.
//
// Per response token t (mask 1):
//   r   = exp(clamp(logp - old_logp, -20, 20))
//   pg  = max(-A r, -A clip(r, 1 - low, 1 + high));  if A < 0 and c > 0: pg = min(pg, -A c)
//   l_t = pg + kl_loss_coef * kl(logp, ref_logp) [use_kl_loss] - entropy_coeff * entropy
// and the micro-batch loss is sum_t w_t l_t with w_t from the aggregation mode
// and the mini-batch's LossNormalizer, so the micro-batch losses of a
// mini-batch add up to the mini-batch's aggregate loss.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace fm {

class ConfigNode;

// How per-token losses become one number (veRL's loss_agg_mode).
//   token_mean:              sum_t l_t / tokens
//   seq_mean_token_mean:     sum_s (sum_{t in s} l_t / n_s) / sequences
//   seq_mean_token_sum:      sum_s sum_{t in s} l_t / sequences
//   seq_mean_token_sum_norm: sum_s sum_{t in s} l_t / (sequences * norm_length)  (Dr. GRPO)
// (veRL's seq-mean-token-sum-norm omits the division by sequences; here every
// seq-mean-* mode is a mean over sequences, which differs by that constant.)
enum class LossAggMode {
  token_mean,
  seq_mean_token_mean,
  seq_mean_token_sum,
  seq_mean_token_sum_norm
};

// KL(pi || ref) estimators per token (veRL names: "kl"/"k1", "mse"/"k2", "low_var_kl"/"k3").
enum class KlEstimator { k1, k2, k3 };

struct PolicyLossConfig {
  double clip_ratio_low = 0.2, clip_ratio_high = 0.2;  // ratio clipped to [1 - low, 1 + high]
  double clip_ratio_c = 3.0;  // dual clip for negative advantages (> 1); 0 disables
  bool use_kl_loss = false;
  double kl_loss_coef = 0.001;
  KlEstimator kl_loss_type = KlEstimator::k3;
  double entropy_coeff = 0.0;
  LossAggMode loss_agg_mode = LossAggMode::token_mean;
  // seq-mean-token-sum-norm divisor; 0: LossNormalizer::norm_length (the longest response in
  // the mini-batch).
  double loss_scale_factor = 0.0;

  // Reads and validates the actor's loss keys: clip_ratio_low, clip_ratio_high, clip_ratio
  // (sets both; the specific keys override it), clip_ratio_c, use_kl_loss, kl_loss_coef,
  // kl_loss_type, entropy_coeff, loss_agg_mode ("token-mean", "seq-mean-token-mean",
  // "seq-mean-token-sum", "seq-mean-token-sum-norm"), loss_scale_factor.
  static PolicyLossConfig from_yaml(const ConfigNode& node);
};

// One micro-batch of packed sequences; only response tokens (mask 1) count.
struct PolicyLossInput {
  std::vector<int64_t> seq_offsets;                // [S+1] over N tokens, 0 .. N
  std::vector<uint8_t> mask;                       // [N] 1: response token
  std::vector<double> logp, old_logp, advantages;  // [N]
  std::vector<double> ref_logp;                    // [N], required when use_kl_loss
  std::vector<double> entropy;  // [N], required when entropy_coeff != 0 (may be empty otherwise)
};

// How the micro-batch's loss is scaled so that summing over the micro-batches of a
// mini-batch gives the mini-batch's aggregate: token_mean divides by the mini-batch's
// response tokens; seq-mean-* by its sequences; sum-norm also by the norm length
// (config.loss_scale_factor when set, else norm_length). The field the mode needs must be > 0.
struct LossNormalizer {
  double tokens = 0, sequences = 0, norm_length = 0;
};

// The normalizer of a mini-batch made of these micro-batches: its response tokens, its
// sequences (all of them, with or without response tokens) and its longest response.
LossNormalizer loss_normalizer(std::span<const PolicyLossInput> micro_batches);

struct PolicyLossResult {
  double loss = 0;                      // this micro-batch's share of the mini-batch loss
  std::vector<double> dlogp, dentropy;  // [N] d loss / d logp, d loss / d entropy (0 off-mask)
  // Metrics over the micro-batch's response tokens (token means; 0 without tokens):
  double pg_loss = 0;            // mean pg (after clipping)
  double pg_clipfrac = 0;        // fraction where the clipped branch is the larger
  double pg_clipfrac_lower = 0;  // fraction where the dual clip is active
  double ppo_kl = 0;             // mean(old_logp - logp)
  double kl_loss = 0;            // mean kl(logp, ref_logp) (0 unless use_kl_loss)
  double entropy = 0;            // mean entropy (0 when none was given)
  double ratio_mean = 0, ratio_max = 0;
  int64_t tokens = 0;  // response tokens in this micro-batch
};

// Throws fm::Error naming the field on inconsistent sizes, offsets, masks or non-finite
// values on response tokens, and on a normalizer missing what the mode needs.
PolicyLossResult policy_loss(const PolicyLossConfig& config, const PolicyLossInput& input,
                             const LossNormalizer& normalizer);

// Per token: k1 = logp - ref, k2 = 0.5 (logp - ref)^2,
// k3 = exp(ref - logp) - (ref - logp) - 1 (as in veRL, ref - logp is clamped to +-20 and the
// value to <= 10; the gradient is 0 where a clamp is active).
double kl_penalty(KlEstimator estimator, double logp, double ref_logp);
// d kl_penalty / d logp.
double kl_penalty_grad(KlEstimator estimator, double logp, double ref_logp);

}  // namespace fm
