#include "rl/task_eval.h"

#include <algorithm>

namespace fm {

std::string decode_response(const Tokenizer& tokenizer, const GeneratedSequence& s) {
  std::vector<int32_t> ids = s.response;
  if (s.stopped && !ids.empty()) ids.pop_back();
  return tokenizer.decode(ids);
}

void stop_on_eos(GenerationConfig& config, const Tokenizer& tokenizer) {
  config.stop_tokens.push_back(tokenizer.eos_id());
  config.sampling.vocab_limit = tokenizer.vocab_size();
}

std::vector<TaskExample> first_held_out(const Task& task, int64_t n) {
  const std::vector<TaskExample>& held = task.held_out();
  const size_t k = n > 0 ? std::min(held.size(), static_cast<size_t>(n)) : held.size();
  return {held.begin(), held.begin() + static_cast<std::ptrdiff_t>(k)};
}

TaskEvalResult evaluate_task(MoeTransformer& model, const Tokenizer& tokenizer,
                             const PromptTemplate& prompt_template, const Task& task,
                             const std::vector<TaskExample>& examples, GenerationConfig config) {
  stop_on_eos(config, tokenizer);
  std::vector<std::vector<int32_t>> prompts;
  prompts.reserve(examples.size());
  for (const TaskExample& e : examples)
    prompts.push_back(prompt_template.encode_prompt(tokenizer, e.prompt));
  const std::vector<GeneratedSequence> seqs = generate(model, prompts, config);
  TaskEvalResult r;
  r.examples = static_cast<int64_t>(examples.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    TaskSample s{examples[i], decode_response(tokenizer, seqs[i]), {}};
    s.reward = task.score(s.response, examples[i].answer);
    r.accuracy += s.reward.correct;
    r.mean_reward += s.reward.reward;
    r.well_formed += s.reward.well_formed;
    r.mean_response_tokens += static_cast<double>(seqs[i].response.size());
    r.samples.push_back(std::move(s));
  }
  if (r.examples > 0) {
    const double n = static_cast<double>(r.examples);
    r.accuracy /= n;
    r.mean_reward /= n;
    r.well_formed /= n;
    r.mean_response_tokens /= n;
  }
  return r;
}

}  // namespace fm
