// `foremoe sft`: the supervised warm start on a verifiable task (answer-only
// loss, periodic held-out accuracy by greedy generation, checkpoints).
#include <fmt/format.h>
#include <omp.h>
#include <spdlog/spdlog.h>

#include <memory>

#include "engine/backend.h"
#include "engine/files.h"
#include "engine/metrics.h"
#include "rl/sft_trainer.h"
#include "tools/foremoe/commands.h"
#include "tools/foremoe/jobs.h"

namespace fm::cli {

struct SftArgs {
  std::string config = "sft/add_tiny";
  int64_t steps = -1;
  std::string run_dir;
  std::string resume;
  int threads = 0;
  std::string device = "cpu";
};

static void print_eval(const TaskEvalResult& r, int64_t step) {
  fmt::print(
      "eval  step {:>5}  accuracy {:.3f}  mean_reward {:.3f}  well_formed {:.3f}  ({} held-out)\n",
      step, r.accuracy, r.mean_reward, r.well_formed, r.examples);
}

static int run_sft(const SftArgs& a) {
  SftRunConfig cfg = SftRunConfig::load(a.config);
  if (a.steps >= 0) cfg.train.steps = a.steps;
  if (!a.run_dir.empty()) cfg.train.run_dir = a.run_dir;
  if (a.threads > 0) omp_set_num_threads(a.threads);
  run_sft_job(cfg, a.resume, a.device);
  return 0;
}

std::string run_sft_job(const SftRunConfig& cfg, const std::string& resume,
                        const std::string& device) {
  auto backend = make_backend(device);
  SftTrainer trainer(cfg, *backend);
  if (!resume.empty()) {
    trainer.resume(resume);
    fmt::print("resumed from {} at step {}\n", resume, trainer.steps_done());
  }
  const SftTrainConfig& t = cfg.train;
  make_dirs(t.run_dir);
  MetricsWriter metrics(t.run_dir + "/metrics.jsonl", /*append=*/!resume.empty());
  const ModelCosts costs = model_costs(cfg.model, 32);
  fmt::print(
      "foremoe sft: model {} ({:.2f}M params), task {}, tokenizer {} ({} pieces), "
      "template {}, config {}, {} threads\n",
      cfg.model.name, costs.total_params / 1e6, cfg.task.name, cfg.tokenizer,
      trainer.tokenizer().vocab_size(), cfg.prompt_template, cfg.origin, omp_get_max_threads());
  fmt::print("{} steps x {} micro-batches x {} sequences; eval on {} held-out examples\n", t.steps,
             t.micro_batches, t.sequences_per_micro_batch, t.eval_examples);
  if (trainer.steps_done() == 0) {
    const TaskEvalResult r = trainer.evaluate();
    metrics.write(task_eval_json(r, 0));
    print_eval(r, 0);
  }
  TaskEvalResult last;
  std::string final_dir;
  while (trainer.steps_done() < t.steps) {
    const SftStepMetrics m = trainer.step();
    metrics.write(sft_metrics_json(m));
    if (m.step % t.log_every == 0 || m.step == 1 || m.step == t.steps)
      fmt::print("step {:>5}  loss {:.4f}  grad_norm {:.3f}  lr {:.2e}  {:.0f} answer tok/s{}\n",
                 m.step, m.loss, m.grad_norm, m.lr, m.tokens_per_second,
                 m.skipped ? "  (skipped: non-finite grad)" : "");
    if ((t.eval_every > 0 && m.step % t.eval_every == 0) || m.step == t.steps) {
      last = trainer.evaluate();
      metrics.write(task_eval_json(last, m.step));
      print_eval(last, m.step);
    }
    if ((t.checkpoint_every > 0 && m.step % t.checkpoint_every == 0) || m.step == t.steps) {
      const std::string dir = fmt::format("{}/checkpoints/step_{:06d}", t.run_dir, m.step);
      trainer.save(dir);
      spdlog::info("checkpoint {}", dir);
      final_dir = dir;
    }
  }
  for (size_t i = 0; i < last.samples.size() && i < 6; ++i) {
    const TaskSample& s = last.samples[i];
    fmt::print("  {:<24} -> {:<10} (answer {}){}\n", s.example.prompt, s.response, s.example.answer,
               s.reward.correct ? "" : "  wrong");
  }
  return final_dir;
}

Runner add_sft(CLI::App& app) {
  auto* cmd = app.add_subcommand("sft", "Supervised warm start on a verifiable task");
  auto a = std::make_shared<SftArgs>();
  cmd->add_option("-c,--config", a->config, "run YAML file or preset name")->capture_default_str();
  cmd->add_option("--steps", a->steps, "override sft.steps")->check(CLI::NonNegativeNumber);
  cmd->add_option("--run-dir", a->run_dir, "override sft.run_dir");
  cmd->add_option("--resume", a->resume, "checkpoint directory to continue from")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--threads", a->threads, "OpenMP threads (default: all cores)")
      ->check(CLI::PositiveNumber);
  add_device_option(cmd, a->device);
  return [a] { return run_sft(*a); };
}

}  // namespace fm::cli
