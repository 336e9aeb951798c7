#!/usr/bin/env python3
"""Plots of bench/planner_study's CSV (one row per plan): imbalance per planner.

  plot_planner_study.py CSV [CSV.gz] --out-dir DIR --name NAME [--series-world W --series-slots S
                                                                 --series-layer L]

Writes DIR/NAME_by_world.png: mean (line) and p95 (dashed) max/mean rank load per planner
against W, one panel per slot count S, with the issue-6 target 1.10; and
DIR/NAME_series.png: max/mean of every micro-step of one (W, S, layer) per planner, in
execution order, with step boundaries. Needs matplotlib (Debian: python3-matplotlib).
"""
import argparse
import csv
import gzip
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ["none", "step_ema", "step_oracle", "foresight"]
COLORS = {"none": "tab:gray", "step_ema": "tab:orange", "step_oracle": "tab:blue",
          "foresight": "tab:green"}


def read(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"{path}: no rows")
    for key in ("W", "S", "planner", "step", "micro_step", "layer", "max_over_mean"):
        if key not in rows[0]:
            sys.exit(f"{path}: column '{key}' missing (not a planner_study CSV?)")
    return rows


def percentile(values, q):
    """Linear interpolation between order statistics (numpy's default)."""
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def by_world(rows, out):
    groups = defaultdict(list)  # (S, planner, W) -> max/mean values
    for r in rows:
        groups[(int(r["S"]), r["planner"], int(r["W"]))].append(float(r["max_over_mean"]))
    slots = sorted({k[0] for k in groups})
    worlds = sorted({k[2] for k in groups})
    planners = [p for p in ORDER if any(k[1] == p for k in groups)]
    fig, axes = plt.subplots(1, len(slots), figsize=(4.2 * len(slots), 3.6), sharey=True,
                             squeeze=False)
    for ax, s in zip(axes[0], slots):
        for p in planners:
            ws = [w for w in worlds if (s, p, w) in groups]
            mean = [sum(groups[(s, p, w)]) / len(groups[(s, p, w)]) for w in ws]
            p95 = [percentile(groups[(s, p, w)], 0.95) for w in ws]
            ax.plot(ws, mean, "o-", color=COLORS.get(p), label=f"{p} mean")
            ax.plot(ws, p95, "x--", color=COLORS.get(p), alpha=0.6, label=f"{p} p95")
        ax.axhline(1.10, color="red", lw=0.8, ls=":", label="target 1.10")
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds)
        ax.set_xticklabels([str(w) for w in worlds])
        ax.set_title(f"S = {s} replica slots / rank")
        ax.set_xlabel("ranks W")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("max / mean rank load per micro-step")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def series(rows, world, slots, layer, out):
    pts = defaultdict(list)  # planner -> [(step, micro_step, value)]
    for r in rows:
        if int(r["W"]) == world and int(r["S"]) == slots and int(r["layer"]) == layer:
            pts[r["planner"]].append((int(r["step"]), int(r["micro_step"]),
                                      float(r["max_over_mean"])))
    if not pts:
        sys.exit(f"no rows with W={world}, S={slots}, layer={layer}")
    fig, ax = plt.subplots(figsize=(9, 3.6))
    micro = 1
    for p in [p for p in ORDER if p in pts]:
        v = sorted(pts[p])
        micro = max(m for _, m, _ in v) + 1
        ax.plot(range(len(v)), [x[2] for x in v], ".-", lw=0.8, color=COLORS.get(p), label=p)
    n = max(len(v) for v in pts.values())
    for b in range(micro, n, micro):
        ax.axvline(b - 0.5, color="k", lw=0.3, alpha=0.3)
    ax.axhline(1.10, color="red", lw=0.8, ls=":", label="target 1.10")
    ax.set_xlabel(f"micro-step (steps of {micro}; thin lines = step boundaries)")
    ax.set_ylabel("max / mean rank load")
    ax.set_title(f"W = {world}, S = {slots}, MoE layer {layer}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=5)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--series-world", type=int)
    ap.add_argument("--series-slots", type=int, default=2)
    ap.add_argument("--series-layer", type=int, default=0)
    a = ap.parse_args()
    rows = read(a.csv)
    os.makedirs(a.out_dir, exist_ok=True)
    by_world(rows, os.path.join(a.out_dir, f"{a.name}_by_world.png"))
    world = a.series_world or max(int(r["W"]) for r in rows)
    series(rows, world, a.series_slots, a.series_layer,
           os.path.join(a.out_dir, f"{a.name}_series.png"))


if __name__ == "__main__":
    main()
