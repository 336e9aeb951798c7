#include "rl/rl_trainer.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <numeric>

#include "engine/collectives.h"
#include "engine/error.h"
#include "engine/rng.h"
#include "model/checkpoint.h"
#include "rl/sft_trainer.h"

namespace fm {

namespace {

std::atomic<bool> g_stop{false};

extern "C" void on_sigint(int) {
  g_stop.store(true);
}

// Times a stage into `out`, telling the observer (if any) that it started.
class StageTimer {
 public:
  StageTimer(const RlTrainer::StageObserver& observer, const char* stage, double& out)
      : out_(out), t0_(std::chrono::steady_clock::now()) {
    if (observer) observer(stage);
  }
  ~StageTimer() {
    out_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }

 private:
  double& out_;
  std::chrono::steady_clock::time_point t0_;
};

// Random streams of the RL loop, each a function of (seed, step).
constexpr uint64_t kShuffleStream = uint64_t{0x5f0f} << 32;

// A PPO checkpoint's critic: a checkpoint of its own in this subdirectory.
constexpr const char* kCriticDir = "critic";

uint64_t generation_seed(uint64_t seed, int64_t step) {
  return seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(step) * 0xBF58476D1CE4E5B9ull + 1;
}

}  // namespace

void install_stop_on_sigint() {
  std::signal(SIGINT, on_sigint);
}
bool stop_requested() {
  return g_stop.load();
}
void request_stop() {
  g_stop.store(true);
}

RlTrainer::RlTrainer(RlRunConfig config, Backend& backend, Communicator* comm,
                     CpuTransferGroup* policy_transfer)
    : config_(std::move(config)),
      backend_(backend),
      comm_(comm != nullptr && comm->size() > 1 ? comm : nullptr),
      world_(comm_ != nullptr ? comm_->size() : 1),
      rank_(comm_ != nullptr ? comm_->rank() : 0),
      tokenizer_(load_tokenizer(config_.tokenizer)),
      template_(PromptTemplate::named(config_.prompt_template)),
      task_(make_task(config_.task)) {
  const std::string why = config_.rank_count_problem(world_);
  FM_CHECK(why.empty(), "{}: cannot run on {} ranks: {}", config_.origin, world_, why);
  local_prompts_ = config_.train_batch_size / world_;
  const ExpertParallel ep{comm_};
  policy_ = std::make_unique<MoeTransformer>(config_.model, backend_, DType::f32, ep);
  policy_->init_weights(config_.trainer.seed);
  if (config_.needs_ref()) {
    ref_ = std::make_unique<MoeTransformer>(config_.model, backend_, DType::f32, ep);
    ref_->init_weights(config_.trainer.seed);
  }
  // Mixed precision before the balancers: the replica slots take the compute dtype.
  if (config_.trainer.compute_dtype() == DType::bf16) {
    for (MoeTransformer* m : {policy_.get(), ref_.get()})
      if (m != nullptr) m->set_compute_dtype(DType::bf16);
  }
  optimizer_ = std::make_unique<AdamW>(config_.actor.optim, policy_->params(), backend_);
  balancer_ =
      std::make_unique<MicroStepBalancer>(config_.balancer, *policy_, comm_, policy_transfer);
  // The frozen reference fills its replica slots through the communicator.
  if (ref_)
    ref_balancer_ = std::make_unique<MicroStepBalancer>(config_.balancer, *ref_, comm_,
                                                        /*group=*/nullptr);
  if (config_.has_critic) {
    critic_ = std::make_unique<MoeTransformer>(config_.critic.model, backend_, DType::f32, ep);
    critic_optimizer_ = std::make_unique<AdamW>(config_.critic.optim, critic_->params(), backend_);
    critic_replay_ = config_.critic_replays_routing();
    init_critic();
  }
  if (critic_ && config_.trainer.compute_dtype() == DType::bf16)
    critic_->set_compute_dtype(DType::bf16);
}

void RlTrainer::init_critic() {
  const std::string& init = config_.critic.init;
  if (init != "random" && init != "actor") {
    load_weights(init, *critic_);
    return;
  }
  critic_->init_weights(config_.trainer.seed + 1);
  if (init == "random") return;
  // init: actor: every trunk parameter from the policy, the value head as initialized.
  for (const ParamSlot& p : critic_->params().slots()) {
    if (p.name.rfind("value_head.", 0) == 0) continue;
    const auto& slots = policy_->params().slots();
    const auto it = std::find_if(slots.begin(), slots.end(),
                                 [&](const ParamSlot& q) { return q.name == p.name; });
    FM_CHECK(it != slots.end() && it->shape == p.shape,
             "{}: critic.init: actor needs the critic's trunk to be the actor's, but parameter "
             "{} {}",
             config_.origin, p.name,
             it == slots.end() ? std::string("is not in the actor")
                               : fmt::format("has shape [{}] in the critic and [{}] in the actor",
                                             fmt::join(p.shape, ", "), fmt::join(it->shape, ", ")));
    backend_.copy(*p.slot, *it->slot);
  }
}

void RlTrainer::load_initial_weights(const std::string& dir) {
  load_weights(dir, *policy_);
  if (ref_) load_weights(dir, *ref_);
  init_weights_ = dir;
  if (critic_ && config_.critic.init == "actor") init_critic();
}

std::vector<std::vector<size_t>> RlTrainer::micro_batches(const std::vector<size_t>& order,
                                                          const UpdateBatching& b) const {
  std::vector<std::vector<size_t>> out;
  int64_t tokens = 0;
  for (size_t i : order) {
    const GeneratedSequence& s = samples_[i].sequence;
    const int64_t len = static_cast<int64_t>(s.prompt.size() + s.response.size());
    const bool full =
        out.empty() ||
        (b.max_token_len > 0 ? tokens + len > b.max_token_len
                             : static_cast<int64_t>(out.back().size()) >= b.micro_batch_size);
    if (full) {
      out.emplace_back();
      tokens = 0;
    }
    out.back().push_back(i);
    tokens += len;
  }
  if (b.max_token_len > 0) equalize_micro_batches(out);
  return out;
}

void RlTrainer::equalize_micro_batches(std::vector<std::vector<size_t>>& micro) const {
  const int64_t want = max_over_ranks(comm_, static_cast<int64_t>(micro.size()));
  // Every rank's mini-batch has the same number of sequences, so `want` <= this rank's:
  // halve the micro-batch with the most sequences until the counts agree.
  while (static_cast<int64_t>(micro.size()) < want) {
    auto big = std::max_element(micro.begin(), micro.end(),
                                [](const auto& a, const auto& b) { return a.size() < b.size(); });
    FM_CHECK(big->size() > 1,
             "equalize_micro_batches: {} micro-batches of single sequences "
             "cannot become {}",
             micro.size(), want);
    std::vector<size_t> tail(big->begin() + static_cast<int64_t>(big->size() / 2), big->end());
    big->resize(big->size() / 2);
    micro.insert(big + 1, std::move(tail));
  }
}

ActorMicroBatch RlTrainer::gather(const std::vector<size_t>& indices) const {
  ActorMicroBatch mb;
  mb.packed = pack_samples(samples_, indices);
  for (size_t i : indices) {
    mb.old_logp.insert(mb.old_logp.end(), old_logp_[i].begin(), old_logp_[i].end());
    mb.advantages.insert(mb.advantages.end(), advantages_[i].begin(), advantages_[i].end());
    if (ref_) mb.ref_logp.insert(mb.ref_logp.end(), ref_logp_[i].begin(), ref_logp_[i].end());
  }
  return mb;
}

CriticMicroBatch RlTrainer::gather_critic(const std::vector<size_t>& indices) const {
  CriticMicroBatch mb;
  mb.packed = pack_samples(samples_, indices);
  for (size_t i : indices) {
    mb.old_values.insert(mb.old_values.end(), values_[i].begin(), values_[i].end());
    mb.returns.insert(mb.returns.end(), returns_[i].begin(), returns_[i].end());
  }
  return mb;
}

std::vector<std::vector<size_t>> RlTrainer::mini_batches(int64_t epoch,
                                                         int64_t mini_batch_size) const {
  const RlRunConfig& c = config_;
  // Epoch e of the actor and of the critic shuffle alike; every step has its own streams.
  const int64_t epochs_per_step =
      std::max(c.actor.ppo_epochs, c.has_critic ? c.critic.ppo_epochs : int64_t{1});
  // This rank's prompts (all of them on one rank), shuffled alike on every rank.
  std::vector<size_t> prompt_order(static_cast<size_t>(local_prompts_));
  std::iota(prompt_order.begin(), prompt_order.end(), 0);
  Rng rng(c.trainer.seed,
          kShuffleStream + static_cast<uint64_t>(steps_done_ * epochs_per_step + epoch));
  for (size_t k = prompt_order.size(); k > 1; --k)
    std::swap(prompt_order[k - 1], prompt_order[rng.next_below(k)]);
  const size_t per = static_cast<size_t>(mini_batch_size / world_);
  std::vector<std::vector<size_t>> minis;
  for (size_t first = 0; first < prompt_order.size(); first += per) {
    std::vector<size_t> order;  // every sample of the mini-batch's prompts
    for (size_t q = first; q < first + per; ++q)
      for (int64_t s = 0; s < c.rollout.n; ++s)
        order.push_back(prompt_order[q] * static_cast<size_t>(c.rollout.n) +
                        static_cast<size_t>(s));
    minis.push_back(std::move(order));
  }
  return minis;
}

RlTrainer::UpdatePlan RlTrainer::update_plan(const UpdateBatching& b) const {
  UpdatePlan plan;
  for (int64_t epoch = 0; epoch < b.epochs; ++epoch) {
    plan.emplace_back();
    for (const auto& mini : mini_batches(epoch, b.mini_batch_size))
      plan.back().push_back(micro_batches(mini, b));
  }
  return plan;
}

// Splits the packed per-position values of `indices` back into per-sample vectors.
static void scatter_positions(const PackedSamples& p, const std::vector<size_t>& indices,
                              const std::vector<double>& values,
                              std::vector<std::vector<double>>& out) {
  for (size_t k = 0; k < indices.size(); ++k)
    out[indices[k]].assign(values.begin() + p.batch.seq_offsets[k],
                           values.begin() + p.batch.seq_offsets[k + 1]);
}

RlStepMetrics RlTrainer::step() {
  const RlRunConfig& c = config_;
  RlStepMetrics m;
  m.step = steps_done_ + 1;
  const auto t_step = std::chrono::steady_clock::now();

  {  // gen
    StageTimer t(observer_, "gen", m.timing.gen);
    GenerationConfig g;
    g.sampling.temperature = c.rollout.temperature;
    g.sampling.top_p = c.rollout.top_p;
    g.sampling.top_k = c.rollout.top_k;
    g.max_new_tokens = c.rollout.response_length;
    g.batch_slots = c.rollout.batch_slots;
    g.seed = generation_seed(c.trainer.seed, steps_done_);
    // This rank's prompts; its samples draw the streams of their global indices.
    const int64_t first_prompt = rank_ * local_prompts_;
    g.first_stream = static_cast<uint64_t>(first_prompt * c.rollout.n);
    const RolloutRequest req{static_cast<uint64_t>(steps_done_ * c.train_batch_size + first_prompt),
                             local_prompts_, c.rollout.n};
    samples_ = rollout(*policy_, tokenizer_, template_, *task_, req, g);
  }
  const size_t n = samples_.size();
  {  // reward
    StageTimer t(observer_, "reward", m.timing.reward);
    score_samples(*task_, samples_);
  }
  // The updates' mini- and micro-batches of every epoch. The recompute stages use epoch
  // 0's micro-batches, so the first update forward packs exactly the sequences the old
  // log-probs (values) came from: its ratio is exactly 1 (its values are the old ones).
  const UpdatePlan actor_plan =
      update_plan({c.actor.ppo_epochs, c.actor.ppo_mini_batch_size, c.actor.ppo_micro_batch_size,
                   c.actor.ppo_max_token_len});
  std::vector<std::vector<size_t>> chunks;
  for (const auto& mini : actor_plan[0])
    for (const auto& micro : mini) chunks.push_back(micro);
  old_logp_.assign(n, {});
  ref_logp_.assign(n, {});
  advantages_.assign(n, {});
  values_.assign(n, {});
  returns_.assign(n, {});
  std::vector<PackedSamples> packs;  // one per recompute micro-batch, shared by old and ref
  for (const auto& idx : chunks) packs.push_back(pack_samples(samples_, idx));
  {  // old_log_prob
    StageTimer t(observer_, "old_log_prob", m.timing.old_log_prob);
    std::vector<const RoutingTrace*> routes;
    for (const PackedSamples& p : packs) routes.push_back(&p.routes);
    balancer_->begin_step(routes);
    balancer_->begin_stage(routes, &m.balance["old_log_prob"]);
    for (size_t k = 0; k < chunks.size(); ++k) {
      const std::vector<size_t>& idx = chunks[k];
      const PackedSamples& p = packs[k];
      const ForwardResult& r = recompute(*policy_, p, balancer_->before_forward(k));
      balancer_->after_forward(k);
      m.logprob_gap = std::max(m.logprob_gap, max_logprob_gap(p, r.logp));
      scatter_positions(p, idx, r.logp, old_logp_);
    }
    balancer_->end_stage();
  }
  if (ref_) {  // ref
    StageTimer t(observer_, "ref", m.timing.ref);
    std::vector<const RoutingTrace*> routes;
    for (const PackedSamples& p : packs) routes.push_back(&p.routes);
    ref_balancer_->begin_step(routes);
    ref_balancer_->begin_stage(routes, &m.balance["ref"]);
    for (size_t k = 0; k < chunks.size(); ++k) {
      const ForwardResult& r = recompute(*ref_, packs[k], ref_balancer_->before_forward(k));
      ref_balancer_->after_forward(k);
      scatter_positions(packs[k], chunks[k], r.logp, ref_logp_);
    }
    ref_balancer_->end_stage();
  }
  UpdatePlan critic_plan;
  if (critic_) {  // values
    StageTimer t(observer_, "values", m.timing.values);
    critic_plan = update_plan({c.critic.ppo_epochs, c.critic.ppo_mini_batch_size,
                               c.critic.ppo_micro_batch_size, c.critic.ppo_max_token_len});
    std::vector<std::vector<size_t>> critic_chunks;
    for (const auto& mini : critic_plan[0])
      for (const auto& micro : mini) critic_chunks.push_back(micro);
    const bool same = critic_chunks == chunks;  // the same batching as the actor's
    for (size_t k = 0; k < critic_chunks.size(); ++k) {
      const PackedSamples p = same ? PackedSamples{} : pack_samples(samples_, critic_chunks[k]);
      const PackedSamples& packed = same ? packs[k] : p;
      scatter_positions(packed, critic_chunks[k],
                        critic_values(*critic_, packed, critic_replay_).values, values_);
    }
  }
  // Response positions of sample i: [P - 1, P + R - 1) of its sequence.
  auto response_positions = [&](size_t i) {
    const GeneratedSequence& s = samples_[i].sequence;
    const int64_t P = static_cast<int64_t>(s.prompt.size());
    return std::pair<int64_t, int64_t>{P - 1, P - 1 + static_cast<int64_t>(s.response.size())};
  };
  // Metric sums of this rank, made global and divided at the end of the step.
  double kl_tokens = 0, value_tokens = 0, critic_weight = 0, actor_weight = 0;
  {  // adv (with the KL-in-reward penalty)
    StageTimer t(observer_, "adv", m.timing.adv);
    std::vector<double> scores(n);
    std::vector<int64_t> groups(n);
    std::vector<std::vector<double>> token_kl(n);  // per response token (with a reference)
    for (size_t i = 0; i < n; ++i) {
      scores[i] = samples_[i].reward.reward;
      groups[i] = samples_[i].group;
      if (!ref_) continue;
      const auto [b, e] = response_positions(i);
      double kl = 0.0;
      const KlEstimator est = c.use_kl_in_reward ? c.kl_penalty : c.actor.loss.kl_loss_type;
      for (int64_t p = b; p < e; ++p) {
        token_kl[i].push_back(kl_penalty(est, old_logp_[i][p], ref_logp_[i][p]));
        kl += token_kl[i].back();
      }
      m.kl += kl;
      kl_tokens += static_cast<double>(e - b);
      // Outcome estimators: the summed KL comes off the sequence's score.
      if (c.use_kl_in_reward && !critic_) scores[i] -= c.kl_coef * kl;
    }
    if (critic_) {
      // PPO: per-token KL penalty and the score on the last token, GAE on the critic's V.
      std::vector<std::vector<double>> values(n);
      for (size_t i = 0; i < n; ++i) {
        const auto [b, e] = response_positions(i);
        values[i].assign(values_[i].begin() + b, values_[i].begin() + e);
      }
      const GaeTargets g = gae_targets(
          c.algorithm, scores, values,
          c.use_kl_in_reward ? token_kl : std::vector<std::vector<double>>{}, c.kl_coef, comm_);
      for (size_t i = 0; i < n; ++i) {
        advantages_[i].assign(old_logp_[i].size(), 0.0);
        returns_[i].assign(old_logp_[i].size(), 0.0);
        const auto [b, e] = response_positions(i);
        for (int64_t p = b; p < e; ++p) {
          advantages_[i][p] = g.advantages[i][p - b];
          returns_[i][p] = g.returns[i][p - b];
          m.values_mean += values_[i][p];
          m.returns_mean += returns_[i][p];
        }
        value_tokens += static_cast<double>(e - b);
      }
    } else {
      const std::vector<double> adv = group_advantages(c.algorithm, scores, groups);
      for (size_t i = 0; i < n; ++i) {
        advantages_[i].assign(old_logp_[i].size(), 0.0);
        const auto [b, e] = response_positions(i);
        for (int64_t p = b; p < e; ++p) advantages_[i][p] = adv[i];
      }
    }
  }
  if (critic_) {  // update_critic
    StageTimer t(observer_, "update_critic", m.timing.update_critic);
    for (size_t epoch = 0; epoch < critic_plan.size(); ++epoch) {
      for (size_t mini = 0; mini < critic_plan[epoch].size(); ++mini) {
        std::vector<CriticMicroBatch> mbs;
        for (const auto& idx : critic_plan[epoch][mini]) mbs.push_back(gather_critic(idx));
        const CriticUpdateMetrics u = update_critic(*critic_, *critic_optimizer_,
                                                    c.critic.cliprange_value, critic_replay_, mbs);
        if (epoch == 0 && mini == 0) m.first_value_max_dev = u.values_max_dev;
        if (u.skipped) {
          ++m.skipped;
          continue;
        }
        const double w = static_cast<double>(u.tokens);
        critic_weight += w;
        m.vf_loss += w * u.vf_loss;
        m.vf_clipfrac += w * u.vf_clipfrac;
        m.critic_grad_norm = u.grad_norm;
      }
    }
  }
  {  // update_actor
    StageTimer t(observer_, "update_actor", m.timing.update_actor);
    for (size_t epoch = 0; epoch < actor_plan.size(); ++epoch) {
      for (size_t mini = 0; mini < actor_plan[epoch].size(); ++mini) {
        std::vector<ActorMicroBatch> mbs;
        for (const auto& idx : actor_plan[epoch][mini]) mbs.push_back(gather(idx));
        std::vector<const RoutingTrace*> routes;
        for (const ActorMicroBatch& mb : mbs) routes.push_back(&mb.packed.routes);
        balancer_->begin_stage(routes, &m.balance["update_actor"]);
        const ActorUpdateMetrics u =
            update_actor(*policy_, *optimizer_, c.actor.loss, mbs, balancer_.get());
        balancer_->end_stage();
        if (epoch == 0 && mini == 0) m.first_ratio_max_dev = std::abs(u.ratio_max - 1.0);
        if (u.skipped) {
          ++m.skipped;
          continue;
        }
        const double w = static_cast<double>(u.tokens);
        actor_weight += w;
        m.entropy += w * u.entropy;
        m.pg_loss += w * u.pg_loss;
        m.pg_clipfrac += w * u.pg_clipfrac;
        m.pg_clipfrac_lower += w * u.pg_clipfrac_lower;
        m.ppo_kl += w * u.ppo_kl;
        m.ratio_max = std::max(m.ratio_max, u.ratio_max);
        m.grad_norm = u.grad_norm;
        m.lr = u.lr;
      }
    }
  }

  // Rollout statistics.
  double tokens = 0;
  const ModelConfig& mc = c.model;
  m.expert_load.assign(static_cast<size_t>(mc.n_moe_layers()),
                       std::vector<int64_t>(static_cast<size_t>(mc.n_experts), 0));
  for (const RolloutSample& s : samples_) {
    m.reward_mean += s.reward.reward;
    m.accuracy += s.reward.correct;
    m.well_formed += s.reward.well_formed;
    m.response_length += static_cast<double>(s.sequence.response.size());
    tokens += static_cast<double>(s.sequence.routes.tokens());
    for (int64_t l = 0; l < mc.n_moe_layers(); ++l) {
      const std::vector<int64_t> load =
          expert_load(s.sequence.routes, l, 0, s.sequence.routes.tokens());
      for (size_t e = 0; e < load.size(); ++e) m.expert_load[l][e] += load[e];
    }
  }
  // Global sums and maxima over the ranks, then the means.
  double samples = static_cast<double>(n);
  std::vector<double*> sums = {
      &m.kl,          &kl_tokens,           &m.values_mean,     &m.returns_mean, &value_tokens,
      &m.vf_loss,     &m.vf_clipfrac,       &critic_weight,     &m.entropy,      &m.pg_loss,
      &m.pg_clipfrac, &m.pg_clipfrac_lower, &m.ppo_kl,          &actor_weight,   &m.reward_mean,
      &m.accuracy,    &m.well_formed,       &m.response_length, &samples,        &tokens};
  std::vector<double*> maxima = {&m.logprob_gap, &m.ratio_max, &m.first_ratio_max_dev,
                                 &m.first_value_max_dev};
  if (comm_ != nullptr) {
    std::vector<double> buf;
    for (double* x : sums) buf.push_back(*x);
    for (const auto& load : m.expert_load)
      for (int64_t v : load) buf.push_back(static_cast<double>(v));
    sum_over_ranks(comm_, buf);
    size_t k = 0;
    for (double* x : sums) *x = buf[k++];
    for (auto& load : m.expert_load)
      for (int64_t& v : load) v = static_cast<int64_t>(buf[k++]);
    buf.clear();
    for (double* x : maxima) buf.push_back(*x);
    max_over_ranks(comm_, buf);
    k = 0;
    for (double* x : maxima) *x = buf[k++];
  }
  auto divide = [](std::initializer_list<double*> xs, double by) {
    if (by > 0)
      for (double* x : xs) *x /= by;
  };
  divide({&m.kl}, kl_tokens);
  divide({&m.values_mean, &m.returns_mean}, value_tokens);
  divide({&m.vf_loss, &m.vf_clipfrac}, critic_weight);
  divide({&m.entropy, &m.pg_loss, &m.pg_clipfrac, &m.pg_clipfrac_lower, &m.ppo_kl}, actor_weight);
  divide({&m.reward_mean, &m.accuracy, &m.well_formed, &m.response_length}, samples);
  for (const auto& load : m.expert_load) m.max_vio = std::max(m.max_vio, max_violation(load));
  skipped_total_ += m.skipped;
  m.skipped_total = skipped_total_;
  ++steps_done_;
  m.timing.step = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_step).count();
  m.tokens_per_second = tokens / std::max(m.timing.step, 1e-9);
  return m;
}

