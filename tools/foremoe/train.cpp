// `foremoe train`: the main job. An RL config (configs/rl/, the default
// rl/demo) runs the RL pipeline (tools/foremoe/rl_job.cpp); a next-token
// config (configs/train/) trains on the synthetic task.
#include <fmt/format.h>
#include <omp.h>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <memory>

#include "engine/backend.h"
#include "engine/files.h"
#include "engine/metrics.h"
#include "rl/lm_trainer.h"
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
};

static int run_train(const TrainArgs& a) {
  if (a.threads > 0) omp_set_num_threads(a.threads);
  if (is_rl_config(a.config))
    return run_rl_job({a.config, a.steps, a.run_dir, a.resume, a.init_checkpoint, a.ranks});
  LmRunConfig cfg = LmRunConfig::load(a.config);
  if (a.steps >= 0) cfg.train.steps = a.steps;
  if (!a.run_dir.empty()) cfg.train.run_dir = a.run_dir;
  auto backend = make_cpu_backend();
  LmTrainer trainer(cfg, *backend);
  if (!a.resume.empty()) {
    trainer.resume(a.resume);
    fmt::print("resumed from {} at step {}\n", a.resume, trainer.steps_done());
  }
  const LmTrainConfig& t = cfg.train;
  make_dirs(t.run_dir);
  MetricsWriter metrics(t.run_dir + "/metrics.jsonl", /*append=*/!a.resume.empty());
  const ModelCosts costs = model_costs(cfg.model, t.seq_len);
  fmt::print("foremoe train: model {} ({:.2f}M params, {:.2f}M active), config {}, {} threads\n",
             cfg.model.name, costs.total_params / 1e6, costs.active_params / 1e6, cfg.origin,
             omp_get_max_threads());
  fmt::print(
      "task: {} maps over {} symbols; {} steps x {} micro-batches x {} sequences x {} tokens; "
      "loss floor {:.3f}\n",
      cfg.task.n_maps, cfg.task.symbols, t.steps, t.micro_batches, t.sequences_per_micro_batch,
      t.seq_len, trainer.task().optimal_loss(t.seq_len));
  double first = -1.0, last = 0.0;
  while (trainer.steps_done() < t.steps) {
    const LmStepMetrics m = trainer.step();
    metrics.write(step_metrics_json(m));
    if (first < 0) first = m.lm_loss;
    last = m.lm_loss;
    if (m.step % t.log_every == 0 || m.step == 1 || m.step == t.steps) {
      double vio = 0.0;
      for (double v : m.max_vio) vio = std::max(vio, v);
      fmt::print(
          "step {:>5}  loss {:.4f}  lm {:.4f}  balance {:.5f}  grad_norm {:.3f}  lr {:.2e}  "
          "max_vio {:.2f}  {:.0f} tok/s{}\n",
          m.step, m.loss, m.lm_loss, m.balance_loss, m.grad_norm, m.lr, vio, m.tokens_per_second,
          m.skipped ? "  (skipped: non-finite grad)" : "");
    }
    if ((t.checkpoint_every > 0 && m.step % t.checkpoint_every == 0) || m.step == t.steps) {
      const std::string dir = fmt::format("{}/checkpoints/step_{:06d}", t.run_dir, m.step);
      trainer.save(dir);
      spdlog::info("checkpoint {}", dir);
    }
  }
  if (first >= 0)
    fmt::print("lm loss {:.4f} -> {:.4f} over {} steps (metrics: {}/metrics.jsonl)\n", first, last,
               t.steps, t.run_dir);
  return 0;
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
  return [a] { return run_train(*a); };
}

}  // namespace fm::cli
