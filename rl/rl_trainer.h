// RlTrainer: one RL step = the stages users know from veRL, each timed:
//   gen           rollout: train_batch_size prompts x rollout.n samples, with routing traces
//   reward        the task's reward per sample (minus kl_coef * KL to the reference when
//                 use_kl_in_reward)
//   old_log_prob  recompute of the rollout policy's log-probs, routing replayed
//   ref           the reference policy's log-probs (frozen initial weights), when a KL
//                 term is on
//   values        (PPO, adv_estimator gae) the critic's V at every response position
//   adv           advantages: GRPO, Dr.GRPO, RLOO give the sequence's advantage to every
//                 response token; gae (PPO) puts the score on the last response token and
//                 the KL penalty on each token, and takes GAE advantages (whitened over the
//                 batch) and returns from the critic's values (rl/critic_update.h)
//   update_critic (PPO) critic.ppo_epochs x mini-batches x micro-batches of the clipped
//                 value loss, one critic AdamW step per mini-batch; before update_actor, as
//                 veRL
//   update_actor  ppo_epochs x mini-batches (ppo_mini_batch_size prompts, shuffled per
//                 epoch) x micro-batches, routing replayed in every forward
// The actor's and the critic's epoch e shuffle the prompts alike, so with the same batch
// sizes they see the same mini- and micro-batches. The recompute stages (old_log_prob, ref,
// values) run on epoch 0's micro-batches, so the first update forward of each model packs
// exactly the sequences its recompute came from: ratio exactly 1, values exactly the old ones.
// Everything random is a function of (trainer.seed, step), so a resumed run repeats an
// uninterrupted one exactly on the CPU.
//
// Distributed (a communicator of W ranks): the policy, the reference and the critic are
// expert-parallel over the ranks (model/expert_parallel.h; every forward, backward,
// generation step, checkpoint save and load is collective). Rank r takes prompts
// [r * B/W, (r + 1) * B/W) of the step's B = train_batch_size with all their samples, so
// GRPO / RLOO groups stay whole on one rank; its samples draw the random streams of their
// global index, as on one rank. Each rank splits its share into mini-batches of
// ppo_mini_batch_size / W prompts (the same shuffle) and micro-batches of
// ppo_micro_batch_size sequences (veRL's per-GPU micro-batch); with ppo_max_token_len every
// rank cuts the same number of micro-batches (the most any rank needs). The loss
// normalizer, the GAE whitening, the gradient norm and every metric are global; a
// non-finite forward on any rank skips the update on every rank. Results at W ranks match
// W = 1 up to float rounding of the expert-parallel layer (the same seeds); the same W and
// seed repeat exactly. A PPO checkpoint keeps the critic (weights, AdamW
// state, balancing state) in its subdirectory critic/.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "model/moe_transformer.h"
#include "model/optimizer.h"
#include "rl/actor_update.h"
#include "rl/critic_update.h"
#include "rl/micro_step_balancer.h"
#include "rl/rl_config.h"
#include "rl/rollout.h"
#include "rl/task_eval.h"

namespace fm {

struct StageTimes {
  double gen = 0, reward = 0, old_log_prob = 0, ref = 0, values = 0, adv = 0, update_critic = 0,
         update_actor = 0, step = 0;
};

struct RlStepMetrics {
  int64_t step = 0;
  double reward_mean = 0, accuracy = 0, well_formed = 0, response_length = 0;
  double kl = 0;  // mean KL(policy || ref) estimate over response tokens (0 without a ref)
  double entropy = 0, pg_loss = 0, pg_clipfrac = 0, pg_clipfrac_lower = 0, ppo_kl = 0;
  double ratio_max = 0;            // over all update micro-batches
  double first_ratio_max_dev = 0;  // |ratio - 1| max on the first mini-batch of epoch 1
  double logprob_gap = 0;          // max |recomputed - rollout| log-prob (sampler mismatch)
  double grad_norm = 0, lr = 0;
  // PPO (gae) only: the critic's clipped value loss and clip fraction (token-weighted over
  // its updates), mean V and mean return on response tokens (values stage), the grad norm of
  // its last step, and max |V - old V| on its first mini-batch of epoch 1 (exactly 0).
  double vf_loss = 0, vf_clipfrac = 0, values_mean = 0, returns_mean = 0, critic_grad_norm = 0;
  double first_value_max_dev = 0;
  int64_t skipped = 0;        // optimizer steps (actor and critic) skipped this RL step
  int64_t skipped_total = 0;  // over the run
  double tokens_per_second = 0;
  StageTimes timing;
  std::vector<std::vector<int64_t>> expert_load;  // [MoE layer][expert], this rollout
  double max_vio = 0;                             // over layers, this rollout
  // The balancer's figures per stage ("old_log_prob", "ref", "update_actor";
  // rl/micro_step_balancer.h).
  std::map<std::string, StageBalance> balance;
};

class RlTrainer {
 public:
  // comm: the ranks of a distributed run (null: one rank); must outlive the trainer.
  // policy_transfer: the CPU transfer group the in-process ranks share for the policy's
  // replica slots (make_cpu_transfer_group; null: slots filled through the communicator).
  RlTrainer(RlRunConfig config, Backend& backend, Communicator* comm = nullptr,
            CpuTransferGroup* policy_transfer = nullptr);