TaskEvalResult RlTrainer::evaluate() {
  GenerationConfig g;
  g.sampling.temperature = 0.0;
  g.max_new_tokens = config_.rollout.response_length;
  g.batch_slots = config_.rollout.batch_slots;
  const std::vector<TaskExample> all = first_held_out(*task_, config_.trainer.eval_examples);
  if (comm_ == nullptr) return evaluate_task(*policy_, tokenizer_, template_, *task_, all, g);
  // This rank's contiguous share of the examples, then the global figures.
  const size_t begin = all.size() * static_cast<size_t>(rank_) / static_cast<size_t>(world_);
  const size_t end = all.size() * static_cast<size_t>(rank_ + 1) / static_cast<size_t>(world_);
  g.first_stream = begin;
  TaskEvalResult r = evaluate_task(
      *policy_, tokenizer_, template_, *task_,
      {all.begin() + static_cast<int64_t>(begin), all.begin() + static_cast<int64_t>(end)}, g);
  const double n = static_cast<double>(r.examples);
  std::vector<double> sums = {n, r.accuracy * n, r.mean_reward * n, r.well_formed * n,
                              r.mean_response_tokens * n};
  sum_over_ranks(comm_, sums);
  r.examples = static_cast<int64_t>(sums[0]);
  if (sums[0] > 0) {
    r.accuracy = sums[1] / sums[0];
    r.mean_reward = sums[2] / sums[0];
    r.well_formed = sums[3] / sums[0];
    r.mean_response_tokens = sums[4] / sums[0];
  }
  return r;
}

