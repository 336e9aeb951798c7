// The next-token training job behind `foremoe train` (synthetic-task configs) and
// `foremoe pretrain` (text configs): the step loop, progress lines, metrics.jsonl,
// held-out evaluations (eval.jsonl) and checkpoints.
#include <fmt/format.h>
#include <omp.h>
#include <spdlog/spdlog.h>

#include <algorithm>

#include "engine/backend.h"
#include "engine/error.h"
#include "engine/files.h"
#include "engine/metrics.h"
#include "rl/lm_trainer.h"
#include "tools/foremoe/jobs.h"

namespace fm::cli {

static void print_eval(const LmEvalMetrics& e) {
  fmt::print(
      "eval  {:>5}  held-out loss {:.4f} over {} tokens  MaxVio_global {:.3f}  gini {:.3f}\n",
      e.step, e.loss, e.tokens, mean_of(e.max_vio), mean_of(e.gini));
}

int run_lm_job(const LmJobArgs& a) {
  if (a.threads > 0) omp_set_num_threads(a.threads);
  LmRunConfig cfg = LmRunConfig::load(a.config);
  if (a.require_text && !cfg.data)
    throw Error(
        fmt::format("{}: `foremoe pretrain` needs a `data:` section (text files); "
                    "synthetic-task configs run with `foremoe train`",
                    cfg.origin));
  if (a.steps >= 0) cfg.train.steps = a.steps;
  if (!a.run_dir.empty()) cfg.train.run_dir = a.run_dir;
  const LmTrainConfig& t = cfg.train;
  make_dirs(t.run_dir);
  std::shared_ptr<const TextCorpus> corpus;
  if (cfg.data) {
    std::string log;
    corpus = load_text_corpus(cfg, &log);
    fmt::print("{}\ntext: {} training tokens, {} held-out tokens; model.vocab_size := {}\n", log,
               corpus->train_stream().size(), corpus->valid_stream().size(), corpus->vocab_size());
  }
  auto backend = make_backend(a.device);
  LmTrainer trainer(cfg, *backend, corpus);
  if (!a.resume.empty()) {
    trainer.resume(a.resume);
    fmt::print("resumed from {} at step {}\n", a.resume, trainer.steps_done());
  }
  const ModelConfig& mc = trainer.config().model;
  MetricsWriter metrics(t.run_dir + "/metrics.jsonl", /*append=*/!a.resume.empty());
  MetricsWriter evals(t.run_dir + "/eval.jsonl", /*append=*/!a.resume.empty());
  const ModelCosts costs = model_costs(mc, t.seq_len);
  fmt::print(
      "foremoe {}: model {} ({:.2f}M params, {:.2f}M active), router balance {}, config {}, "
      "{} threads\n",
      a.command, mc.name, costs.total_params / 1e6, costs.active_params / 1e6,
      balance_method_name(mc.balance.method), cfg.origin, omp_get_max_threads());
  if (!cfg.data)
    fmt::print("task: {} maps over {} symbols; loss floor {:.3f}\n", cfg.task.n_maps,
               cfg.task.symbols, trainer.task().optimal_loss(t.seq_len));
  fmt::print("{} steps x {} micro-batches x {} sequences x {} tokens\n", t.steps, t.micro_batches,
             t.sequences_per_micro_batch, t.seq_len);
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
    if ((t.eval_every > 0 && m.step % t.eval_every == 0) || m.step == t.steps) {
      const LmEvalMetrics e = trainer.evaluate();
      evals.write(eval_metrics_json(e));
      print_eval(e);
    }
    if ((t.checkpoint_every > 0 && m.step % t.checkpoint_every == 0) || m.step == t.steps) {
      const std::string dir = fmt::format("{}/checkpoints/step_{:06d}", t.run_dir, m.step);
      trainer.save(dir);
      spdlog::info("checkpoint {}", dir);
    }
  }
  if (first >= 0)
    fmt::print(
        "lm loss {:.4f} -> {:.4f} over {} steps (metrics: {}/metrics.jsonl, held-out: "
        "{}/eval.jsonl)\n",
        first, last, t.steps, t.run_dir, t.run_dir);
  return 0;
}

}  // namespace fm::cli
