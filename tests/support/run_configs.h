// Inline run configs for the training tests.
#pragma once

#include <string>

#include "rl/lm_trainer.h"
#include "rl/rl_config.h"

namespace fm::testing {

// The tiny preset on the synthetic task; `extra_model` is spliced into the model mapping.
inline LmRunConfig tiny_run(int64_t steps, const std::string& balance_yaml,
                            const std::string& run_dir = "unused", int64_t micro_batches = 2) {
  const std::string yaml = R"(model:
  name: tiny-test
  vocab_size: 64
  hidden: 64
  n_layers: 3
  n_heads: 4
  n_kv_heads: 2
  head_dim: 16
  qk_norm: true
  n_experts: 8
  top_k: 2
  moe_ffn: 32
  n_shared_experts: 1
  shared_ffn: 32
  first_k_dense: 1
  dense_ffn: 64
  max_seq_len: 64
  router_balance:
)" + balance_yaml + R"(
optimizer:
  lr: 0.003
  schedule: linear_warmup
  warmup_steps: 5
  weight_decay: 0.01
  grad_clip: 1.0
train:
  seed: 7
  steps: )" + std::to_string(steps) +
                           R"(
  micro_batches: )" + std::to_string(micro_batches) +
                           R"(
  sequences_per_micro_batch: 4
  seq_len: 16
  run_dir: )" + run_dir + R"(
task:
  symbols: 16
  n_maps: 2
)";
  return LmRunConfig::parse(yaml, "<test run config>");
}

// tiny_run's model and optimizer on text: `text_file` (e.g. synthetic_corpus) split 10% held
// out, a 320-piece tokenizer trained into `run_dir`, held-out set of eval_tokens tokens.
inline std::string text_run_yaml(int64_t steps, const std::string& balance_yaml,
                                 const std::string& text_file, const std::string& run_dir,
                                 int64_t eval_tokens = 1024) {
  return R"(model:
  name: tiny-text
  vocab_size: 64
  hidden: 32
  n_layers: 2
  n_heads: 2
  n_kv_heads: 1
  head_dim: 16
  n_experts: 8
  top_k: 2
  moe_ffn: 32
  first_k_dense: 0
  max_seq_len: 64
  router_balance:
)" + balance_yaml +
         R"(
optimizer:
  lr: 0.003
  schedule: linear_warmup
  warmup_steps: 5
train:
  seed: 7
  steps: )" +
         std::to_string(steps) + R"(
  micro_batches: 2
  sequences_per_micro_batch: 4
  seq_len: 16
  eval_tokens: )" +
         std::to_string(eval_tokens) + R"(
  eval_sequences: 4
  run_dir: )" +
         run_dir + R"(
data:
  files: [)" +
         text_file + R"(]
  valid_fraction: 0.1
  block_lines: 10
  vocab_size: 320
)";
}
inline LmRunConfig text_run(int64_t steps, const std::string& balance_yaml,
                            const std::string& text_file, const std::string& run_dir,
                            int64_t eval_tokens = 1024) {
  return LmRunConfig::parse(text_run_yaml(steps, balance_yaml, text_file, run_dir, eval_tokens),
                            "<test text run config>");
}

// RL on the count task from random weights: the tiny preset, strings of 1-3 letters over a
// 2-letter alphabet, so the answer is one digit 0-3. A well-formed (digit) answer earns 0.5
// and a right one 1, so a random policy scores now and then and there is signal from the
// first step. 8 prompts x 8 samples, responses of at most 2 tokens, 2 actor mini-batches.
// `algorithm` is the algorithm mapping's body, `actor_extra` is spliced into the actor
// mapping; `critic_yaml` (a whole `critic:` section) goes with adv_estimator gae.
inline std::string count_rl_yaml(int64_t steps,
                                 const std::string& algorithm = "  adv_estimator: grpo\n",
                                 const std::string& actor_extra = "",
                                 const std::string& critic_yaml = "") {
  return R"(model: tiny
tokenizer: tasks
task:
  name: count
  seed: 2
  min_len: 1
  max_len: 3
  alphabet: 2
  held_out: 4
  format_reward: 0.5
data:
  train_batch_size: 8
rollout:
  n: 8
  response_length: 2
algorithm:
)" + algorithm +
         R"(actor:
  optim:
    lr: 0.003
    weight_decay: 0.0
  ppo_mini_batch_size: 4
  ppo_micro_batch_size: 16
)" + actor_extra +
         critic_yaml + R"(trainer:
  seed: 3
  total_steps: )" +
         std::to_string(steps) + R"(
  eval_examples: 4
)";
}

// PPO (adv_estimator gae) on the count task above with the tiny_critic preset as the critic
// (the actor's MoE layout, so it replays the rollout's routing); `critic_extra` is spliced
// into the critic mapping, `algorithm_extra` into the algorithm mapping.
inline std::string ppo_count_yaml(int64_t steps, const std::string& algorithm_extra = "",
                                  const std::string& actor_extra = "",
                                  const std::string& critic_extra = "") {
  return count_rl_yaml(steps, "  adv_estimator: gae\n" + algorithm_extra, actor_extra,
                       R"(critic:
  model: tiny_critic
  optim:
    lr: 0.003
    weight_decay: 0.0
  cliprange_value: 0.5
)" + critic_extra);
}

inline RlRunConfig ppo_count_run(int64_t steps, const std::string& algorithm_extra = "",
                                 const std::string& actor_extra = "",
                                 const std::string& critic_extra = "") {
  return RlRunConfig::parse(ppo_count_yaml(steps, algorithm_extra, actor_extra, critic_extra),
                            "<ppo count>");
}

// The tiny preset on one-digit addition ("3+4=" -> "7"): 100 distinct prompts, 30 held out.
inline std::string sft_add_yaml(int64_t steps, const std::string& extra = "") {
  return R"(model: tiny
tokenizer: tasks
template: plain
task:
  name: add
  seed: 3
  min_digits: 1
  max_digits: 1
  held_out: 30
optimizer:
  lr: 0.003
  schedule: linear_warmup
  warmup_steps: 10
  weight_decay: 0.01
sft:
  seed: 5
  steps: )" +
         std::to_string(steps) + R"(
  sequences_per_micro_batch: 16
  micro_batches: 2
  eval_examples: 30
  max_new_tokens: 4
)" + extra;
}

}  // namespace fm::testing
