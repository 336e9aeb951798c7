#include "rl/lm_trainer.h"

#include <chrono>
#include <cmath>

#include "engine/config.h"
#include "engine/error.h"
#include "model/presets.h"
#include "model/router_balance.h"

namespace fm {

static constexpr uint64_t kDataStream = 0xda7a;
static constexpr uint64_t kHeldOutStream = 0xe7a1;

LmTrainConfig LmTrainConfig::from_yaml(const ConfigNode& n) {
  LmTrainConfig c;
  c.seed = n.get<uint64_t>("seed", c.seed);
  c.steps = n.get<int64_t>("steps", c.steps);
  c.micro_batches = n.get<int64_t>("micro_batches", c.micro_batches);
  c.sequences_per_micro_batch =
      n.get<int64_t>("sequences_per_micro_batch", c.sequences_per_micro_batch);
  c.seq_len = n.get<int64_t>("seq_len", c.seq_len);
  c.log_every = n.get<int64_t>("log_every", c.log_every);
  c.checkpoint_every = n.get<int64_t>("checkpoint_every", c.checkpoint_every);
  c.run_dir = n.get<std::string>("run_dir", c.run_dir);
  c.eval_every = n.get<int64_t>("eval_every", c.eval_every);
  c.eval_tokens = n.get<int64_t>("eval_tokens", c.eval_tokens);
  c.eval_sequences = n.get<int64_t>("eval_sequences", c.eval_sequences);
  c.precision = n.get<std::string>("precision", c.precision);
  if (c.precision != "f32" && c.precision != "bf16")
    n.fail("precision", fmt::format("must be f32 or bf16 (got '{}')", c.precision));
  if (c.steps < 0) n.fail("steps", fmt::format("must be >= 0 (got {})", c.steps));
  if (c.micro_batches < 1) n.fail("micro_batches", "must be >= 1");
  if (c.sequences_per_micro_batch < 1) n.fail("sequences_per_micro_batch", "must be >= 1");
  if (c.seq_len < 2) n.fail("seq_len", fmt::format("must be >= 2 (got {})", c.seq_len));
  if (c.log_every < 1) n.fail("log_every", "must be >= 1");
  if (c.checkpoint_every < 0) n.fail("checkpoint_every", "must be >= 0");
  if (c.run_dir.empty()) n.fail("run_dir", "must not be empty");
  if (c.eval_every < 0) n.fail("eval_every", "must be >= 0");
  if (c.eval_sequences < 1) n.fail("eval_sequences", "must be >= 1");
  if (c.eval_tokens < c.eval_sequences * c.seq_len)
    n.fail("eval_tokens", fmt::format("must hold one batch of eval_sequences x seq_len = {} "
                                      "tokens (got {})",
                                      c.eval_sequences * c.seq_len, c.eval_tokens));
  return c;
}

LmRunConfig LmRunConfig::parse(const std::string& text, const std::string& origin) {
  const ConfigNode root = ConfigNode::parse(text, origin);
  LmRunConfig c;
  c.origin = origin;
  c.model = ModelConfig::from_entry(root);
  c.optimizer = OptimizerConfig::from_yaml(root.child_or_empty("optimizer"));
  c.train = LmTrainConfig::from_yaml(root.child_or_empty("train"));
  if (root.has("data")) {
    if (root.has("task"))
      root.fail("task", "a run trains on either `task:` (synthetic) or `data:` (text), not both");
    c.data = TextDataConfig::from_yaml(root.child("data"));
  } else {
    c.task = SyntheticTaskConfig::from_yaml(root.child_or_empty("task"), c.model.vocab_size);
  }
  if (c.train.seq_len > c.model.max_seq_len)
    root.fail("train.seq_len", fmt::format("must be <= model.max_seq_len = {} (got {})",
                                           c.model.max_seq_len, c.train.seq_len));
  root.finish();
  return c;
}

LmRunConfig LmRunConfig::load(const std::string& name_or_path) {
  std::string origin;
  const std::string text = resolve_config(name_or_path, &origin);
  return parse(text, origin);
}

std::shared_ptr<const TextCorpus> load_text_corpus(const LmRunConfig& c, std::string* log) {
  FM_CHECK(c.data.has_value(), "{}: has no `data:` section (text files to train on)", c.origin);
  const TextSplit split = split_text_files(*c.data);
  const Tokenizer tok = prepare_tokenizer(*c.data, split, c.train.run_dir, log);
  return std::make_shared<const TextCorpus>(split, tok);
}

LmTrainer::LmTrainer(LmRunConfig config, Backend& backend, std::shared_ptr<const TextCorpus> corpus)
    : config_(std::move(config)),
      task_(config_.task, config_.train.seed),
      corpus_(std::move(corpus)),
      data_rng_(config_.train.seed, kDataStream) {
  FM_CHECK(config_.data || !corpus_, "{}: a text corpus was given to a synthetic-task run",
           config_.origin);
  if (config_.data && !corpus_) corpus_ = load_text_corpus(config_);
  if (corpus_) config_.model.vocab_size = corpus_->vocab_size();
  data_ = corpus_ ? static_cast<const LmDataSource*>(corpus_.get()) : &task_;
  model_ = std::make_unique<MoeTransformer>(config_.model, backend);
  model_->init_weights(config_.train.seed);
  if (config_.train.precision == "bf16") model_->set_compute_dtype(DType::bf16);
  optimizer_ = std::make_unique<AdamW>(config_.optimizer, model_->params(), backend);
}

LmStepMetrics LmTrainer::step() {
  const auto t0 = std::chrono::steady_clock::now();
  const LmTrainConfig& t = config_.train;
  LmStepMetrics m;
  const int64_t n_moe = config_.model.n_moe_layers();
  std::vector<int64_t> zero(static_cast<size_t>(config_.model.n_experts), 0);
  std::vector<std::vector<int64_t>> load(static_cast<size_t>(n_moe), zero);
  model_->zero_grad();
  int64_t tokens = 0;
  for (int64_t mb = 0; mb < t.micro_batches; ++mb) {
    const Batch batch = data_->sample(data_rng_, t.sequences_per_micro_batch, t.seq_len);
    const double scale = 1.0 / static_cast<double>(t.micro_batches);
    m.loss +=
        scale * model_->lm_loss_and_backward(batch, {.replay = nullptr, .training = true}, scale);
    // lm_loss_and_backward's forward result is still held by the model.
    const ForwardResult& r = model_->forward_result();
    m.balance_loss += scale * r.balance_loss;
    for (int64_t l = 0; l < n_moe; ++l)
      for (size_t e = 0; e < zero.size(); ++e) load[l][e] += r.router[l].load[e];
    tokens += batch.size();
  }
  m.lm_loss = m.loss - m.balance_loss;
  const StepReport rep = optimizer_->step(model_->grads());
  model_->end_balance_step();
  ++steps_done_;
  m.step = steps_done_;
  m.grad_norm = rep.grad_norm;
  m.lr = rep.lr;
  m.skipped = rep.skipped;
  m.skipped_total = optimizer_->steps_skipped();
  for (const auto& l : load) m.max_vio.push_back(max_violation(l));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  m.tokens_per_second = static_cast<double>(tokens) / std::max(secs, 1e-9);
  return m;
}

LmEvalMetrics LmTrainer::evaluate() {
  const LmTrainConfig& t = config_.train;
  if (held_out_.empty()) {
    if (corpus_) {
      held_out_ = corpus_->validation_batches(t.eval_sequences, t.seq_len, t.eval_tokens);
    } else {
      Rng rng(t.seed, kHeldOutStream);
      for (int64_t n = t.eval_sequences * t.seq_len; n <= t.eval_tokens;
           n += t.eval_sequences * t.seq_len)
        held_out_.push_back(task_.sample(rng, t.eval_sequences, t.seq_len));
    }
  }
  const ModelConfig& mc = config_.model;
  LmEvalMetrics m;
  m.step = steps_done_;
  m.load.assign(static_cast<size_t>(mc.n_moe_layers()),
                std::vector<int64_t>(static_cast<size_t>(mc.n_experts), 0));
  m.routes = {mc.n_moe_layers(), mc.top_k, mc.n_experts, {0}, {}};
  double nll = 0.0;
  for (const Batch& b : held_out_) {
    const ForwardResult& r = model_->forward(b, {.replay = nullptr, .training = false});
    for (size_t n = 0; n < b.targets.size(); ++n) {
      if (b.targets[n] < 0) continue;
      nll -= r.logp[n];
      ++m.tokens;
    }
    for (size_t l = 0; l < m.load.size(); ++l)
      for (size_t e = 0; e < m.load[l].size(); ++e) m.load[l][e] += r.router[l].load[e];
    const int64_t base = m.routes.tokens();
    for (size_t s = 1; s < r.routes.seq_offsets.size(); ++s)
      m.routes.seq_offsets.push_back(base + r.routes.seq_offsets[s]);
    m.routes.ids.insert(m.routes.ids.end(), r.routes.ids.begin(), r.routes.ids.end());
  }
  m.loss = nll / static_cast<double>(std::max<int64_t>(m.tokens, 1));
  for (const auto& l : m.load) {
    m.max_vio.push_back(max_violation(l));
    m.gini.push_back(gini(l));
  }
  return m;
}

void LmTrainer::save(const std::string& dir) {
  CheckpointInfo info;
  info.step = steps_done_;
  info.rngs.push_back({"data", data_rng_.seed(), data_rng_.stream(), data_rng_.offset()});
  info.run = {{"config_origin", config_.origin}, {"seed", config_.train.seed}};
  if (corpus_) info.run["tokenizer"] = corpus_->tokenizer_origin();
  save_checkpoint(dir, *model_, *optimizer_, info);
}

void LmTrainer::resume(const std::string& dir) {
  const CheckpointInfo info = load_checkpoint(dir, *model_, *optimizer_);
  bool found = false;
  for (const RngState& r : info.rngs) {
    if (r.name != "data") continue;
    FM_CHECK(r.seed == data_rng_.seed() && r.stream == data_rng_.stream(),
             "checkpoint {}: the data stream has seed {} but this run's seed is {}", dir, r.seed,
             data_rng_.seed());
    data_rng_.set_offset(r.offset);
    found = true;
  }
  FM_CHECK(found, "checkpoint {}: manifest has no 'data' random stream", dir);
  steps_done_ = info.step;
}

nlohmann::json step_metrics_json(const LmStepMetrics& m) {
  return {{"step", m.step},           {"loss", m.loss},
          {"lm_loss", m.lm_loss},     {"balance_loss", m.balance_loss},
          {"grad_norm", m.grad_norm}, {"lr", m.lr},
          {"skipped", m.skipped},     {"skipped_total", m.skipped_total},
          {"max_vio", m.max_vio},     {"tokens_per_second", m.tokens_per_second}};
}

double mean_of(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / static_cast<double>(v.size());
}

nlohmann::json eval_metrics_json(const LmEvalMetrics& m) {
  return {{"step", m.step},       {"tokens", m.tokens}, {"loss", m.loss},
          {"max_vio", m.max_vio}, {"gini", m.gini},     {"load", m.load}};
}

}  // namespace fm
