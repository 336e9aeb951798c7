#include "rl/synthetic_task.h"

#include <cmath>
#include <numeric>

#include "engine/config.h"

namespace fm {

SyntheticTaskConfig SyntheticTaskConfig::from_yaml(const ConfigNode& n, int64_t vocab_size) {
  SyntheticTaskConfig c;
  c.symbols = n.get<int64_t>("symbols", c.symbols);
  c.n_maps = n.get<int64_t>("n_maps", c.n_maps);
  if (c.symbols < 2 || c.symbols > vocab_size)
    n.fail("symbols",
           fmt::format("must be in [2, vocab_size = {}] (got {})", vocab_size, c.symbols));
  if (c.n_maps < 1 || c.n_maps > 1024)
    n.fail("n_maps", fmt::format("must be in [1, 1024] (got {})", c.n_maps));
  return c;
}

SyntheticNextTokenTask::SyntheticNextTokenTask(SyntheticTaskConfig config, uint64_t seed)
    : config_(config) {
  Rng rng(seed, /*stream=*/0x7a5c);
  for (int64_t j = 0; j < config_.n_maps; ++j) {
    std::vector<int32_t> perm(static_cast<size_t>(config_.symbols));
    std::iota(perm.begin(), perm.end(), 0);
    for (size_t i = perm.size() - 1; i > 0; --i)  // Fisher-Yates
      std::swap(perm[i], perm[rng.next_below(i + 1)]);
    maps_.push_back(std::move(perm));
  }
}

Batch SyntheticNextTokenTask::sample(Rng& rng, int64_t n_sequences, int64_t seq_len) const {
  Batch b;
  b.seq_offsets.push_back(0);
  for (int64_t s = 0; s < n_sequences; ++s) {
    const auto& map = maps_[rng.next_below(maps_.size())];
    int32_t x = static_cast<int32_t>(rng.next_below(static_cast<uint64_t>(config_.symbols)));
    for (int64_t t = 0; t < seq_len; ++t) {
      b.tokens.push_back(x);
      x = map[x];
      b.targets.push_back(t + 1 < seq_len ? x : -1);
    }
    b.seq_offsets.push_back(b.size());
  }
  return b;
}

double SyntheticNextTokenTask::optimal_loss(int64_t seq_len) const {
  // The first transition reveals the map (up to collisions, ignored here): ln(n_maps) once
  // per sequence, then certainty.
  return std::log(static_cast<double>(config_.n_maps)) / static_cast<double>(seq_len - 1);
}

}  // namespace fm
