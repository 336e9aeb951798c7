#!/usr/bin/env python3
"""Hugging Face logits parity for `foremoe import-hf` + `foremoe logits`.

For each case (tiny random Qwen3-MoE with a dense first layer, Qwen3-MoE without
top-k renormalisation, Mixtral), this script
  1. builds the model with transformers in fp32 (eager attention), re-draws every
     weight from a seeded normal (norm weights around 1) so nothing is near-trivial,
  2. saves it with save_pretrained (safetensors) into a temporary directory; where
     transformers has `save_original_format` (v5) the fused-expert layout is saved
     and imported too,
  3. runs `foremoe import-hf` and `foremoe logits` on a few random ragged sequences,
  4. runs transformers' forward on each sequence separately (fp32, no cache),
  5. reports, per case, rel_err = max|ours - hf| / max|hf| over every logit of every
     sequence (the error relative to the largest reference logit), and fails (exit 1)
     when any case exceeds --tol (default 1e-4) or any step fails.

Usage (from the repository root, after building foremoe):
  python3 bench/reference/hf_parity.py --foremoe build/tools/foremoe \
      --out bench/results/hf_parity.json --markdown bench/results/hf_parity.md
Needs torch, transformers and safetensors; no network.
"""

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
import transformers
from safetensors.torch import load_file


