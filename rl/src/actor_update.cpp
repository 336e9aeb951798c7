#include "rl/actor_update.h"

#include <cmath>

#include "engine/collectives.h"
#include "engine/error.h"

namespace fm {

PolicyLossInput policy_loss_input(const ActorMicroBatch& mb, std::vector<double> logp,
                                  std::vector<double> entropy) {
  PolicyLossInput in;
  in.seq_offsets = mb.packed.batch.seq_offsets;
  in.mask = mb.packed.response_mask;
  in.logp = std::move(logp);
  in.old_logp = mb.old_logp;
  in.advantages = mb.advantages;
  in.ref_logp = mb.ref_logp;
  in.entropy = std::move(entropy);
  return in;
}

ActorUpdateMetrics update_actor(MoeTransformer& model, AdamW& optimizer,
                                const PolicyLossConfig& config,
                                const std::vector<ActorMicroBatch>& micro_batches,
                                MicroStepHooks* hooks) {
  FM_CHECK(!micro_batches.empty(), "update_actor: no micro-batches");
  // The normalizer needs every micro-batch's shape, not its log-probs.
  std::vector<PolicyLossInput> shapes;
  for (const ActorMicroBatch& mb : micro_batches) shapes.push_back(policy_loss_input(mb, {}, {}));
  LossNormalizer norm = loss_normalizer(shapes);
  // Under expert parallelism the mini-batch is every rank's micro-batches: a global
  // normalizer, so the ranks' gradients add up to the mini-batch's.
  Communicator* comm = model.ep_comm();
  std::vector<double> sums = {norm.tokens, norm.sequences};
  sum_over_ranks(comm, sums);
  norm = {sums[0], sums[1], max_over_ranks(comm, norm.norm_length)};
  const double balance_scale = 1.0 / static_cast<double>(micro_batches.size());

  ActorUpdateMetrics m;
  model.zero_grad();
  for (size_t i = 0; i < micro_batches.size(); ++i) {
    const ActorMicroBatch& mb = micro_batches[i];
    const ForwardResult& r =
        model.forward(mb.packed.batch, {.replay = &mb.packed.routes,
                                        .training = true,
                                        .placements = hooks ? hooks->before_forward(i) : nullptr});
    bool finite = true;
    for (size_t t = 0; t < r.logp.size(); ++t)
      if (mb.packed.response_mask[t] && !(std::isfinite(r.logp[t]) && std::isfinite(r.entropy[t])))
        finite = false;
    if (any_rank(comm, !finite)) {
      m.skipped = true;  // a non-finite forward on any rank: every rank drops the step
      if (hooks) hooks->after_backward(i);  // frees the replica slots (their gradients are 0)
      model.zero_grad();
      return m;
    }
    const PolicyLossResult l = policy_loss(config, policy_loss_input(mb, r.logp, r.entropy), norm);
    const double w = static_cast<double>(l.tokens);
    m.pg_loss += w * l.pg_loss;
    m.pg_clipfrac += w * l.pg_clipfrac;
    m.pg_clipfrac_lower += w * l.pg_clipfrac_lower;
    m.ppo_kl += w * l.ppo_kl;
    m.kl_loss += w * l.kl_loss;
    m.entropy += w * l.entropy;
    m.ratio_mean += w * l.ratio_mean;
    m.ratio_max = std::max(m.ratio_max, l.ratio_max);
    m.tokens += l.tokens;
    m.loss += l.loss;
    m.balance_loss += balance_scale * r.balance_loss;
    model.backward(l.dlogp, l.dentropy, balance_scale);
    if (hooks) hooks->after_backward(i);
  }
  if (m.tokens > 0) {
    const double n = static_cast<double>(m.tokens);
    for (double* x : {&m.pg_loss, &m.pg_clipfrac, &m.pg_clipfrac_lower, &m.ppo_kl, &m.kl_loss,
                      &m.entropy, &m.ratio_mean})
      *x /= n;
  }
  model.all_reduce_grads();
  if (hooks) hooks->before_optimizer_step();
  const StepReport rep = optimizer.step(model.grads(), model.grad_norm());
  if (hooks) hooks->after_optimizer_step();
  model.end_balance_step();
  m.grad_norm = rep.grad_norm;
  m.lr = rep.lr;
  m.skipped = rep.skipped;
  return m;
}

}  // namespace fm
