#!/usr/bin/env python3
"""PyTorch reference for the MoE layer benchmark (issue 7: target >= 1.5x the best PyTorch form).

The layer is foremoe's routed MoE block (model/src/moe_block.cpp) without the shared expert:
  probs = softmax(x @ Wr^T)                 router [E, H], fp32 softmax
  ids, p = top-k(probs)                     K experts per token, p renormalised when
                                            norm_topk_prob (every preset sets it)
  y = sum_k p_k * down_e(silu(gate_e(x)) * up_e(x))   expert e: gate/up [F, H], down [H, F]
and it is timed forward + backward (the loss is sum(y * dy) with a fixed random dy) in two forms:
  loop     per-expert Python loop with index_select / index_add_, as Hugging Face's
           Qwen3-MoE and Mixtral blocks do;
  grouped  tokens sorted by expert, one grouped GEMM per projection: torch._grouped_mm where
           this PyTorch has it (bf16, Hopper), else a padded torch.bmm over [E, cap, H].
Dimensions come from configs/models/<preset>.yaml (hidden, n_experts, top_k, moe_ffn).

Usage (on the GPU machine, from the repository root):
  python3 bench/reference/moe_layer_torch.py --preset small --tokens 16384 \
      --out bench/results/moe_layer_torch_small.json
Prints one line per form: tokens/s, ms per fwd+bwd, achieved TFLOP/s (6 * active expert
params * tokens plus the router), and writes the JSON. Needs torch with CUDA; no network.
--device cpu runs the same code on the CPU (the padded-bmm grouped form; a smoke check of the
script at a small --tokens, not a figure: the JSON then says device "cpu").
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from presets import preset_block


def read_preset(root, name):
    """The MoE layer's dimensions from configs/models/<name>.yaml."""
    out = preset_block(root, name, ("hidden", "n_experts", "top_k", "moe_ffn"))
    return {
        "H": int(out["hidden"]),
        "E": int(out["n_experts"]),
        "K": int(out["top_k"]),
        "F": int(out["moe_ffn"]),
        "norm_topk_prob": out.get("norm_topk_prob", "true") == "true",
    }


class Weights:
    def __init__(self, d, dtype, device, seed):
        g = torch.Generator(device="cpu").manual_seed(seed)

        def param(*shape, std):
            t = torch.randn(*shape, generator=g) * std
            return t.to(device=device, dtype=dtype).requires_grad_(True)

        H, E, F_ = d["H"], d["E"], d["F"]
        self.router = param(E, H, std=0.02)
        self.gate = param(E, F_, H, std=H ** -0.5)
        self.up = param(E, F_, H, std=H ** -0.5)
        self.down = param(E, H, F_, std=F_ ** -0.5)

    def params(self):
        return [self.router, self.gate, self.up, self.down]


def route(x, w, d):
    logits = x @ w.router.t()
    probs = torch.softmax(logits.float(), dim=-1)
    p, ids = torch.topk(probs, d["K"], dim=-1)
    if d["norm_topk_prob"]:
        p = p / p.sum(dim=-1, keepdim=True)
    return p.to(x.dtype), ids


def moe_loop(x, w, d):
    """Hugging Face's form: a Python loop over experts that received tokens."""
    p, ids = route(x, w, d)
    y = torch.zeros_like(x)
    mask = F.one_hot(ids, d["E"]).permute(2, 1, 0)  # [E, K, N]
    hit = torch.nonzero(mask.sum(dim=(1, 2)) > 0).flatten().tolist()
    for e in hit:
        k, tok = torch.where(mask[e])
        xe = x[tok]
        h = F.silu(xe @ w.gate[e].t()) * (xe @ w.up[e].t())
        ye = (h @ w.down[e].t()) * p[tok, k, None]
        y.index_add_(0, tok, ye)
    return y


USE_GROUPED_MM = True  # cleared when torch._grouped_mm refuses this device or layout


def grouped_mm_available(dtype):
    return USE_GROUPED_MM and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16


