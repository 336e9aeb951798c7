// `foremoe info --config <model>`: parameter counts, FLOPs per token and
// training memory of a model config.
#include <fmt/format.h>

#include <memory>

#include "model/config.h"
#include "tools/foremoe/commands.h"

namespace fm::cli {

static std::string human(double v) {
  const char* unit[] = {"", "K", "M", "G", "T", "P"};
  int i = 0;
  while (v >= 1000.0 && i < 5) {
    v /= 1000.0;
    ++i;
  }
  return fmt::format("{:.3g}{}", v, unit[i]);
}

static std::string gib(double bytes) {
  return fmt::format("{:.2f} GiB", bytes / (1024.0 * 1024.0 * 1024.0));
}

Runner add_info(CLI::App& app) {
  auto* cmd = app.add_subcommand("info", "Parameter counts, FLOPs per token and memory of a model");
  auto config = std::make_shared<std::string>("tiny");
  auto seq_len = std::make_shared<int64_t>(4096);
  cmd->add_option("-c,--config", *config,
                  "model YAML file or preset name (tiny, small, mid, qwen3-30b-a3b)")
      ->capture_default_str();
  cmd->add_option("--seq-len", *seq_len, "sequence length for attention FLOPs")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  return [config, seq_len] {
    const ModelConfig c = ModelConfig::load(*config);
    const ModelCosts k = model_costs(c, std::min(*seq_len, c.max_seq_len));
    const double P = static_cast<double>(k.total_params);
    fmt::print("model {}: {} layers ({} MoE), hidden {}, {} experts top-{} (ffn {}), {} shared\n",
               c.name, c.n_layers, c.n_moe_layers(), c.hidden, c.n_experts, c.top_k, c.moe_ffn,
               c.n_shared_experts);
    fmt::print("parameters        total {:>10} ({})   active per token {:>10} ({})\n", human(P),
               k.total_params, human(static_cast<double>(k.active_params)), k.active_params);
    fmt::print("  embeddings      {:>10}   non-embedding total {}\n",
               human(static_cast<double>(k.embedding_params)),
               human(P - static_cast<double>(k.embedding_params)));
    fmt::print("FLOPs per token   forward {:>10}   training (fwd+bwd) {:>10}   at seq_len {}\n",
               human(k.forward_flops_per_token), human(k.training_flops_per_token), k.seq_len);
    fmt::print("memory            weights fp32 {}  bf16 {}\n", gib(4 * P), gib(2 * P));
    fmt::print("                  gradients fp32 {}  AdamW state (m, v fp32) {}\n", gib(4 * P),
               gib(8 * P));
    fmt::print("                  training total (fp32 master + bf16 copy + grads + AdamW) {}\n",
               gib(18 * P));
    return 0;
  };
}

}  // namespace fm::cli
