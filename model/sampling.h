// Next-token sampling: temperature, top-k, top-p (nucleus) and greedy, on one
// row of logits. Pure host code: the distribution is explicit so tests can
// check it, and a draw is a function of (logits, config, u) only.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "engine/backend.h"

namespace fm {

class ConfigNode;

struct SamplingConfig {
  double temperature = 1.0;  // 0 = greedy (argmax, lowest id on ties)
  double top_p = 1.0;        // keep the smallest most-likely set with mass >= top_p
  int64_t top_k = 0;         // keep the k most likely tokens; 0 = all
  // Set by the caller, not read from YAML: ids >= vocab_limit are never sampled (a
  // tokenizer with fewer pieces than the model's vocabulary); 0 = no limit.
  int64_t vocab_limit = 0;

  bool greedy() const { return temperature == 0.0; }
  // Reads `temperature`, `top_p`, `top_k` of `node` (the generation mapping).
  static SamplingConfig from_yaml(const ConfigNode& node);
};

// The distribution generation samples from: softmax(logits / temperature) over the ids
// below vocab_limit (all when 0), restricted
// to the top_k most likely tokens, then to the smallest prefix (by descending
// probability) whose mass reaches top_p, renormalised. Entries (token, probability):
// in id order when nothing is truncated, else in descending probability with ties to
// the lower id. Greedy: the argmax with probability 1.
std::vector<std::pair<int32_t, double>> sampling_distribution(const double* logits, int64_t V,
                                                              const SamplingConfig& config);

struct SampledToken {
  int32_t id = 0;
  double logp = 0.0;        // log-probability under the sampling distribution
  double model_logp = 0.0;  // log softmax(logits)[id]: the model at temperature 1, untruncated
};

// Draws from sampling_distribution with the uniform u in [0, 1) (inverse CDF over the
// entries in their order).
SampledToken sample_token(const double* logits, int64_t V, const SamplingConfig& config, double u);

// sample_token for every row of logits [R, V] (on `backend`) with its uniform u[r]. On a
// backend that samples on the device (Backend::sample_rows) only the R results come back;
// otherwise the logits are downloaded and drawn here. The two agree up to summation
// rounding (a u within rounding of a CDF step may pick the neighbouring token).
std::vector<SampledToken> sample_rows(Backend& backend, const Tensor& logits,
                                      const std::vector<double>& u, const SamplingConfig& config);

}  // namespace fm
