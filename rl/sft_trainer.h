// SftTrainer: the supervised warm start. The model learns to answer a task's
// prompts: each sequence is bos + prompt (+ template) followed by the answer and
// eos, and the loss is the token-mean cross entropy over the answer tokens only
// (the prompt is context, not target). Every eval_every steps the held-out
// prompts are answered by greedy generation and scored with the task's reward,
// so the accuracy the RL stage starts from is known.
//
// Data order is a pure function of the step: micro-batch m of step s holds
// training examples [(s * micro_batches + m) * B, ... + B), so a resumed run
// sees exactly the examples an uninterrupted one would.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "engine/backend.h"
#include "model/generation.h"
#include "model/moe_transformer.h"
#include "model/optimizer.h"
#include "rl/task_eval.h"
#include "rl/tasks/task.h"
#include "rl/tasks/task_config.h"
#include "tokenizer/prompt_template.h"
#include "tokenizer/tokenizer.h"

namespace fm {

class ConfigNode;

struct SftTrainConfig {
  uint64_t seed = 1;  // weight init
  int64_t steps = 500;
  int64_t micro_batches = 1;
  int64_t sequences_per_micro_batch = 32;
  int64_t log_every = 20;
  int64_t eval_every = 100;      // 0: only at the end
  int64_t eval_examples = 200;   // the first n held-out examples
  int64_t max_new_tokens = 16;   // for evaluation
  int64_t checkpoint_every = 0;  // 0: only at the end
  std::string run_dir = "runs/sft";
  static SftTrainConfig from_yaml(const ConfigNode& node);
};

// A whole run: `model:`, `tokenizer:` (embedded name or .model path), `template:`,
// `task:`, `optimizer:`, `sft:`.
struct SftRunConfig {
  ModelConfig model;
  std::string tokenizer = "tasks";
  std::string prompt_template = "plain";
  TaskConfig task;
  OptimizerConfig optimizer;
  SftTrainConfig train;
  std::string origin;
  static SftRunConfig load(const std::string& name_or_path);
  static SftRunConfig parse(const std::string& yaml_text, const std::string& origin);
};

// A tokenizer by embedded name ("tasks") or .model path.
Tokenizer load_tokenizer(const std::string& name_or_path);

// Run-config checks across sections: the tokenizer loads and fits the model's
// vocabulary, the template exists. Failures name root's `tokenizer` / `template` key.
void check_tokenizer_and_template(const ConfigNode& root, const std::string& tokenizer,
                                  const std::string& prompt_template, int64_t vocab_size);

struct SftStepMetrics {
  int64_t step = 0;
  double loss = 0.0;  // answer-token cross entropy + balance loss, mean over micro-batches
  double lm_loss = 0.0;
  double grad_norm = 0.0;
  double lr = 0.0;
  bool skipped = false;
  int64_t answer_tokens = 0;
  double tokens_per_second = 0.0;
};

class SftTrainer {
 public:
  SftTrainer(SftRunConfig config, Backend& backend);

  SftStepMetrics step();
  TaskEvalResult evaluate();
  int64_t steps_done() const { return steps_done_; }
  const SftRunConfig& config() const { return config_; }
  MoeTransformer& model() { return *model_; }
  const Tokenizer& tokenizer() const { return tokenizer_; }
  const Task& task() const { return *task_; }

  // The packed batch of training examples [first, first + count).
  Batch make_batch(uint64_t first, int64_t count) const;

  void save(const std::string& dir);
  void resume(const std::string& dir);

 private:
  SftRunConfig config_;
  Tokenizer tokenizer_;
  PromptTemplate template_;
  std::unique_ptr<Task> task_;
  std::unique_ptr<MoeTransformer> model_;
  std::unique_ptr<AdamW> optimizer_;
  int64_t steps_done_ = 0;
};

nlohmann::json sft_metrics_json(const SftStepMetrics& m);
nlohmann::json task_eval_json(const TaskEvalResult& r, int64_t step);

}  // namespace fm