RoutingTrace RlTrainer::gather_rollout_traces() {
  std::vector<GeneratedSequence> seqs;
  for (const RolloutSample& r : samples_) seqs.push_back(r.sequence);
  RoutingTrace local = pack_traces(seqs);
  if (comm_ == nullptr) return local;
  std::vector<int64_t> lengths;
  for (size_t s = 0; s + 1 < local.seq_offsets.size(); ++s)
    lengths.push_back(local.seq_offsets[s + 1] - local.seq_offsets[s]);
  const std::vector<int32_t> ids(local.ids.begin(), local.ids.end());
  const std::vector<int64_t> all_lengths = gather_to_root(comm_, lengths);
  const std::vector<int32_t> all_ids = gather_to_root(comm_, ids);
  if (rank_ != 0) return {};
  RoutingTrace t = local;
  t.ids.assign(all_ids.begin(), all_ids.end());
  t.seq_offsets = {0};
  for (int64_t len : all_lengths) t.seq_offsets.push_back(t.seq_offsets.back() + len);
  return t;
}

void RlTrainer::save(const std::string& dir) {
  CheckpointInfo info;
  info.step = steps_done_;
  info.run = {{"kind", "rl"},
              {"config_origin", config_.origin},
              {"seed", config_.trainer.seed},
              {"tokenizer", config_.tokenizer},
              {"template", config_.prompt_template},
              {"task", config_.task.name},
              {"init_weights", init_weights_},
              {"skipped_total", skipped_total_},
              {"ranks", world_}};
  if (critic_) info.run["critic"] = kCriticDir;
  save_checkpoint(dir, *policy_, *optimizer_, info);
  if (critic_) {  // inside the published directory (the policy's save replaces the whole of it)
    CheckpointInfo critic_info;
    critic_info.step = steps_done_;
    critic_info.run = {{"kind", "rl_critic"}, {"config_origin", config_.origin}};
    save_checkpoint(dir + "/" + kCriticDir, *critic_, *critic_optimizer_, critic_info);
  }
}

