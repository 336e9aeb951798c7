// Checkpoints: a directory holding model.safetensors (parameters by name),
// optimizer.safetensors (AdamW moments), state.safetensors (router-balancing
// state) and manifest.json (format, versions, git revision, step, optimizer
// counters, RNG states, the model config, caller-supplied run info and the
// SHA-256 of every file). Written into a temporary directory and renamed into
// place, so a killed writer leaves the previous checkpoint intact.
//
// A weights-only checkpoint (manifest "weights_only": true) holds only
// model.safetensors and manifest.json: what `foremoe import-hf` and save_weights
// write. It starts a run or serves inference (load_weights) but cannot resume
// training (load_checkpoint refuses it).
//
// Expert parallelism (model/expert_parallel.h): every function below that takes a model
// is then a collective over model.ep_comm() (every rank calls it with the same dir), and a
// checkpoint is the same single-rank checkpoint whatever the world size W (expert tensors
// [E, ...]): the files rank 0 of W ranks writes are byte for byte those of one rank holding
// the same weights, moments and state, and they load at any W that divides n_experts.
//   save: rank 0 writes (the other ranks send it their experts, one tensor at a time, and
//         write nothing); if rank 0 fails, every rank throws an error naming dir and problem.
//   load: every rank reads and verifies the files and takes the replicated tensors whole and
//         its home experts' slice; if any rank fails, every rank throws (the failing rank its
//         own error, the others one naming the failing rank).
#pragma once

#include <cstdint>
#include <functional>
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
// The inverse of model_config_json, validated by the one YAML loader
// (ModelConfig::from_yaml; JSON is YAML): errors name `origin` and the key.
ModelConfig model_config_from_json(const nlohmann::json& j, const std::string& origin);

// Under expert parallelism the step, RNG states and run info written are rank 0's.
void save_checkpoint(const std::string& dir, MoeTransformer& model, AdamW& optimizer,
                     const CheckpointInfo& info);

// Verifies checksums and that the stored model config equals the model's, then
// restores parameters, optimizer state and balancing state. Errors name the
// file and the problem; on error the model may be partially loaded.
// Refuses a weights-only checkpoint.
CheckpointInfo load_checkpoint(const std::string& dir, MoeTransformer& model, AdamW& optimizer);

// Writes a weights-only checkpoint of the model's parameters. `extra` (a JSON
// object) is merged into the manifest (e.g. {"source": "hf", ...}).
void save_weights(const std::string& dir, MoeTransformer& model,
                  const nlohmann::json& extra = nlohmann::json::object());
// The same for a writer that produces model.safetensors itself (the Hugging Face
// importer streams it tensor by tensor): `write_params(path)` must write the file
// at `path` with every parameter of `config` as f32.
void save_weights_with(const std::string& dir, const ModelConfig& config,
                       const std::function<void(const std::string& path)>& write_params,
                       const nlohmann::json& extra = nlohmann::json::object());

// The model config stored in a checkpoint's manifest (full or weights-only),
// validated like a YAML model config, so a command can build the model first.
ModelConfig load_checkpoint_config(const std::string& dir);

// Restores the parameters of a full or weights-only checkpoint after verifying
// the manifest and the checksum of model.safetensors. The model's config must
// agree with the stored one in every key that shapes or computes the model;
// name, max_seq_len, init_std and router_balance may differ (a run may start
// from imported weights with its own balancing). When the checkpoint carries
// router-balancing state and the balancing config is the same, that state
// (e.g. the loss_free bias) is restored too; otherwise it is left as it is.
void load_weights(const std::string& dir, MoeTransformer& model);

}  // namespace fm
