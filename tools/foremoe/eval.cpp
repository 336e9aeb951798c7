// `foremoe eval`: held-out accuracy of a checkpoint on a task (greedy by default).
#include <fmt/format.h>
#include <omp.h>

#include <memory>

#include "engine/backend.h"
#include "engine/error.h"
#include "model/checkpoint.h"
#include "rl/sft_trainer.h"
#include "rl/task_eval.h"
#include "rl/tasks/task_config.h"
#include "tools/foremoe/commands.h"
#include "tools/foremoe/jobs.h"

namespace fm::cli {

struct EvalArgs {
  std::string checkpoint;
  std::string task;
  int64_t n = 0;
  std::string tokenizer, prompt_template;
  int64_t max_new_tokens = 16;
  double temperature = 0.0;
  int threads = 0;
  int64_t show = 5;
  std::string device = "cpu";
};

static int run_eval(EvalArgs a) {
  if (a.threads > 0) omp_set_num_threads(a.threads);
  const nlohmann::json run = checkpoint_run_info(a.checkpoint);
  if (a.tokenizer.empty()) a.tokenizer = run.value("tokenizer", std::string("tasks"));
  if (a.prompt_template.empty()) a.prompt_template = run.value("template", std::string("plain"));
  if (a.task.empty()) a.task = run.value("task", std::string());
  FM_CHECK(!a.task.empty(), "eval: give --task (the checkpoint does not name one)");
  const Tokenizer tok = load_tokenizer(a.tokenizer);
  const auto task = make_task(TaskConfig::defaults(a.task));
  auto backend = make_backend(a.device);
  MoeTransformer model(load_checkpoint_config(a.checkpoint), *backend);
  load_weights(a.checkpoint, model);
  GenerationConfig g;
  g.sampling.temperature = a.temperature;
  g.max_new_tokens = a.max_new_tokens;
  const TaskEvalResult r = evaluate_task(model, tok, PromptTemplate::named(a.prompt_template),
                                         *task, first_held_out(*task, a.n), g);
  for (int64_t i = 0; i < a.show && i < r.examples; ++i) {
    const TaskSample& s = r.samples[static_cast<size_t>(i)];
    fmt::print("  {:<24} -> {:<12} (answer {}){}\n", s.example.prompt, s.response, s.example.answer,
               s.reward.correct ? "" : "  wrong");
  }
  fmt::print(
      "{} on {} held-out {} prompts (default knobs): accuracy {:.3f}, mean reward {:.3f}, "
      "well formed {:.3f}\n",
      a.checkpoint, r.examples, a.task, r.accuracy, r.mean_reward, r.well_formed);
  return 0;
}

Runner add_eval(CLI::App& app) {
  auto* cmd = app.add_subcommand("eval", "Held-out accuracy of a checkpoint on a task");
  auto a = std::make_shared<EvalArgs>();
  cmd->add_option("--checkpoint", a->checkpoint, "checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--task", a->task, "add, sort, reverse, count (default: the checkpoint's)");
  cmd->add_option("-n", a->n, "held-out prompts to use (default: all)")->check(CLI::PositiveNumber);
  cmd->add_option("--tokenizer", a->tokenizer, "default: the checkpoint's");
  cmd->add_option("--template", a->prompt_template, "default: the checkpoint's");
  cmd->add_option("--max-new-tokens", a->max_new_tokens)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--temperature", a->temperature, "0 = greedy")
      ->check(CLI::Range(0.0, 100.0))
      ->capture_default_str();
  cmd->add_option("--show", a->show, "print this many examples")->capture_default_str();
  cmd->add_option("--threads", a->threads)->check(CLI::PositiveNumber);
  add_device_option(cmd, a->device);
  return [a] { return run_eval(*a); };
}

}  // namespace fm::cli
