// Evaluation of a model on a verifiable task: generate a response to each
// prompt (greedy by default), decode it, score it with the task's reward.
// Used by the SFT warm start and the RL loop for held-out accuracy.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/generation.h"
#include "model/moe_transformer.h"
#include "rl/tasks/task.h"
#include "tokenizer/prompt_template.h"
#include "tokenizer/tokenizer.h"

namespace fm {

struct TaskSample {
  TaskExample example;
  std::string response;  // decoded, the stop token left out
  Reward reward;
};

struct TaskEvalResult {
  int64_t examples = 0;
  double accuracy = 0.0;  // fraction correct
  double mean_reward = 0.0;
  double well_formed = 0.0;  // fraction well formed
  double mean_response_tokens = 0.0;
  std::vector<TaskSample> samples;  // one per example, in order
};

// Prompts are template.encode_prompt(tokenizer, prompt); generation stops on the
// tokenizer's eos (added to config.stop_tokens).
TaskEvalResult evaluate_task(MoeTransformer& model, const Tokenizer& tokenizer,
                             const PromptTemplate& prompt_template, const Task& task,
                             const std::vector<TaskExample>& examples, GenerationConfig config);

// Generation for a tokenizer's text: stop on its eos and never sample ids past its
// vocabulary (the model's may be larger).
void stop_on_eos(GenerationConfig& config, const Tokenizer& tokenizer);

// The task's first n held-out examples (all of them when n <= 0 or n exceeds them).
std::vector<TaskExample> first_held_out(const Task& task, int64_t n);

// The response text of generated ids: the trailing stop token, if any, left out.
std::string decode_response(const Tokenizer& tokenizer, const GeneratedSequence& sequence);

}  // namespace fm
