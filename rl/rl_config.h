// RlRunConfig: one RL run, read from YAML in one place. Section and knob names
// follow veRL's where one exists:
//   model:      preset, file or mapping (the policy)
//   init:       checkpoint (weights to start from) | sft (an SFT run config for the warm
//               start when no checkpoint is given) and sft_steps (stop it early: its own
//               schedule, cut short; 0 = all its steps)
//   tokenizer, template, task
//   data:       train_batch_size (prompts per step)
//   rollout:    n, temperature, top_p, top_k, response_length, batch_slots
//   algorithm:  adv_estimator, norm_adv_by_std_in_grpo, gamma, lam, use_kl_in_reward,
//               kl_penalty, kl_coef
//   actor:      optim (optimizer mapping), ppo_epochs, ppo_mini_batch_size (prompts),
//               ppo_micro_batch_size (sequences), ppo_max_token_len (token budget per
//               micro-batch; 0 = count), and the policy-loss keys (rl/policy_loss.h)
//   critic:     (adv_estimator gae only, and then required) model (head: value), init,
//               optim, ppo_epochs, ppo_mini_batch_size, ppo_micro_batch_size,
//               ppo_max_token_len (the three default to the actor's), cliprange_value.
//               init: random (the default: the critic's own init from trainer.seed + 1),
//               actor (veRL's default: the trunk copied from the actor's initial weights, a
//               fresh value head; needs the same trunk shape) or a value-model checkpoint.
//               The critic replays the rollout's routing when its MoE layout (MoE layers,
//               experts, top_k) is the actor's, and routes by its own router otherwise.
//               Any size, MoE or dense (first_k_dense: n_layers makes every layer dense).
//   trainer:    seed, total_steps, eval_every, eval_examples, checkpoint_every, run_dir,
//               save_traces, ranks, comm_timeout_s
//   balancer:   planner (none | step_ema | step_oracle | foresight), replica_slots (S per
//               rank and MoE layer), nodes (W = nodes x GPUs per node), ema_decay
//               (step_ema), transfer (split | direct_only | cpu_only: the replica-fill
//               paths); plans the micro-steps of old_log_prob, ref and update_actor (the
//               critic's stages run with every token at home)
//               (rl/micro_step_balancer.h)
#pragma once

#include <cstdint>
#include <string>

#include "model/config.h"
#include "model/optimizer.h"
#include "rl/advantages.h"
#include "rl/micro_step_balancer.h"
#include "rl/policy_loss.h"
#include "rl/tasks/task_config.h"

namespace fm {

struct RolloutConfig {
  int64_t n = 8;
  double temperature = 1.0, top_p = 1.0;
  int64_t top_k = 0;
  int64_t response_length = 16;  // max new tokens
  int64_t batch_slots = 256;
};

struct ActorConfig {
  OptimizerConfig optim;
  PolicyLossConfig loss;
  int64_t ppo_epochs = 1;
  int64_t ppo_mini_batch_size = 0;    // prompts per optimizer step; 0 = train_batch_size
  int64_t ppo_micro_batch_size = 16;  // sequences per micro-batch
  int64_t ppo_max_token_len = 0;      // > 0: micro-batches filled up to this many tokens
};

struct CriticConfig {
  ModelConfig model;            // head: value
  std::string init = "random";  // random | actor | a checkpoint directory
  OptimizerConfig optim;
  int64_t ppo_epochs = 1;
  int64_t ppo_mini_batch_size = 0;   // prompts per critic optimizer step (the actor's)
  int64_t ppo_micro_batch_size = 0;  // sequences per micro-batch (the actor's)
  int64_t ppo_max_token_len = 0;     // > 0: token-budget micro-batches (the actor's)
  double cliprange_value = 0.5;
};

struct RlTrainerConfig {
  uint64_t seed = 1;
  int64_t total_steps = 20;
  int64_t eval_every = 10;  // 0: only at the start and the end
  int64_t eval_examples = 200;
  int64_t checkpoint_every = 0;  // 0: only at the end
  std::string run_dir = "runs/rl";
  bool save_traces = true;  // routing traces of the last step's rollout
  // Ranks of the run (expert-parallel for the routed experts, data-parallel otherwise):
  // in-process threads of one process; under `foremoe launch` the launcher's WORLD_SIZE
  // decides and this must be 1 or equal it.
  int64_t ranks = 1;
  double comm_timeout_s = 300.0;  // every collective's bound
  // "f32", or "bf16": the policy, reference and critic compute in mixed precision
  // (MoeTransformer::set_compute_dtype) with f32 master weights, on any number of ranks.
  std::string precision = "f32";
  DType compute_dtype() const { return precision == "bf16" ? DType::bf16 : DType::f32; }
};

struct RlRunConfig {
  ModelConfig model;
  std::string init_checkpoint;  // start from these weights
  std::string init_sft;         // else run this SFT config first (the warm start)
  int64_t init_sft_steps = 0;   // > 0: stop the warm start after this many of its steps
  std::string tokenizer = "tasks";
  std::string prompt_template = "plain";
  TaskConfig task;
  int64_t train_batch_size = 16;
  RolloutConfig rollout;
  AdvantageConfig algorithm;
  bool use_kl_in_reward = false;
  KlEstimator kl_penalty = KlEstimator::k1;
  double kl_coef = 0.001;
  ActorConfig actor;
  bool has_critic = false;
  CriticConfig critic;
  RlTrainerConfig trainer;
  BalancerConfig balancer;
  std::string origin;
  std::string text;  // the YAML it was read from (saved in the run directory)

  bool needs_ref() const { return actor.loss.use_kl_loss || use_kl_in_reward; }
  // The critic's forwards replay the rollout's routing: its MoE layout is the actor's.
  bool critic_replays_routing() const;
  // Why `ranks` ranks cannot run this config (empty when they can): the prompts, the
  // mini-batches and the experts are split evenly over the ranks.
  std::string rank_count_problem(int64_t ranks) const;
  static RlRunConfig load(const std::string& name_or_path);
  static RlRunConfig parse(const std::string& yaml_text, const std::string& origin);
};

}  // namespace fm