def moe_grouped(x, w, d):
    """Tokens sorted by expert, one grouped GEMM per projection."""
    N, H = x.shape
    E, K = d["E"], d["K"]
    p, ids = route(x, w, d)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    tok = order // K
    counts = torch.bincount(flat, minlength=E)
    xs = x[tok]
    if grouped_mm_available(x.dtype):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        gate = torch._grouped_mm(xs, w.gate.transpose(1, 2), offs=offs)
        up = torch._grouped_mm(xs, w.up.transpose(1, 2), offs=offs)
        ys = torch._grouped_mm(F.silu(gate) * up, w.down.transpose(1, 2), offs=offs)
    else:  # padded batched GEMM: [E, cap, H]
        cap = int(counts.max().item())
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(N * K, device=x.device) - start[flat[order]]
        xb = x.new_zeros(E, cap, H)
        xb[flat[order], slot] = xs
        h = F.silu(torch.bmm(xb, w.gate.transpose(1, 2))) * torch.bmm(xb, w.up.transpose(1, 2))
        ys = torch.bmm(h, w.down.transpose(1, 2))[flat[order], slot]
    ys = ys * p.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, tok, ys)


def time_form(fn, x, dy, w, d, warmup, iters):
    def step():
        for t in w.params():
            t.grad = None
        xg = x.detach().requires_grad_(True)
        y = fn(xg, w, d)
        y.backward(dy)

    for _ in range(warmup):
        step()
    times = []
    if x.is_cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(iters):
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]  # median ms


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", ".."))
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a smoke check of the script, not a figure")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("moe_layer_torch.py: no CUDA device visible")
    torch.backends.cuda.matmul.allow_tf32 = False
    d = read_preset(args.root, args.preset)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dev = torch.device(args.device)
    w = Weights(d, dtype, dev, args.seed)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    x = torch.randn(args.tokens, d["H"], generator=g).to(dev, dtype)
    dy = torch.randn(args.tokens, d["H"], generator=g).to(dev, dtype)

    # Parity between the two forms before timing them (bf16: 2e-2 of the largest output).
    global USE_GROUPED_MM
    y_loop = moe_loop(x, w, d)
    try:
        y_grouped = moe_grouped(x, w, d)
    except RuntimeError as e:  # e.g. a GPU older than Hopper
        print(f"torch._grouped_mm unavailable ({e}); the grouped form uses padded bmm")
        USE_GROUPED_MM = False
        y_grouped = moe_grouped(x, w, d)
    err = ((y_loop - y_grouped).abs().max() / y_loop.abs().max()).item()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    if not err <= tol:
        sys.exit(f"moe_layer_torch.py: loop and grouped forms disagree: rel err {err:.3g} > {tol}")

    H, E, K, F_ = d["H"], d["E"], d["K"], d["F"]
    # fwd + bwd = 3x the forward GEMM FLOPs: 3 expert GEMMs of 2*H*F per routed token, router 2*H*E.
    flops = 3 * args.tokens * (K * 3 * 2 * H * F_ + 2 * H * E)
    results = {
        "preset": args.preset, "dims": d, "tokens": args.tokens, "dtype": args.dtype,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "grouped_impl": "torch._grouped_mm" if grouped_mm_available(dtype) else "padded bmm",
        "loop_vs_grouped_rel_err": err, "forms": {},
    }
    for name, fn in (("loop", moe_loop), ("grouped", moe_grouped)):
        ms = time_form(fn, x, dy, w, d, args.warmup, args.iters)
        r = {"ms": ms, "tokens_per_s": args.tokens / (ms / 1e3), "tflops": flops / (ms / 1e3) / 1e12}
        results["forms"][name] = r
        print(f"{args.preset} {args.dtype} N={args.tokens} {name:8s} {ms:8.3f} ms  "
              f"{r['tokens_per_s']:12.0f} tok/s  {r['tflops']:6.1f} TFLOP/s")
    results["best"] = max(results["forms"], key=lambda k: results["forms"][k]["tokens_per_s"])
    results["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