void RlTrainer::resume(const std::string& dir) {
  const CheckpointInfo info = load_checkpoint(dir, *policy_, *optimizer_);
  FM_CHECK(info.run.value("kind", std::string()) == "rl",
           "checkpoint {}: not an RL checkpoint (run.kind is '{}')", dir,
           info.run.value("kind", std::string()));
  steps_done_ = info.step;
  skipped_total_ = info.run.value("skipped_total", int64_t{0});
  init_weights_ = info.run.value("init_weights", std::string());
  if (ref_) {
    FM_CHECK(!init_weights_.empty(),
             "checkpoint {}: run.init_weights is empty, so the reference policy cannot be "
             "restored",
             dir);
    load_weights(init_weights_, *ref_);
  }
  if (critic_) {
    const std::string critic_dir = dir + "/" + kCriticDir;
    FM_CHECK(std::filesystem::is_directory(critic_dir),
             "checkpoint {}: no {}/ directory, so the critic of this PPO run (adv_estimator gae) "
             "cannot be restored",
             dir, kCriticDir);
    const CheckpointInfo c = load_checkpoint(critic_dir, *critic_, *critic_optimizer_);
    FM_CHECK(c.run.value("kind", std::string()) == "rl_critic" && c.step == info.step,
             "checkpoint {}: run.kind '{}' at step {} is not the critic of step {}", critic_dir,
             c.run.value("kind", std::string()), c.step, info.step);
  }
}

