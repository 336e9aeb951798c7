#!/usr/bin/env python3
"""Rollout decode with transformers' generate: the yardstick for bench_generation_gpu (issue 7).

Builds the Qwen3-MoE model of a preset (configs/models/<preset>.yaml) with transformers in bf16
on the GPU (random weights, normal with the preset's init_std), and times generate() as
bench_generation_gpu times foremoe: B prompts of --prompt random tokens, --new sampled tokens
each (temperature 1, no top-k or top-p truncation, no stop token, the KV cache on), and the
decode rate B (new - 1) / (T(new) - T(1)) so that the prefill cancels. Batches 1, 64, 256 by
default; the median of --iters timed pairs after one warm-up pair.

--export DIR saves the model (safetensors, save_pretrained) so that foremoe decodes the same
weights: `build/bench/bench_generation_gpu --hf=DIR` imports it (`foremoe import-hf`).

Presets map onto Qwen3-MoE when they have q/k norms, softmax routing and no shared experts
(mid; first_k_dense layers become mlp_only_layers). Others are refused, naming the key.

Usage (on the GPU machine, from the repository root):
  python3 bench/reference/decode_hf.py --preset mid --export /tmp/mid_hf \
      --out bench/results/decode_hf_mid.json
Prints one line per batch and writes JSON. Needs torch with CUDA and transformers; no network.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

from hf_parity import supported
from presets import preset_block


def qwen3_config(root, preset):
    """The transformers Qwen3MoeConfig equal to the preset, or exit naming what does not map."""
    from transformers import Qwen3MoeConfig

    keys = ("vocab_size", "hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim", "n_experts",
            "top_k", "moe_ffn", "max_seq_len")
    p = preset_block(root, preset, keys)
    where = f"configs/models/{preset}.yaml"
    if int(p.get("n_shared_experts", "0")) != 0:
        sys.exit(f"{where}: model.n_shared_experts is {p['n_shared_experts']}; Qwen3-MoE has none")
    if p.get("qk_norm", "false") != "true":
        sys.exit(f"{where}: model.qk_norm is not true; Qwen3-MoE always normalises q and k")
    if p.get("router_score", "softmax") != "softmax":
        sys.exit(f"{where}: model.router_score is {p['router_score']}; Qwen3-MoE routes by softmax")
    dense = int(p.get("first_k_dense", "0"))
    kw = dict(
        vocab_size=int(p["vocab_size"]),
        hidden_size=int(p["hidden"]),
        intermediate_size=int(p.get("dense_ffn", p["moe_ffn"])),
        moe_intermediate_size=int(p["moe_ffn"]),
        num_hidden_layers=int(p["n_layers"]),
        num_attention_heads=int(p["n_heads"]),
        num_key_value_heads=int(p["n_kv_heads"]),
        head_dim=int(p["head_dim"]),
        max_position_embeddings=int(p["max_seq_len"]),
        rope_theta=float(p.get("rope_theta", "10000")),
        rms_norm_eps=float(p.get("rms_eps", "1e-6")),
        num_experts_per_tok=int(p["top_k"]),
        norm_topk_prob=p.get("norm_topk_prob", "true") == "true",
        decoder_sparse_step=1,
        tie_word_embeddings=p.get("tie_embeddings", "false") == "true",
        attention_bias=False,
        use_sliding_window=False,
        hidden_act="silu",
        initializer_range=float(p.get("init_std", "0.02")),
    )
    # transformers >= 5.8 renamed num_experts to num_local_experts.
    experts_key = "num_local_experts" if supported(Qwen3MoeConfig, "num_local_experts") else "num_experts"
    kw[experts_key] = int(p["n_experts"])
    if dense:
        if not supported(Qwen3MoeConfig, "mlp_only_layers"):
            sys.exit(f"{where}: model.first_k_dense is {dense}; this Qwen3MoeConfig has no mlp_only_layers")
        kw["mlp_only_layers"] = list(range(dense))
    if not supported(Qwen3MoeConfig, "rope_theta") and supported(Qwen3MoeConfig, "rope_parameters"):
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    return Qwen3MoeConfig(**kw)


def timed_generate(model, prompts, new_tokens):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            eos_token_id=None,
            pad_token_id=0,
            use_cache=True,
        )
    torch.cuda.synchronize()
    assert out.shape[1] == prompts.shape[1] + new_tokens, f"generated {out.shape[1] - prompts.shape[1]} tokens"
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (bench_generation_gpu: 128)")
    ap.add_argument("--new", type=int, default=128, help="new tokens (bench_generation_gpu: 128)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--export", help="save the model here (safetensors) for bench_generation_gpu --hf")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", ".."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_hf.py: no CUDA device visible")
    if args.new < 2:
        sys.exit("decode_hf.py: --new must be >= 2 (the rate is over new - 1 decode steps)")

    import transformers
    from transformers import Qwen3MoeForCausalLM

    cfg = qwen3_config(args.root, args.preset)
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    if args.export:
        model.save_pretrained(args.export)
    experts_impl = getattr(model.config, "_experts_implementation", None)
    attn_impl = getattr(model.config, "_attn_implementation", None)

    g = torch.Generator(device="cpu").manual_seed(args.seed)
    rows = []
    for batch in args.batch:
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt), generator=g).cuda()
        timed_generate(model, prompts, args.new)  # warm-up
        timed_generate(model, prompts, 1)
        diffs = [timed_generate(model, prompts, args.new) - timed_generate(model, prompts, 1)
                 for _ in range(args.iters)]
        decode_s = statistics.median(diffs)
        tokens = batch * (args.new - 1)
        row = {
            "batch": batch,
            "decode_s": decode_s,
            "tokens_per_s": tokens / decode_s,
            "ms_per_step": 1e3 * decode_s / (args.new - 1),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        rows.append(row)
        print(f"{args.preset} batch {batch}: {row['tokens_per_s']:.0f} tokens/s, "
              f"{row['ms_per_step']:.2f} ms/step", flush=True)

    result = {
        "preset": args.preset,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "dtype": "bf16",
        "attn_implementation": attn_impl,
        "experts_implementation": experts_impl,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(),
        "exported_to": args.export,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
