// `foremoe train`: the main job. An RL config (configs/rl/, the default
// rl/demo) runs the RL pipeline (tools/foremoe/rl_job.cpp); a next-token
// config (configs/train/) trains on the synthetic task (tools/foremoe/lm_job.cpp).
#include <omp.h>

#include <memory>

#include "tools/foremoe/commands.h"
#include "tools/foremoe/jobs.h"

namespace fm::cli {

struct TrainArgs {
  std::string config = "rl/demo";
  std::string init_checkpoint;
  int64_t steps = -1;
  std::string run_dir;
  std::string resume;
  int threads = 0;
  int64_t ranks = 0;
  std::string device = "cpu";
};

static int run_train(const TrainArgs& a) {
  if (is_rl_config(a.config)) {
    if (a.threads > 0) omp_set_num_threads(a.threads);
    return run_rl_job(
        {a.config, a.steps, a.run_dir, a.resume, a.init_checkpoint, a.ranks, a.device});
  }
  return run_lm_job({.command = "train",
                     .config = a.config,
                     .steps = a.steps,
                     .run_dir = a.run_dir,
                     .resume = a.resume,
                     .threads = a.threads,
                     .device = a.device});
}

Runner add_train(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "train",
      "The main job: RL (GRPO/RLOO/...) on a task, after an SFT warm start; a config "
      "without rollout/actor/algorithm sections runs next-token training instead");
  auto a = std::make_shared<TrainArgs>();
  cmd->add_option("-c,--config", a->config, "run YAML file or preset name")->capture_default_str();
  cmd->add_option("--steps", a->steps, "override trainer.total_steps (train.steps)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--init-checkpoint", a->init_checkpoint,
                  "RL: start from these weights (skips the SFT warm start)")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--run-dir", a->run_dir, "override train.run_dir");
  cmd->add_option("--resume", a->resume, "checkpoint directory to continue from")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--threads", a->threads, "OpenMP threads (default: all cores)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--ranks", a->ranks,
                  "RL: in-process ranks, expert-parallel (override trainer.ranks; under foremoe "
                  "launch the launcher's ranks)")
      ->check(CLI::PositiveNumber);
  add_device_option(cmd, a->device);
  return [a] { return run_train(*a); };
}

}  // namespace fm::cli
