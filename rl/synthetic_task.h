// A synthetic next-token task for CPU training runs and tests. Each sequence
// follows one of `n_maps` fixed random permutations of the first `symbols`
// token ids: x_{t+1} = map_j(x_t), j and x_0 drawn per sequence. The next token
// is predictable only from context (which map) plus a learnt table (the maps),
// so a working model drives the loss from ln(vocab) towards the floor
// optimal_loss(): ln(n_maps) for the first transition, ~0 after it.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/rng.h"
#include "model/moe_transformer.h"
#include "rl/lm_data.h"

namespace fm {

class ConfigNode;

struct SyntheticTaskConfig {
  int64_t symbols = 24;
  int64_t n_maps = 3;
  // Reads and validates the `task:` mapping; symbols must fit the model's vocabulary.
  static SyntheticTaskConfig from_yaml(const ConfigNode& node, int64_t vocab_size);
};

class SyntheticNextTokenTask : public LmDataSource {
 public:
  SyntheticNextTokenTask(SyntheticTaskConfig config, uint64_t seed);

  // n_sequences packed sequences of seq_len tokens; targets are the next token (-1 at the end).
  Batch sample(Rng& rng, int64_t n_sequences, int64_t seq_len) const override;
  // Expected loss of the Bayes-optimal predictor, per target token.
  double optimal_loss(int64_t seq_len) const;
  const std::vector<std::vector<int32_t>>& maps() const { return maps_; }

 private:
  SyntheticTaskConfig config_;
  std::vector<std::vector<int32_t>> maps_;
};

}  // namespace fm
