// Batched autoregressive generation with a KV cache: the rollout engine's core.
//
// Prompts are admitted into KV-cache slots as slots free up (continuous
// batching). Each step runs one cached forward over every live sequence's
// unfed tokens -- a whole prompt for a newly admitted one (prefill), one token
// otherwise (decode) -- and samples the next token of each. A sequence ends on
// a stop token or after max_new_tokens; its final token is fed once more so
// the routing trace covers every token, prompt and response.
//
// Reproducible: sequence i draws from Rng(seed, stream i), so its tokens do not
// depend on which other sequences share its steps.
#pragma once

#include <cstdint>
#include <vector>

#include "balancer/routing_trace.h"
#include "model/moe_transformer.h"
#include "model/sampling.h"

namespace fm {

class ConfigNode;

struct GenerationConfig {
  SamplingConfig sampling;
  int64_t max_new_tokens = 64;
  int64_t batch_slots = 64;  // sequences decoded together (KV-cache slots)
  uint64_t seed = 0;
  std::vector<int32_t> stop_tokens;  // e.g. the tokenizer's eos (set by the caller)

  // Reads temperature, top_p, top_k, max_new_tokens, batch_slots, seed.
  static GenerationConfig from_yaml(const ConfigNode& node);
};

struct GeneratedSequence {
  std::vector<int32_t> prompt;
  std::vector<int32_t> response;   // ends with the stop token when `stopped`
  std::vector<double> logp;        // [response] under the sampling distribution
  std::vector<double> model_logp;  // [response] under the model at temperature 1
  bool stopped = false;            // ended on a stop token (else by length)
  RoutingTrace routes;             // one sequence: prompt + response tokens
};

struct GenerationStats {
  int64_t steps = 0;
  int64_t prefill_tokens = 0;  // prompt tokens fed
  int64_t decode_tokens = 0;   // generated tokens fed
  int64_t kv_cache_bytes = 0;
};

std::vector<GeneratedSequence> generate(MoeTransformer& model,
                                        const std::vector<std::vector<int32_t>>& prompts,
                                        const GenerationConfig& config,
                                        GenerationStats* stats = nullptr);

// The per-sequence traces packed into one (sequence order kept).
RoutingTrace pack_traces(const std::vector<GeneratedSequence>& sequences);

}  // namespace fm
