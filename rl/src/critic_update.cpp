#include "rl/critic_update.h"

#include <algorithm>
#include <cmath>

#include "engine/collectives.h"
#include "engine/error.h"
#include "model/value_loss.h"

namespace fm {

std::vector<double> token_rewards(double score, const std::vector<double>& kl, double kl_coef,
                                  size_t tokens) {
  FM_CHECK(tokens > 0, "token_rewards: a response of no tokens");
  FM_CHECK(kl.empty() || kl.size() == tokens, "token_rewards: {} KL values for {} tokens",
           kl.size(), tokens);
  std::vector<double> r(tokens, 0.0);
  for (size_t t = 0; t < kl.size(); ++t) r[t] = -kl_coef * kl[t];
  r.back() += score;
  return r;
}

GaeTargets gae_targets(const AdvantageConfig& config, const std::vector<double>& scores,
                       const std::vector<std::vector<double>>& values,
                       const std::vector<std::vector<double>>& kl, double kl_coef,
                       Communicator* comm) {
  FM_CHECK(values.size() == scores.size() && (kl.empty() || kl.size() == scores.size()),
           "gae_targets: {} scores, {} value rows and {} KL rows", scores.size(), values.size(),
           kl.size());
  GaeTargets g;
  std::vector<double> flat;  // every response token's advantage, for the batch whitening
  for (size_t i = 0; i < scores.size(); ++i) {
    FM_CHECK(std::isfinite(scores[i]), "gae_targets: score {} is not finite ({})", i, scores[i]);
    const std::vector<double> r = token_rewards(
        scores[i], kl.empty() ? std::vector<double>{} : kl[i], kl_coef, values[i].size());
    GaeResult t = gae(r, values[i], config.gamma, config.lam);
    flat.insert(flat.end(), t.advantages.begin(), t.advantages.end());
    g.advantages.push_back(std::move(t.advantages));
    g.returns.push_back(std::move(t.returns));
  }
  whiten(flat, std::vector<uint8_t>(flat.size(), 1), 1e-8, comm);
  size_t k = 0;
  for (std::vector<double>& a : g.advantages)
    for (double& x : a) x = flat[k++];
  return g;
}

static ForwardOptions critic_options(const PackedSamples& packed, bool replay_routing,
                                     bool training) {
  return {.replay = replay_routing ? &packed.routes : nullptr, .training = training};
}

const ForwardResult& critic_values(MoeTransformer& critic, const PackedSamples& packed,
                                   bool replay_routing) {
  FM_CHECK(critic.config().value_head(), "critic '{}' has head: {}; a critic needs head: value",
           critic.config().name, critic.config().head);
  return critic.forward(packed.batch, critic_options(packed, replay_routing, false));
}

CriticUpdateMetrics update_critic(MoeTransformer& critic, AdamW& optimizer, double cliprange_value,
                                  bool replay_routing,
                                  const std::vector<CriticMicroBatch>& micro_batches) {
  FM_CHECK(!micro_batches.empty(), "update_critic: no micro-batches");
  // The mini-batch's token-mean: micro-batch k's own token-mean loss weighs tokens_k / tokens.
  // Under expert parallelism: every rank's tokens of the mini-batch.
  Communicator* comm = critic.ep_comm();
  int64_t mini_tokens = 0;
  for (const CriticMicroBatch& mb : micro_batches)
    for (uint8_t m : mb.packed.response_mask) mini_tokens += m != 0;
  mini_tokens = sum_over_ranks(comm, mini_tokens);
  FM_CHECK(mini_tokens > 0, "update_critic: the mini-batch has no response tokens");
  const double balance_scale = 1.0 / static_cast<double>(micro_batches.size());

  CriticUpdateMetrics m;
  critic.zero_grad();
  for (const CriticMicroBatch& mb : micro_batches) {
    const PackedSamples& p = mb.packed;
    const ForwardResult& r =
        critic.forward(p.batch, critic_options(p, replay_routing, /*training=*/true));
    bool finite = true;
    for (size_t t = 0; t < r.values.size(); ++t)
      if (p.response_mask[t] && !std::isfinite(r.values[t])) finite = false;
    if (any_rank(comm, !finite)) {
      m.skipped = true;  // a non-finite forward on any rank: every rank drops the step
      critic.zero_grad();
      return m;
    }
    ValueLossTerms l =
        clipped_value_loss(r.values, mb.returns, p.response_mask, mb.old_values, cliprange_value);
    int64_t tokens = 0;
    for (size_t t = 0; t < r.values.size(); ++t) {
      if (!p.response_mask[t]) continue;
      ++tokens;
      m.values_max_dev = std::max(m.values_max_dev, std::abs(r.values[t] - mb.old_values[t]));
    }
    const double w = static_cast<double>(tokens);
    m.vf_loss += w * l.loss;
    m.vf_clipfrac += w * l.clipfrac;
    m.tokens += tokens;
    m.balance_loss += balance_scale * r.balance_loss;
    const double share = w / static_cast<double>(mini_tokens);
    for (double& d : l.dvalues) d *= share;
    critic.backward_values(l.dvalues, balance_scale);
  }
  if (m.tokens > 0) {
    const double n = static_cast<double>(m.tokens);
    for (double* x : {&m.vf_loss, &m.vf_clipfrac}) *x /= n;
  }
  critic.all_reduce_grads();
  const StepReport rep = optimizer.step(critic.grads(), critic.grad_norm());
  critic.end_balance_step();
  m.grad_norm = rep.grad_norm;
  m.lr = rep.lr;
  m.skipped = rep.skipped;
  return m;
}

}  // namespace fm
