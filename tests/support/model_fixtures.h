// Small models and batches shared by the model and rl tests.
#pragma once

#include <string>

#include "engine/config.h"
#include "engine/rng.h"
#include "model/config.h"
#include "model/moe_transformer.h"

namespace fm::testing {

// A model small enough for finite differences that still has every part: a dense
// first layer, GQA with q/k norm, MoE layers with a shared expert, untied head.
inline ModelConfig micro_config(
    const std::string& balance_yaml = "method: switch_aux\n    alpha: 0.1") {
  const std::string yaml = R"(model:
  name: micro
  vocab_size: 32
  hidden: 16
  n_layers: 3
  n_heads: 2
  n_kv_heads: 1
  head_dim: 8
  qk_norm: true
  n_experts: 4
  top_k: 2
  moe_ffn: 8
  n_shared_experts: 1
  shared_ffn: 8
  first_k_dense: 1
  dense_ffn: 16
  max_seq_len: 64
  init_std: 0.3
  router_balance:
    )" + balance_yaml + "\n";
  const ConfigNode root = ConfigNode::parse(yaml, "<micro config>");
  ModelConfig c = ModelConfig::from_yaml(root.child("model"));
  root.finish();
  return c;
}

// Random packed sequences of the given lengths; targets are the next token.
inline Batch random_batch(const ModelConfig& c, const std::vector<int64_t>& lengths,
                          uint64_t seed) {
  Rng rng(seed, 77);
  Batch b;
  b.seq_offsets.push_back(0);
  for (int64_t len : lengths) {
    const int64_t start = b.size();
    for (int64_t t = 0; t < len; ++t)
      b.tokens.push_back(static_cast<int32_t>(rng.next_below(static_cast<uint64_t>(c.vocab_size))));
    for (int64_t t = 0; t < len; ++t)
      b.targets.push_back(t + 1 < len ? b.tokens[start + t + 1] : -1);
    b.seq_offsets.push_back(b.size());
  }
  return b;
}

}  // namespace fm::testing
