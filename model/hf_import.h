// Hugging Face import: a Qwen3-MoE (Qwen3MoeForCausalLM) or Mixtral
// (MixtralForCausalLM) model directory — config.json plus model.safetensors or
// model.safetensors.index.json with its shards — becomes a weights-only foremoe
// checkpoint (see checkpoint.h) in f32.
//
// Name and layout mapping (HF -> foremoe; L = layer, E = expert):
//   embed_tokens, norm, lm_head, self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm,
//   input_layernorm, post_attention_layernorm, Qwen3 dense mlp.{gate,up,down}_proj:
//       the same names and layouts (RoPE is rotate_half in both)
//   Qwen3    model.layers.L.mlp.gate.weight                -> model.layers.L.mlp.gate.weight
//            model.layers.L.mlp.experts.E.gate_proj.weight -> mlp.experts.gate_proj[E]  [E, F, H]
//            (up_proj, down_proj likewise; down_proj is [E, H, F])
//   Mixtral  model.layers.L.block_sparse_moe.gate.weight   -> model.layers.L.mlp.gate.weight
//            block_sparse_moe.experts.E.w1 / w3 / w2       -> mlp.experts.gate_proj / up_proj /
//                                                             down_proj [E]
//   transformers v5 fused experts (either architecture, module named mlp):
//            mlp.experts.gate_up_proj [E, 2F, H] (gate rows first) -> gate_proj, up_proj
//            mlp.experts.down_proj [E, H, F]                       -> down_proj
// bf16, f16 and f32 tensors are converted to f32 (exactly: every bf16/f16 value is an f32).
// Every shape is checked against the config; a missing tensor, a missing shard or a
// tensor nothing maps to is an error naming it (rotary inv_freq buffers are ignored,
// and so is lm_head.weight when tie_word_embeddings is set).
//
// Memory: the output is streamed to model.safetensors one parameter at a time, so the
// import holds at most one output parameter (the largest is one layer's stacked
// experts, E * F * H * 4 bytes) plus one source tensor in its own dtype — not the model.
// Disk: the f32 checkpoint (4 bytes per parameter) beside the source.
#pragma once

#include <string>

#include "model/config.h"

namespace fm {

// The foremoe config of the model in `<dir>/config.json`, named after the directory.
// Refuses (naming the key and value) other architectures, rope scaling, attention
// biases, sliding-window attention, activations other than silu, and dense/MoE layer
// patterns other than "dense layers first" (mlp_only_layers = [0, k), decoder_sparse_step 1).
ModelConfig hf_model_config(const std::string& dir);

// Imports the HF model in `hf_dir` into a weights-only checkpoint at `out_dir`
// (written to a temporary directory and renamed; nothing is left behind on error).
// The manifest records source "hf", the architecture, the directory and the HF config.
void import_hf(const std::string& hf_dir, const std::string& out_dir);

}  // namespace fm