  // Policy and reference start from these weights (a full or weights-only checkpoint);
  // a critic with init: actor takes its trunk from them too.
  void load_initial_weights(const std::string& checkpoint_dir);
  RlStepMetrics step();
  // Called as each stage of step() starts, with the stage's name as in StageTimes (the
  // CLI's progress line).
  using StageObserver = std::function<void(const char* stage)>;
  void set_stage_observer(StageObserver observer) { observer_ = std::move(observer); }
  // Held-out evaluation (collective): each rank generates its share of the examples; the
  // result's figures are global, its samples this rank's.
  TaskEvalResult evaluate();
  int rank() const { return rank_; }
  int world_size() const { return world_; }
  // The routing traces of the last rollout, every rank's samples in global order, on rank 0
  // (collective; other ranks get an empty trace).
  RoutingTrace gather_rollout_traces();
  int64_t steps_done() const { return steps_done_; }
  const RlRunConfig& config() const { return config_; }
  MoeTransformer& policy() { return *policy_; }
  MoeTransformer* critic() { return critic_.get(); }  // null without a critic
  // This rank's samples of the last rollout.
  const std::vector<RolloutSample>& last_rollout() const { return samples_; }
  const Tokenizer& tokenizer() const { return tokenizer_; }

  void save(const std::string& dir);
  void resume(const std::string& dir);

 private:
  // How an update splits the step's samples: per epoch, mini-batches of mini_batch_size
  // prompts (prompt order shuffled per epoch), each cut into micro-batches of
  // micro_batch_size sequences or up to max_token_len tokens.
  struct UpdateBatching {
    int64_t epochs = 1, mini_batch_size = 1, micro_batch_size = 1, max_token_len = 0;
  };
  // [epoch][mini-batch][micro-batch] -> sample indices.
  using UpdatePlan = std::vector<std::vector<std::vector<std::vector<size_t>>>>;
  UpdatePlan update_plan(const UpdateBatching& b) const;
  // Mini-batches of one epoch: sample indices of mini_batch_size shuffled prompts.
  std::vector<std::vector<size_t>> mini_batches(int64_t epoch, int64_t mini_batch_size) const;
  // A mini-batch's micro-batches.
  std::vector<std::vector<size_t>> micro_batches(const std::vector<size_t>& order,
                                                 const UpdateBatching& b) const;
  ActorMicroBatch gather(const std::vector<size_t>& indices) const;
  CriticMicroBatch gather_critic(const std::vector<size_t>& indices) const;
  // The critic's initial weights (critic.init), after the policy's.
  void init_critic();

  // Equal micro-batch counts on every rank (ppo_max_token_len may cut a different number).
  void equalize_micro_batches(std::vector<std::vector<size_t>>& micro) const;

  RlRunConfig config_;
  Backend& backend_;
  Communicator* comm_ = nullptr;
  int world_ = 1, rank_ = 0;
  int64_t local_prompts_ = 0;  // train_batch_size / world
  Tokenizer tokenizer_;
  PromptTemplate template_;
  std::unique_ptr<Task> task_;
  std::unique_ptr<MoeTransformer> policy_, ref_, critic_;
  std::unique_ptr<AdamW> optimizer_, critic_optimizer_;
  std::unique_ptr<MicroStepBalancer> balancer_;      // the policy's micro-step plans
  std::unique_ptr<MicroStepBalancer> ref_balancer_;  // the reference's (null without one)
  bool critic_replay_ = false;                       // the critic replays the rollout's routing
  std::string init_weights_;
  int64_t steps_done_ = 0;
  StageObserver observer_;
  int64_t skipped_total_ = 0;
  // The current step's per-sample data (positions of each sample's packed sequence).
  std::vector<RolloutSample> samples_;
  std::vector<std::vector<double>> old_logp_, ref_logp_, advantages_, values_, returns_;
};

nlohmann::json rl_metrics_json(const RlStepMetrics& m);

// SIGINT requests a clean stop: the loop finishes its step, checkpoints and exits.
void install_stop_on_sigint();
bool stop_requested();
void request_stop();  // what the handler does (tests call it directly)

}  // namespace fm
