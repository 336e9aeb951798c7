// Checkpoints: a directory holding model.safetensors (parameters by name),
// optimizer.safetensors (AdamW moments), state.safetensors (router-balancing
// state) and manifest.json (format, versions, git revision, step, optimizer
// counters, RNG states, the model config, caller-supplied run info and the
// SHA-256 of every file). Written into a temporary directory and renamed into
// place, so a killed writer leaves the previous checkpoint intact.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/moe_transformer.h"
#include "model/optimizer.h"

namespace fm {

struct RngState {
  std::string name;
  uint64_t seed = 0, stream = 0, offset = 0;
};

struct CheckpointInfo {
  int64_t step = 0;            // optimizer steps completed
  std::vector<RngState> rngs;  // every random stream the run needs to continue exactly
  nlohmann::json run;          // caller's own record (e.g. the training config)
};

nlohmann::json model_config_json(const ModelConfig& c);

void save_checkpoint(const std::string& dir, MoeTransformer& model, AdamW& optimizer,
                     const CheckpointInfo& info);

// Verifies checksums and that the stored model config equals the model's, then
// restores parameters, optimizer state and balancing state. Errors name the
// file and the problem; on error the model may be partially loaded.
CheckpointInfo load_checkpoint(const std::string& dir, MoeTransformer& model, AdamW& optimizer);

}  // namespace fm