def accepts(fn, name):
    """True when the function takes `name` as an explicit argument."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def supported(cls, name):
    """True when the config class takes `name` as an explicit constructor argument."""
    return accepts(cls.__init__, name)


def qwen3_config(dense_first, norm_topk_prob):
    from transformers import Qwen3MoeConfig

    kw = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,  # the dense layers
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=1,
        tie_word_embeddings=False,
        attention_bias=False,
        use_sliding_window=False,
        hidden_act="silu",
    )
    # transformers >= 5.8 renamed num_experts to num_local_experts.
    kw["num_local_experts" if supported(Qwen3MoeConfig, "num_local_experts") else "num_experts"] = 8
    dense = None
    if dense_first:
        if supported(Qwen3MoeConfig, "mlp_only_layers"):
            kw["mlp_only_layers"] = [0]
            dense = [0]
        else:
            print("note: this Qwen3MoeConfig has no mlp_only_layers; testing all-MoE layers")
    if not supported(Qwen3MoeConfig, "rope_theta") and supported(Qwen3MoeConfig, "rope_parameters"):
        kw.pop("rope_theta")
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg = Qwen3MoeConfig(**kw)
    n_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    assert n_experts == 8, f"Qwen3MoeConfig did not take the expert count (got {n_experts})"
    if dense is not None:
        assert list(cfg.mlp_only_layers) == dense
    return cfg


def mixtral_config():
    from transformers import MixtralConfig

    kw = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=32,  # the experts
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=None,
        tie_word_embeddings=False,
        hidden_act="silu",
    )
    if not supported(MixtralConfig, "rope_theta") and supported(MixtralConfig, "rope_parameters"):
        kw.pop("rope_theta")
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    return MixtralConfig(**kw)


def build_model(kind, cfg, seed):
    from transformers import MixtralForCausalLM, Qwen3MoeForCausalLM

    cls = MixtralForCausalLM if kind == "mixtral" else Qwen3MoeForCausalLM
    cfg._attn_implementation = "eager"
    if hasattr(cfg, "_experts_implementation"):
        cfg._experts_implementation = "eager"  # transformers v5: the plain per-expert loop
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm gains (layernorms, q_norm, k_norm, final norm)
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def save(model, out_dir, fused):
    kw = {}
    if fused:
        kw["save_original_format"] = False
    try:
        model.save_pretrained(out_dir, safe_serialization=True, **kw)
    except TypeError:  # transformers without safe_serialization (always safetensors)
        model.save_pretrained(out_dir, **kw)
    names = sorted(os.listdir(out_dir))
    assert any(n.endswith(".safetensors") for n in names), f"no safetensors written: {names}"
    return names


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


def parity_case(args, name, kind, cfg, fused, work):
    model = build_model(kind, cfg, args.seed)
    hf_dir = os.path.join(work, name, "hf")
    ck_dir = os.path.join(work, name, "ck")
    os.makedirs(hf_dir)
    files = save(model, hf_dir, fused)
    import_out = run([args.foremoe, "import-hf", "--dir", hf_dir, "--out", ck_dir])

    g = torch.Generator().manual_seed(args.seed + 1)
    lengths = [1, 5, 17, 40, 64][: args.sequences]
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    tokens_path = os.path.join(work, name, "tokens.json")
    with open(tokens_path, "w") as f:
        json.dump(seqs, f)
    logits_path = os.path.join(work, name, "logits.safetensors")
    run([args.foremoe, "logits", "--checkpoint", ck_dir, "--tokens", tokens_path, "--out", logits_path])
    ours = load_file(logits_path)
    offsets = ours["seq_offsets"].tolist()
    assert offsets == [0] + list(torch.tensor(lengths).cumsum(0).tolist()), offsets
    assert list(ours["logits"].shape) == [offsets[-1], cfg.vocab_size], ours["logits"].shape

    max_abs_err, max_ref = 0.0, 0.0
    per_seq = []
    with torch.no_grad():
        for s, seq in enumerate(seqs):
            ids = torch.tensor([seq], dtype=torch.long, device=args.device)
            ref = model.to(args.device)(input_ids=ids, use_cache=False).logits[0].float().cpu()
            got = ours["logits"][offsets[s] : offsets[s + 1]].float()
            err = (got - ref).abs().max().item()
            per_seq.append({"length": len(seq), "max_abs_err": err, "max_abs_ref": ref.abs().max().item()})
            max_abs_err = max(max_abs_err, err)
            max_ref = max(max_ref, ref.abs().max().item())
    rel = max_abs_err / max_ref if max_ref > 0 else float("inf")
    return {
        "case": name,
        "architecture": type(model).__name__,
        "layout": "fused experts (save_original_format=False)" if fused else "default save_pretrained",
        "files": files,
        "rel_err": rel,
        "max_abs_err": max_abs_err,
        "max_abs_ref": max_ref,
        "sequences": per_seq,
        "passed": rel <= args.tol,
        "import_summary": import_out.strip().splitlines(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--foremoe", default="build/tools/foremoe", help="path to the foremoe binary")
    ap.add_argument("--out", default="hf_parity.json", help="JSON result file")
    ap.add_argument("--markdown", default=None, help="optional markdown result file")
    ap.add_argument("--tol", type=float, default=1e-4, help="max allowed rel_err per case")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--sequences", type=int, default=5, help="ragged sequences per case (<= 5)")
    ap.add_argument("--device", default="cpu", help="where transformers runs (fp32 either way)")
    ap.add_argument("--keep", default=None, help="keep the work files in this directory")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on the GPU too
    torch.backends.cudnn.allow_tf32 = False
    if not os.access(args.foremoe, os.X_OK):
        sys.exit(f"foremoe binary not found or not executable: {args.foremoe}")

    cases = [
        ("qwen3_moe_dense_first", "qwen3", lambda: qwen3_config(dense_first=True, norm_topk_prob=True)),
        ("qwen3_moe_no_topk_norm", "qwen3", lambda: qwen3_config(dense_first=False, norm_topk_prob=False)),
        ("mixtral", "mixtral", mixtral_config),
    ]
    # transformers v5 can also save experts fused (gate_up_proj); import that layout too.
    from transformers import PreTrainedModel

    fused_too = accepts(PreTrainedModel.save_pretrained, "save_original_format")
    results, failures = [], []
    work = args.keep or tempfile.mkdtemp(prefix="hf_parity_")
    os.makedirs(work, exist_ok=True)
    for name, kind, make_cfg in cases:
        for fused in [False, True] if fused_too else [False]:
            case = name + ("_fused" if fused else "")
            t0 = time.time()
            try:
                r = parity_case(args, case, kind, make_cfg(), fused, work)
            except Exception as e:  # report every case, then fail
                r = {"case": case, "error": f"{type(e).__name__}: {e}", "passed": False}
            r["seconds"] = round(time.time() - t0, 2)
            results.append(r)
            if r["passed"]:
                print(f"{case:34s} rel_err {r['rel_err']:.3e}  (max abs err {r['max_abs_err']:.3e}, "
                      f"max |logit| {r['max_abs_ref']:.3g})  ok")
            else:
                failures.append(case)
                print(f"{case:34s} FAILED: {r.get('error') or 'rel_err %.3e > %.1e' % (r['rel_err'], args.tol)}")

    report = {
        "metric": "rel_err = max|foremoe - transformers| / max|transformers| over all logits of a case",
        "tol": args.tol,
        "passed": not failures,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "device": args.device,
        "work_dir": work if args.keep else None,
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    if args.markdown:
        lines = [
            "# Hugging Face logits parity",
            "",
            f"transformers {transformers.__version__}, torch {torch.__version__}, fp32, eager attention; "
            f"`{' '.join(sys.argv)}`",
            "",
            "rel_err = max |foremoe - transformers| / max |transformers| over every logit of every sequence "
            f"(tolerance {args.tol:g}).",
            "",
            "| case | architecture | layout | rel_err | max abs err | result |",
            "|---|---|---|---|---|---|",
        ]
        for r in results:
            if "error" in r:
                lines.append(f"| {r['case']} | | | | | error: {r['error'].splitlines()[0]} |")
            else:
                lines.append(
                    f"| {r['case']} | {r['architecture']} | {r['layout']} | {r['rel_err']:.2e} | "
                    f"{r['max_abs_err']:.2e} | {'pass' if r['passed'] else 'FAIL'} |"
                )
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"FAILED: {', '.join(failures)}")
        return 1
    print(f"all {len(results)} cases within {args.tol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
