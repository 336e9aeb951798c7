// Rollout and recompute: the first and third stages of an RL step.
//
// rollout() takes train_batch_size prompts from a task's training stream, samples
// n responses for each (a group) and decodes them; score_samples() rewards them. Every sample keeps
// its routing trace. pack_samples() lays samples out as one packed Batch for the recompute and
// update forwards, with the rollout's routing to replay and the response mask. Position t of the
// packed batch predicts token t + 1, so the response mask marks the positions whose target is a
// response token:
//   prompt p_0 .. p_{P-1}, response y_0 .. y_{R-1}:  mask = 1 at positions P-1 .. P+R-2.
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

struct RolloutSample {
  int64_t group = 0;  // index of its prompt within the rollout
  TaskExample example;
  GeneratedSequence sequence;
  std::string response;  // decoded, stop token left out
  Reward reward;         // filled by score_samples (the reward stage)
};

struct RolloutRequest {
  uint64_t first_example = 0;  // training examples [first, first + prompts)
  int64_t prompts = 0;         // train_batch_size
  int64_t samples = 1;         // rollout.n
};

std::vector<RolloutSample> rollout(MoeTransformer& model, const Tokenizer& tokenizer,
                                   const PromptTemplate& prompt_template, const Task& task,
                                   const RolloutRequest& request, GenerationConfig config);

// The reward stage: each sample's task reward.
void score_samples(const Task& task, std::vector<RolloutSample>& samples);

struct PackedSamples {
  Batch batch;                         // tokens, next-token targets, sequence offsets
  RoutingTrace routes;                 // the rollout's routing, to replay
  std::vector<uint8_t> response_mask;  // [N] 1 where the target is a response token
  std::vector<double> rollout_logp;    // [N] the sampler's model log-prob there (0 elsewhere)
};

// Samples [begin, end) of `samples`, packed in order.
PackedSamples pack_samples(const std::vector<RolloutSample>& samples, size_t begin, size_t end);
// The samples at `indices`, packed in that order.
PackedSamples pack_samples(const std::vector<RolloutSample>& samples,
                           const std::vector<size_t>& indices);

// Log-probs and entropies of every position under the model, routing replayed from
// the rollout (the old-policy / reference recompute). training = false: no router
// statistics are accumulated. `placements`: the balancer's plans (null: every token at home).
const ForwardResult& recompute(MoeTransformer& model, const PackedSamples& packed,
                               const std::vector<LayerPlacement>* placements = nullptr);

// max over response positions of |recomputed - rollout| log-prob: how users spot a
// mismatch between the sampler and the trainer.
double max_logprob_gap(const PackedSamples& packed, const std::vector<double>& logp);

}  // namespace fm