// Per stage: mean max/mean rank load before (every token at home) and after the plans, the
// mean ratio to the lower bound, planner milliseconds, bytes moved per path, and the
// per-micro-step series (mean over MoE layers) for the plot.
static nlohmann::json balance_json(const std::map<std::string, StageBalance>& balance) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [stage, b] : balance) {
    const double n = b.plans > 0 ? static_cast<double>(b.plans) : 1.0;
    out[stage] = {{"planner", b.planner},
                  {"imbalance_before", b.plans > 0 ? b.before / n : 1.0},
                  {"imbalance_after", b.plans > 0 ? b.after / n : 1.0},
                  {"ratio_to_bound", b.plans > 0 ? b.ratio_to_bound / n : 1.0},
                  {"planner_ms", b.planner_s * 1e3},
                  {"bytes_direct", b.bytes_direct},
                  {"bytes_cpu", b.bytes_cpu},
                  {"micro_before", b.micro_before},
                  {"micro_after", b.micro_after}};
  }
  return out;
}

nlohmann::json rl_metrics_json(const RlStepMetrics& m) {
  const StageTimes& t = m.timing;
  return {{"kind", "rl_step"},
          {"step", m.step},
          {"reward_mean", m.reward_mean},
          {"accuracy", m.accuracy},
          {"well_formed", m.well_formed},
          {"response_length", m.response_length},
          {"kl", m.kl},
          {"entropy", m.entropy},
          {"pg_loss", m.pg_loss},
          {"pg_clipfrac", m.pg_clipfrac},
          {"pg_clipfrac_lower", m.pg_clipfrac_lower},
          {"ppo_kl", m.ppo_kl},
          {"ratio_max", m.ratio_max},
          {"first_ratio_max_dev", m.first_ratio_max_dev},
          {"logprob_gap", m.logprob_gap},
          {"grad_norm", m.grad_norm},
          {"lr", m.lr},
          {"vf_loss", m.vf_loss},
          {"vf_clipfrac", m.vf_clipfrac},
          {"values_mean", m.values_mean},
          {"returns_mean", m.returns_mean},
          {"critic_grad_norm", m.critic_grad_norm},
          {"first_value_max_dev", m.first_value_max_dev},
          {"skipped", m.skipped},
          {"skipped_total", m.skipped_total},
          {"max_vio", m.max_vio},
          {"tokens_per_second", m.tokens_per_second},
          {"timing_s",
           {{"gen", t.gen},
            {"reward", t.reward},
            {"old_log_prob", t.old_log_prob},
            {"ref", t.ref},
            {"values", t.values},
            {"adv", t.adv},
            {"update_critic", t.update_critic},
            {"update_actor", t.update_actor},
            {"step", t.step}}},
          {"expert_load", m.expert_load},
          {"balance", balance_json(m.balance)}};
}

}  // namespace fm
