// `foremoe logits --checkpoint <dir> --tokens <file.json> --out <file.safetensors>`:
// the CPU f32 forward over token sequences (JSON: a list of token-id lists),
// written as `logits` f32 [N, V] over the packed tokens and `seq_offsets` i64 [S + 1].
// The HF parity script (bench/reference/hf_parity.py) compares these with transformers.
#include <fmt/format.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "engine/backend.h"
#include "engine/error.h"
#include "engine/files.h"
#include "engine/safetensors.h"
#include "model/checkpoint.h"
#include "model/moe_transformer.h"
#include "tools/foremoe/commands.h"

namespace fm::cli {

// A list of non-empty lists of token ids, packed; targets are -1 (no log-probs needed).
static Batch read_token_lists(const std::string& path, int64_t vocab_size) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{}: not valid JSON ({})", path, e.what()));
  }
  FM_CHECK(j.is_array() && !j.empty(), "{}: expected a non-empty list of token-id lists", path);
  Batch b;
  b.seq_offsets.push_back(0);
  for (size_t s = 0; s < j.size(); ++s) {
    FM_CHECK(j[s].is_array() && !j[s].empty(), "{}: sequence {} must be a non-empty list", path, s);
    for (const nlohmann::json& t : j[s]) {
      FM_CHECK(t.is_number_integer() && t.get<int64_t>() >= 0 && t.get<int64_t>() < vocab_size,
               "{}: sequence {}: {} is not a token id of the model (vocab_size {})", path, s,
               t.dump(), vocab_size);
      b.tokens.push_back(static_cast<int32_t>(t.get<int64_t>()));
      b.targets.push_back(-1);
    }
    b.seq_offsets.push_back(b.size());
  }
  return b;
}

Runner add_logits(CLI::App& app) {
  auto* cmd = app.add_subcommand("logits", "CPU f32 forward logits of token sequences");
  auto ckpt = std::make_shared<std::string>();
  auto tokens = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  cmd->add_option("--checkpoint", *ckpt, "checkpoint directory (full or weights-only)")->required();
  cmd->add_option("--tokens", *tokens, "JSON file: a list of token-id lists")->required();
  cmd->add_option("--out", *out, "safetensors file to write (logits, seq_offsets)")->required();
  return [ckpt, tokens, out] {
    const ModelConfig c = load_checkpoint_config(*ckpt);
    const Batch batch = read_token_lists(*tokens, c.vocab_size);
    auto backend = make_cpu_backend();
    MoeTransformer model(c, *backend);
    load_weights(*ckpt, model);
    ForwardOptions opts;
    opts.training = false;
    opts.lm_head_rows = kLmHeadWhole;  // the output is the whole [N, V]
    model.forward(batch, opts);
    Tensor logits = backend->to_host(model.logits());
    Tensor offsets = Tensor::empty({static_cast<int64_t>(batch.seq_offsets.size())}, DType::i64);
    std::copy(batch.seq_offsets.begin(), batch.seq_offsets.end(), offsets.data<int64_t>());
    write_safetensors(*out, {{"logits", logits}, {"seq_offsets", offsets}});
    fmt::print("logits [{}, {}] of {} sequences -> {}\n", batch.size(), c.vocab_size,
               batch.seq_offsets.size() - 1, *out);
    return 0;
  };
}

}  // namespace fm::cli
