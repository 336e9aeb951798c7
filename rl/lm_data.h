// Where a next-token run's training sequences come from: the synthetic task
// (rl/synthetic_task.h) or a tokenized text corpus (rl/text_corpus.h).
#pragma once

#include <cstdint>

#include "engine/rng.h"
#include "model/moe_transformer.h"

namespace fm {

class LmDataSource {
 public:
  virtual ~LmDataSource() = default;
  // n_sequences packed sequences of seq_len tokens each, drawn with `rng` only (so a run
  // that restores the stream's offset continues with the same data).
  virtual Batch sample(Rng& rng, int64_t n_sequences, int64_t seq_len) const = 0;
};

}  // namespace fm
