// `foremoe import-hf --dir <HF model dir> --out <checkpoint dir>`: converts a
// Qwen3-MoE or Mixtral Hugging Face model into a weights-only foremoe checkpoint.
#include <fmt/format.h>

#include <memory>

#include "model/checkpoint.h"
#include "model/config.h"
#include "model/hf_import.h"
#include "tools/foremoe/commands.h"

namespace fm::cli {

Runner add_import_hf(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "import-hf", "Import a Hugging Face Qwen3-MoE or Mixtral model as a weights-only checkpoint");
  auto dir = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  cmd->add_option("--dir", *dir, "Hugging Face model directory (config.json + safetensors)")
      ->required();
  cmd->add_option("--out", *out, "checkpoint directory to write")->required();
  return [dir, out] {
    import_hf(*dir, *out);
    const ModelConfig c = load_checkpoint_config(*out);
    const ModelCosts k = model_costs(c, c.max_seq_len);
    fmt::print("imported {} -> {}\n", *dir, *out);
    fmt::print(
        "model {}: vocab {}, {} layers ({} dense first), hidden {}, heads {}/{} x {}, qk_norm {}, "
        "rope_theta {}\n",
        c.name, c.vocab_size, c.n_layers, c.first_k_dense, c.hidden, c.n_heads, c.n_kv_heads,
        c.head_dim, c.qk_norm, c.rope_theta);
    fmt::print("experts {} top-{} (ffn {}, norm_topk_prob {}), dense ffn {}, tied embeddings {}\n",
               c.n_experts, c.top_k, c.moe_ffn, c.norm_topk_prob, c.dense_ffn, c.tie_embeddings);
    fmt::print(
        "parameters total {} ({:.2f}M), active per token {} ({:.2f}M); f32 on disk {:.2f} GiB\n",
        k.total_params, static_cast<double>(k.total_params) / 1e6, k.active_params,
        static_cast<double>(k.active_params) / 1e6,
        4.0 * static_cast<double>(k.total_params) / (1024.0 * 1024.0 * 1024.0));
    return 0;
  };
}

}  // namespace fm::cli
