// LmTrainer: next-token training of the MoE transformer on the synthetic task
// (the CPU demo, and the loop the SFT warm start builds on). One step =
// micro_batches forward/backward passes with gradient accumulation, then one
// AdamW step and the router-balancing state update. Checkpoints hold
// everything needed to continue bit-identically on the CPU.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/rng.h"
#include "model/checkpoint.h"
#include "model/moe_transformer.h"
#include "model/optimizer.h"
#include "rl/synthetic_task.h"

namespace fm {

class ConfigNode;

struct LmTrainConfig {
  uint64_t seed = 1;
  int64_t steps = 100;
  int64_t micro_batches = 1;
  int64_t sequences_per_micro_batch = 8;
  int64_t seq_len = 32;
  int64_t log_every = 10;
  int64_t checkpoint_every = 0;  // 0: only at the end
  std::string run_dir = "runs/lm";
  static LmTrainConfig from_yaml(const ConfigNode& node);
};

// A whole run: `model:` (preset name, file or mapping), `optimizer:`, `train:`, `task:`.
struct LmRunConfig {
  ModelConfig model;
  OptimizerConfig optimizer;
  LmTrainConfig train;
  SyntheticTaskConfig task;
  std::string origin;  // where it was read from
  static LmRunConfig load(const std::string& name_or_path);
  static LmRunConfig parse(const std::string& yaml_text, const std::string& origin);
};

struct LmStepMetrics {
  int64_t step = 0;   // 1-based index of the step just taken
  double loss = 0.0;  // lm + balance, mean over micro-batches
  double lm_loss = 0.0;
  double balance_loss = 0.0;
  double grad_norm = 0.0;
  double lr = 0.0;
  bool skipped = false;
  int64_t skipped_total = 0;
  std::vector<double> max_vio;  // per MoE layer, over the step's micro-batches
  double tokens_per_second = 0.0;
};

class LmTrainer {
 public:
  LmTrainer(LmRunConfig config, Backend& backend);

  LmStepMetrics step();
  int64_t steps_done() const { return steps_done_; }
  const LmRunConfig& config() const { return config_; }
  MoeTransformer& model() { return *model_; }
  AdamW& optimizer() { return *optimizer_; }
  const SyntheticNextTokenTask& task() const { return task_; }

  void save(const std::string& dir);
  void resume(const std::string& dir);

 private:
  LmRunConfig config_;
  std::unique_ptr<MoeTransformer> model_;
  std::unique_ptr<AdamW> optimizer_;
  SyntheticNextTokenTask task_;
  Rng data_rng_;
  int64_t steps_done_ = 0;
};

nlohmann::json step_metrics_json(const LmStepMetrics& m);

}  // namespace fm
