#include "rl/policy_loss.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "engine/config.h"
#include "engine/error.h"

namespace fm {

namespace {

constexpr double kLogRatioClamp = 20.0;  // veRL clamps logp - old_logp (and ref - logp for k3)
constexpr double kK3Max = 10.0;          // veRL clamps the low-variance KL value

const char* agg_mode_name(LossAggMode m) {
  switch (m) {
    case LossAggMode::token_mean:
      return "token-mean";
    case LossAggMode::seq_mean_token_mean:
      return "seq-mean-token-mean";
    case LossAggMode::seq_mean_token_sum:
      return "seq-mean-token-sum";
    case LossAggMode::seq_mean_token_sum_norm:
      return "seq-mean-token-sum-norm";
  }
  return "?";
}

void check_field(const char* name, size_t size, size_t n) {
  FM_CHECK(size == n, "policy_loss: {} has {} entries, expected {} (one per token)", name, size, n);
}

}  // namespace

PolicyLossConfig PolicyLossConfig::from_yaml(const ConfigNode& n) {
  PolicyLossConfig c;
  const double both = n.get_in_range("clip_ratio", 0.0, 1.0, c.clip_ratio_low);
  c.clip_ratio_low = n.get_in_range("clip_ratio_low", 0.0, 1.0, both);
  c.clip_ratio_high = n.get_in_range("clip_ratio_high", 0.0, 100.0, both);
  c.clip_ratio_c = n.get_in_range("clip_ratio_c", 0.0, 1e9, c.clip_ratio_c);
  if (c.clip_ratio_c != 0.0 && c.clip_ratio_c <= 1.0)
    n.fail("clip_ratio_c",
           fmt::format("must be > 1, or 0 to disable the dual clip (got {})", c.clip_ratio_c));
  c.use_kl_loss = n.get<bool>("use_kl_loss", c.use_kl_loss);
  c.kl_loss_coef = n.get_in_range("kl_loss_coef", 0.0, 1e3, c.kl_loss_coef);
  const std::string kl =
      n.get_choice("kl_loss_type", {"kl", "k1", "mse", "k2", "low_var_kl", "k3"}, "low_var_kl");
  c.kl_loss_type = (kl == "kl" || kl == "k1")    ? KlEstimator::k1
                   : (kl == "mse" || kl == "k2") ? KlEstimator::k2
                                                 : KlEstimator::k3;
  c.entropy_coeff = n.get_in_range("entropy_coeff", 0.0, 10.0, c.entropy_coeff);
  const std::string agg = n.get_choice(
      "loss_agg_mode",
      {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"},
      "token-mean");
  c.loss_agg_mode = agg == "seq-mean-token-mean"       ? LossAggMode::seq_mean_token_mean
                    : agg == "seq-mean-token-sum"      ? LossAggMode::seq_mean_token_sum
                    : agg == "seq-mean-token-sum-norm" ? LossAggMode::seq_mean_token_sum_norm
                                                       : LossAggMode::token_mean;
  c.loss_scale_factor = n.get_in_range("loss_scale_factor", 0.0, 1e12, c.loss_scale_factor);
  return c;
}

LossNormalizer loss_normalizer(std::span<const PolicyLossInput> micro_batches) {
  LossNormalizer norm;
  for (const PolicyLossInput& in : micro_batches) {
    FM_CHECK(!in.seq_offsets.empty() && in.seq_offsets.back() == int64_t(in.mask.size()),
             "loss_normalizer: seq_offsets must end at the token count ({})", in.mask.size());
    for (size_t s = 0; s + 1 < in.seq_offsets.size(); ++s) {
      double n_s = 0;
      for (int64_t t = in.seq_offsets[s]; t < in.seq_offsets[s + 1]; ++t) n_s += in.mask[t];
      norm.tokens += n_s;
      norm.sequences += 1;
      norm.norm_length = std::max(norm.norm_length, n_s);
    }
  }
  return norm;
}

double kl_penalty(KlEstimator estimator, double logp, double ref_logp) {
  const double d = logp - ref_logp;
  switch (estimator) {
    case KlEstimator::k1:
      return d;
    case KlEstimator::k2:
      return 0.5 * d * d;
    case KlEstimator::k3: {
      const double x = std::clamp(ref_logp - logp, -kLogRatioClamp, kLogRatioClamp);
      return std::min(std::exp(x) - x - 1.0, kK3Max);
    }
  }
  return 0.0;
}

double kl_penalty_grad(KlEstimator estimator, double logp, double ref_logp) {
  const double d = logp - ref_logp;
  switch (estimator) {
    case KlEstimator::k1:
      return 1.0;
    case KlEstimator::k2:
      return d;
    case KlEstimator::k3: {
      const double x = ref_logp - logp;
      if (std::abs(x) > kLogRatioClamp || std::exp(x) - x - 1.0 > kK3Max) return 0.0;
      return 1.0 - std::exp(x);  // d/dlogp of e^x - x - 1 with dx/dlogp = -1
    }
  }
  return 0.0;
}

PolicyLossResult policy_loss(const PolicyLossConfig& c, const PolicyLossInput& in,
                             const LossNormalizer& norm) {
  const size_t n = in.mask.size();
  check_field("logp", in.logp.size(), n);
  check_field("old_logp", in.old_logp.size(), n);
  check_field("advantages", in.advantages.size(), n);
  if (c.use_kl_loss) check_field("ref_logp (use_kl_loss)", in.ref_logp.size(), n);
  const bool has_entropy = !in.entropy.empty();
  if (c.entropy_coeff != 0.0 || has_entropy) check_field("entropy", in.entropy.size(), n);
  FM_CHECK(
      !in.seq_offsets.empty() && in.seq_offsets.front() == 0 && in.seq_offsets.back() == int64_t(n),
      "policy_loss: seq_offsets must run from 0 to the token count {}", n);
  for (size_t s = 0; s + 1 < in.seq_offsets.size(); ++s)
    FM_CHECK(in.seq_offsets[s] <= in.seq_offsets[s + 1],
             "policy_loss: seq_offsets decrease at {} ({} > {})", s, in.seq_offsets[s],
             in.seq_offsets[s + 1]);

  const LossAggMode mode = c.loss_agg_mode;
  double norm_length = c.loss_scale_factor > 0 ? c.loss_scale_factor : norm.norm_length;
  if (mode == LossAggMode::token_mean) {
    FM_CHECK(norm.tokens > 0, "policy_loss: normalizer.tokens must be > 0 for {} (got {})",
             agg_mode_name(mode), norm.tokens);
  } else {
    FM_CHECK(norm.sequences > 0, "policy_loss: normalizer.sequences must be > 0 for {} (got {})",
             agg_mode_name(mode), norm.sequences);
  }
  if (mode == LossAggMode::seq_mean_token_sum_norm)
    FM_CHECK(norm_length > 0,
             "policy_loss: normalizer.norm_length must be > 0 for {} without loss_scale_factor "
             "(got {})",
             agg_mode_name(mode), norm_length);

  PolicyLossResult res;
  res.dlogp.assign(n, 0.0);
  res.dentropy.assign(n, 0.0);
  const double lo = 1.0 - c.clip_ratio_low, hi = 1.0 + c.clip_ratio_high;
  double ratio_sum = 0, pg_sum = 0, clipped = 0, dual = 0, ppo_kl = 0, kl_sum = 0, ent_sum = 0;
  double ratio_max = -INFINITY;

  for (size_t s = 0; s + 1 < in.seq_offsets.size(); ++s) {
    const int64_t begin = in.seq_offsets[s], end = in.seq_offsets[s + 1];
    double n_s = 0;
    for (int64_t t = begin; t < end; ++t) {
      FM_CHECK(in.mask[t] <= 1, "policy_loss: mask[{}] must be 0 or 1 (got {})", t, in.mask[t]);
      n_s += in.mask[t];
    }
    if (n_s == 0) continue;
    // d loss / d l_t for every response token of this sequence.
    double w = 0;
    switch (mode) {
      case LossAggMode::token_mean:
        w = 1.0 / norm.tokens;
        break;
      case LossAggMode::seq_mean_token_mean:
        w = 1.0 / (n_s * norm.sequences);
        break;
      case LossAggMode::seq_mean_token_sum:
        w = 1.0 / norm.sequences;
        break;
      case LossAggMode::seq_mean_token_sum_norm:
        w = 1.0 / (norm.sequences * norm_length);
        break;
    }
    for (int64_t t = begin; t < end; ++t) {
      if (!in.mask[t]) continue;
      const double logp = in.logp[t], old = in.old_logp[t], a = in.advantages[t];
      FM_CHECK(std::isfinite(logp) && std::isfinite(old) && std::isfinite(a),
               "policy_loss: non-finite logp/old_logp/advantages at response token {}", t);
      const double log_ratio = logp - old;
      const double ratio = std::exp(std::clamp(log_ratio, -kLogRatioClamp, kLogRatioClamp));
      const double dratio = std::abs(log_ratio) > kLogRatioClamp ? 0.0 : ratio;
      const double pg1 = -a * ratio, pg2 = -a * std::clamp(ratio, lo, hi);
      // The unclipped branch carries the gradient when it is the larger (ties: r in range).
      double pg = pg1, dpg = -a * dratio;
      if (pg2 > pg1) {
        pg = pg2;
        dpg = 0.0;
        clipped += 1;
      }
      if (a < 0 && c.clip_ratio_c > 0 && pg > -a * c.clip_ratio_c) {
        pg = -a * c.clip_ratio_c;
        dpg = 0.0;
        dual += 1;
      }
      double l = pg, dl = dpg;
      if (c.use_kl_loss) {
        const double ref = in.ref_logp[t];
        FM_CHECK(std::isfinite(ref), "policy_loss: non-finite ref_logp at response token {}", t);
        const double kl = kl_penalty(c.kl_loss_type, logp, ref);
        l += c.kl_loss_coef * kl;
        dl += c.kl_loss_coef * kl_penalty_grad(c.kl_loss_type, logp, ref);
        kl_sum += kl;
      }
      if (has_entropy) {
        const double e = in.entropy[t];
        FM_CHECK(std::isfinite(e), "policy_loss: non-finite entropy at response token {}", t);
        l -= c.entropy_coeff * e;
        res.dentropy[t] = -c.entropy_coeff * w;
        ent_sum += e;
      }
      res.loss += w * l;
      res.dlogp[t] = w * dl;
      ratio_sum += ratio;
      ratio_max = std::max(ratio_max, ratio);
      pg_sum += pg;
      ppo_kl += old - logp;
      res.tokens += 1;
    }
  }
  if (res.tokens > 0) {
    const double k = double(res.tokens);
    res.pg_loss = pg_sum / k;
    res.pg_clipfrac = clipped / k;
    res.pg_clipfrac_lower = dual / k;
    res.ppo_kl = ppo_kl / k;
    res.kl_loss = kl_sum / k;
    res.entropy = ent_sum / k;
    res.ratio_mean = ratio_sum / k;
    res.ratio_max = ratio_max;
  }
  return res;
}

}  // namespace fm
