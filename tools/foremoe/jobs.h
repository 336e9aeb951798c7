// Jobs shared by several subcommands (e.g. the RL run starts with the SFT job).
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "rl/sft_trainer.h"

namespace fm::cli {

// Runs the SFT warm start to its last step (printing progress and evaluations) on `device`
// (engine/backend.h make_backend), returns the final checkpoint directory.
std::string run_sft_job(const SftRunConfig& config, const std::string& resume = "",
                        const std::string& device = "cpu");

}  // namespace fm::cli

namespace fm::cli {

struct RlArgs {
  std::string config;
  int64_t steps = -1;
  std::string run_dir;
  std::string resume;
  std::string init_checkpoint;
  int64_t ranks = 0;           // > 0: overrides trainer.ranks
  std::string device = "cpu";  // make_backend's name: cpu, cuda, cuda:N
};

// The RL job: SFT warm start when no checkpoint is given, then the RL loop.
int run_rl_job(const RlArgs& args);

struct LmJobArgs {
  std::string command = "train";  // for messages: train | pretrain
  std::string config;
  int64_t steps = -1;
  std::string run_dir;
  std::string resume;
  int threads = 0;
  bool require_text = false;  // pretrain: the config must have `data:`
  std::string device = "cpu";
};

// Next-token training (synthetic task or text) to train.steps: progress, metrics.jsonl,
// eval.jsonl (held-out evaluations) and checkpoints under train.run_dir.
int run_lm_job(const LmJobArgs& args);

// True when the YAML (file or preset) describes an RL run (it has `rollout`, `actor` or
// `algorithm`).
bool is_rl_config(const std::string& name_or_path);

}  // namespace fm::cli

namespace fm::cli {

// The `run` record of a checkpoint's manifest (empty when absent): tokenizer, template, ...
nlohmann::json checkpoint_run_info(const std::string& dir);

}  // namespace fm::cli
