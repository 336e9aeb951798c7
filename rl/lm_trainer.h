// LmTrainer: next-token training of the MoE transformer on the synthetic task
// (the CPU demo, and the loop the SFT warm start builds on) or on a text corpus
// (`foremoe pretrain`, the router-balance study). One step =
// micro_batches forward/backward passes with gradient accumulation, then one
// AdamW step and the router-balancing state update. Checkpoints hold
// everything needed to continue bit-identically on the CPU.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/rng.h"
#include "model/checkpoint.h"
#include "model/moe_transformer.h"
#include "model/optimizer.h"
#include "rl/synthetic_task.h"
#include "rl/text_corpus.h"

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
  // Held-out evaluation (LmTrainer::evaluate) every eval_every steps (0: only at the end),
  // over at most eval_tokens tokens in batches of eval_sequences x seq_len.
  int64_t eval_every = 0;
  int64_t eval_tokens = 16384;
  int64_t eval_sequences = 8;
  // "f32", or "bf16": mixed precision (MoeTransformer::set_compute_dtype) with f32 master
  // weights, gradients, AdamW state and checkpoints.
  std::string precision = "f32";
  std::string run_dir = "runs/lm";
  static LmTrainConfig from_yaml(const ConfigNode& node);
};

// A whole run: `model:` (preset name, file or mapping), `optimizer:`, `train:`, and the data:
// `task:` (the synthetic task) or `data:` (text files, rl/text_corpus.h; not both). With text
// data the tokenizer decides the vocabulary: the model's vocab_size is replaced by the
// tokenizer's when the trainer is built.
struct LmRunConfig {
  ModelConfig model;
  OptimizerConfig optimizer;
  LmTrainConfig train;
  SyntheticTaskConfig task;
  std::optional<TextDataConfig> data;
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

// One held-out evaluation: forwards only (training = false: no balancing state changes).
struct LmEvalMetrics {
  int64_t step = 0;
  int64_t tokens = 0;                      // predicted targets
  double loss = 0.0;                       // token-mean next-token cross entropy
  std::vector<std::vector<int64_t>> load;  // [MoE layer][E] top-k assignments, whole set
  std::vector<double> max_vio;             // per MoE layer: MaxVio_global
  std::vector<double> gini;                // per MoE layer: Gini of `load`
  RoutingTrace routes;                     // every token's logical expert ids, in order
};

// The text corpus of a run with `data:` (its tokenizer from data.tokenizer, or trained into
// or reused from train.run_dir); `log` receives what was done.
std::shared_ptr<const TextCorpus> load_text_corpus(const LmRunConfig& config,
                                                   std::string* log = nullptr);

class LmTrainer {
 public:
  // A run with `data:` trains on `corpus` (null: load_text_corpus(config)); one with `task:`
  // on the synthetic task (corpus must be null).
  LmTrainer(LmRunConfig config, Backend& backend,
            std::shared_ptr<const TextCorpus> corpus = nullptr);

  LmStepMetrics step();
  // The held-out set: the corpus's held-out stream, or for the synthetic task a fixed draw
  // from its own random stream. Built once, the same for every call.
  LmEvalMetrics evaluate();
  int64_t steps_done() const { return steps_done_; }
  const LmRunConfig& config() const { return config_; }
  MoeTransformer& model() { return *model_; }
  AdamW& optimizer() { return *optimizer_; }
  const SyntheticNextTokenTask& task() const { return task_; }
  const TextCorpus* corpus() const { return corpus_.get(); }

  void save(const std::string& dir);
  void resume(const std::string& dir);

 private:
  LmRunConfig config_;
  std::unique_ptr<MoeTransformer> model_;
  std::unique_ptr<AdamW> optimizer_;
  SyntheticNextTokenTask task_;
  std::shared_ptr<const TextCorpus> corpus_;
  const LmDataSource* data_ = nullptr;  // corpus_ or task_
  std::vector<Batch> held_out_;         // built by the first evaluate()
  Rng data_rng_;
  int64_t steps_done_ = 0;
};

nlohmann::json step_metrics_json(const LmStepMetrics& m);
// The mean of per-layer figures (0 for none): MaxVio and Gini averaged over MoE layers.
double mean_of(const std::vector<double>& values);
// The evaluation without its routes.
nlohmann::json eval_metrics_json(const LmEvalMetrics& m);

}  // namespace fm
