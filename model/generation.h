// Batched autoregressive generation with a KV cache: the rollout engine's core.
//
// Prompts are admitted into KV-cache slots as slots free up (continuous
// batching). Each step runs one cached forward over every live sequence's
// unfed tokens -- a whole prompt for a newly admitted one (prefill), one token
// otherwise (decode) -- and samples the next token of each. A sequence ends on
// a stop token or after max_new_tokens; its final token is fed once more so
// the routing trace covers every token, prompt and response.
//
// Reproducible: sequence i draws from Rng(seed, stream first_stream + i), so its
// tokens do not depend on which other sequences share its steps.
//
// Expert parallelism (model/expert_parallel.h): generate() is a collective. Every rank
// calls it with its own prompts (any number, zero included) and decodes them on the home
// experts: the ranks step in lockstep, one cached forward each per step (whose MoE layers
// exchange tokens with every rank), until no rank has work left (one small all-reduce per
// step). A rank without live sequences feeds one throw-away token that changes no result.
// A rank whose prompts are the global prompts [o, o + n) passes first_stream = o: the W
// ranks then sample what one rank samples for all prompts (up to float rounding of the
// expert math). Prompts and config are checked on every rank before the first step: if one
// rank's are bad, every rank throws (that rank its own error, the others one naming it).
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
  // Sequence i draws from random stream first_stream + i: under expert parallelism the
  // global index of this rank's first prompt (set by the caller, not read from YAML).
  uint64_t first_stream = 0;

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

// This rank's counts (under expert parallelism each rank reports its own sequences).
struct GenerationStats {
  int64_t steps = 0;           // cached forwards (under EP the same on every rank)
  int64_t idle_steps = 0;      // EP: steps with no live sequence here (one throw-away token)
  int64_t prefill_tokens = 0;  // prompt tokens fed
  int64_t decode_tokens = 0;   // generated tokens fed (throw-away tokens not counted)
  int64_t kv_cache_bytes = 0;  // this rank's cache
};

std::vector<GeneratedSequence> generate(MoeTransformer& model,
                                        const std::vector<std::vector<int32_t>>& prompts,
                                        const GenerationConfig& config,
                                        GenerationStats* stats = nullptr);

// The per-sequence traces packed into one (sequence order kept).
RoutingTrace pack_traces(const std::vector<GeneratedSequence>& sequences);

}  // namespace fm
