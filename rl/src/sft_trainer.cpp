#include "rl/sft_trainer.h"

#include <chrono>
#include <filesystem>

#include "engine/config.h"
#include "engine/error.h"
#include "model/checkpoint.h"
#include "model/presets.h"

namespace fm {

SftTrainConfig SftTrainConfig::from_yaml(const ConfigNode& n) {
  SftTrainConfig c;
  c.seed = n.get<uint64_t>("seed", c.seed);
  c.steps = n.get<int64_t>("steps", c.steps);
  c.micro_batches = n.get<int64_t>("micro_batches", c.micro_batches);
  c.sequences_per_micro_batch =
      n.get<int64_t>("sequences_per_micro_batch", c.sequences_per_micro_batch);
  c.log_every = n.get<int64_t>("log_every", c.log_every);
  c.eval_every = n.get<int64_t>("eval_every", c.eval_every);
  c.eval_examples = n.get<int64_t>("eval_examples", c.eval_examples);
  c.max_new_tokens = n.get<int64_t>("max_new_tokens", c.max_new_tokens);
  c.checkpoint_every = n.get<int64_t>("checkpoint_every", c.checkpoint_every);
  c.run_dir = n.get<std::string>("run_dir", c.run_dir);
  if (c.steps < 0) n.fail("steps", fmt::format("must be >= 0 (got {})", c.steps));
  if (c.micro_batches < 1) n.fail("micro_batches", "must be >= 1");
  if (c.sequences_per_micro_batch < 1) n.fail("sequences_per_micro_batch", "must be >= 1");
  if (c.log_every < 1) n.fail("log_every", "must be >= 1");
  if (c.eval_every < 0) n.fail("eval_every", "must be >= 0");
  if (c.eval_examples < 1) n.fail("eval_examples", "must be >= 1");
  if (c.max_new_tokens < 1) n.fail("max_new_tokens", "must be >= 1");
  if (c.checkpoint_every < 0) n.fail("checkpoint_every", "must be >= 0");
  if (c.run_dir.empty()) n.fail("run_dir", "must not be empty");
  return c;
}

Tokenizer load_tokenizer(const std::string& name_or_path) {
  for (const std::string& name : Tokenizer::embedded_names())
    if (name == name_or_path) return Tokenizer::embedded(name);
  if (std::filesystem::exists(name_or_path)) return Tokenizer::load(name_or_path);
  std::string known;
  for (const std::string& name : Tokenizer::embedded_names()) known += " " + name;
  throw Error(fmt::format("tokenizer '{}': neither a file nor an embedded tokenizer (known:{})",
                          name_or_path, known));
}

void check_tokenizer_and_template(const ConfigNode& root, const std::string& tokenizer,
                                  const std::string& prompt_template, int64_t vocab_size) {
  try {
    const Tokenizer tok = load_tokenizer(tokenizer);
    if (tok.vocab_size() > vocab_size)
      root.fail("tokenizer", fmt::format("has {} pieces, more than model.vocab_size {}",
                                         tok.vocab_size(), vocab_size));
  } catch (const Error& e) {
    if (std::string(e.what()).starts_with(root.origin())) throw;
    root.fail("tokenizer", e.what());
  }
  try {
    PromptTemplate::named(prompt_template);
  } catch (const Error& e) {
    root.fail("template", e.what());
  }
}

SftRunConfig SftRunConfig::parse(const std::string& text, const std::string& origin) {
  const ConfigNode root = ConfigNode::parse(text, origin);
  SftRunConfig c;
  c.origin = origin;
  c.model = ModelConfig::from_entry(root);
  c.tokenizer = root.get<std::string>("tokenizer", c.tokenizer);
  c.prompt_template = root.get<std::string>("template", c.prompt_template);
  c.task = TaskConfig::from_yaml(root.child("task"));
  c.optimizer = OptimizerConfig::from_yaml(root.child_or_empty("optimizer"));
  c.train = SftTrainConfig::from_yaml(root.child_or_empty("sft"));
  root.finish();
  check_tokenizer_and_template(root, c.tokenizer, c.prompt_template, c.model.vocab_size);
  return c;
}

SftRunConfig SftRunConfig::load(const std::string& name_or_path) {
  std::string origin;
  const std::string text = resolve_config(name_or_path, &origin);
  return parse(text, origin);
}

SftTrainer::SftTrainer(SftRunConfig config, Backend& backend)
    : config_(std::move(config)),
      tokenizer_(load_tokenizer(config_.tokenizer)),
      template_(PromptTemplate::named(config_.prompt_template)),
      task_(make_task(config_.task)) {
  model_ = std::make_unique<MoeTransformer>(config_.model, backend);
  model_->init_weights(config_.train.seed);
  optimizer_ = std::make_unique<AdamW>(config_.optimizer, model_->params(), backend);
}

Batch SftTrainer::make_batch(uint64_t first, int64_t count) const {
  Batch b;
  b.seq_offsets.push_back(0);
  for (int64_t i = 0; i < count; ++i) {
    const TaskExample e = task_->example(first + static_cast<uint64_t>(i));
    const std::vector<int32_t> p = template_.encode_prompt(tokenizer_, e.prompt);
    const std::vector<int32_t> a = template_.encode_answer(tokenizer_, e.answer);
    const int64_t len = static_cast<int64_t>(p.size() + a.size());
    FM_CHECK(len <= config_.model.max_seq_len,
             "sft: training example {} has {} tokens, above model.max_seq_len {}", first + i, len,
             config_.model.max_seq_len);
    b.tokens.insert(b.tokens.end(), p.begin(), p.end());
    b.tokens.insert(b.tokens.end(), a.begin(), a.end());
    // Position t predicts token t + 1: only answer tokens are targets.
    for (size_t t = 0; t + 1 < p.size(); ++t) b.targets.push_back(-1);
    b.targets.insert(b.targets.end(), a.begin(), a.end());
    b.targets.push_back(-1);
    b.seq_offsets.push_back(b.size());
  }
  return b;
}

SftStepMetrics SftTrainer::step() {
  const auto t0 = std::chrono::steady_clock::now();
  const SftTrainConfig& t = config_.train;
  SftStepMetrics m;
  model_->zero_grad();
  double balance = 0.0;
  for (int64_t mb = 0; mb < t.micro_batches; ++mb) {
    const uint64_t first =
        static_cast<uint64_t>((steps_done_ * t.micro_batches + mb) * t.sequences_per_micro_batch);
    const Batch batch = make_batch(first, t.sequences_per_micro_batch);
    for (int32_t target : batch.targets) m.answer_tokens += target >= 0;
    const double scale = 1.0 / static_cast<double>(t.micro_batches);
    m.loss +=
        scale * model_->lm_loss_and_backward(batch, {.replay = nullptr, .training = true}, scale);
    balance += scale * model_->forward_result().balance_loss;
  }
  m.lm_loss = m.loss - balance;
  const StepReport rep = optimizer_->step(model_->grads());
  model_->end_balance_step();
  m.step = ++steps_done_;
  m.grad_norm = rep.grad_norm;
  m.lr = rep.lr;
  m.skipped = rep.skipped;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  m.tokens_per_second = static_cast<double>(m.answer_tokens) / std::max(secs, 1e-9);
  return m;
}

TaskEvalResult SftTrainer::evaluate() {
  GenerationConfig g;
  g.sampling.temperature = 0.0;
  g.max_new_tokens = config_.train.max_new_tokens;
  return evaluate_task(*model_, tokenizer_, template_, *task_,
                       first_held_out(*task_, config_.train.eval_examples), g);
}

void SftTrainer::save(const std::string& dir) {
  CheckpointInfo info;
  info.step = steps_done_;
  info.run = {{"kind", "sft"},
              {"config_origin", config_.origin},
              {"seed", config_.train.seed},
              {"tokenizer", config_.tokenizer},
              {"template", config_.prompt_template},
              {"task", config_.task.name}};
  save_checkpoint(dir, *model_, *optimizer_, info);
}

void SftTrainer::resume(const std::string& dir) {
  const CheckpointInfo info = load_checkpoint(dir, *model_, *optimizer_);
  steps_done_ = info.step;
}

nlohmann::json sft_metrics_json(const SftStepMetrics& m) {
  return {{"step", m.step},
          {"loss", m.loss},
          {"lm_loss", m.lm_loss},
          {"grad_norm", m.grad_norm},
          {"lr", m.lr},
          {"skipped", m.skipped},
          {"answer_tokens", m.answer_tokens},
          {"tokens_per_second", m.tokens_per_second}};
}

nlohmann::json task_eval_json(const TaskEvalResult& r, int64_t step) {
  return {{"step", step},
          {"eval_examples", r.examples},
          {"accuracy", r.accuracy},
          {"mean_reward", r.mean_reward},
          {"well_formed", r.well_formed},
          {"mean_response_tokens", r.mean_response_tokens}};
}

}  // namespace fm
