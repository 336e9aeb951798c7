// Inline run configs for the training tests.
#pragma once

#include <string>

#include "rl/lm_trainer.h"

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

}  // namespace fm::testing
