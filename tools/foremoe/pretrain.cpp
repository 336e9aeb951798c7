// `foremoe pretrain --config <yaml>`: next-token pretraining on plain-text files (the
// config's `data:` section, rl/text_corpus.h), tokenized with a SentencePiece model trained
// on the same corpus; train/held-out split, checkpoints, metrics (tools/foremoe/lm_job.cpp).
#include <memory>

#include "tools/foremoe/commands.h"
#include "tools/foremoe/jobs.h"

namespace fm::cli {

Runner add_pretrain(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "pretrain",
      "Next-token pretraining on text files (`data:`): tokenizer trained on the corpus, "
      "held-out evaluation (loss, MaxVio_global, Gini), checkpoints");
  auto a = std::make_shared<LmJobArgs>();
  a->command = "pretrain";
  a->require_text = true;
  cmd->add_option("-c,--config", a->config, "run YAML file (e.g. configs/pretrain/brown_tiny.yaml)")
      ->required();
  cmd->add_option("--steps", a->steps, "override train.steps")->check(CLI::NonNegativeNumber);
  cmd->add_option("--run-dir", a->run_dir, "override train.run_dir");
  cmd->add_option("--resume", a->resume, "checkpoint directory to continue from")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--threads", a->threads, "OpenMP threads (default: all cores)")
      ->check(CLI::PositiveNumber);
  add_device_option(cmd, a->device);
  return [a] { return run_lm_job(*a); };
}

}  // namespace fm::cli
