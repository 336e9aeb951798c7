#!/usr/bin/env python3
"""Plots of the router-balance study (bench/phi_study.cpp): maxvio.png in the study's
output directory, from its curves.csv and evals.csv.

  python3 bench/plot_phi_study.py bench/results/phi_study

Left: MaxVio_batch of every training step (mean over MoE layers), a 50-step moving average
per method. Middle: MaxVio_global on the held-out set at each evaluation. Right: held-out
loss at each evaluation.
"""
import csv
import os
import sys
from collections import OrderedDict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path, fields):
    runs = OrderedDict()
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            r = runs.setdefault(row["method"], {k: [] for k in fields})
            for k in fields:
                r[k].append(float(row[k]))
    return runs


def moving_average(xs, window):
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x
        if i >= window:
            total -= xs[i - window]
        out.append(total / min(i + 1, window))
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = sys.argv[1]
    curves = read(os.path.join(d, "curves.csv"), ["step", "max_vio_batch"])
    evals = read(os.path.join(d, "evals.csv"), ["step", "val_loss", "max_vio_global"])
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    for name, c in curves.items():
        ax[0].plot(c["step"], moving_average(c["max_vio_batch"], 50), label=name, lw=1.3)
    for name, e in evals.items():
        ax[1].plot(e["step"], e["max_vio_global"], marker="o", ms=3, label=name)
        ax[2].plot(e["step"], e["val_loss"], marker="o", ms=3, label=name)
    ax[0].set_title("MaxVio_batch over training (50-step mean)")
    ax[1].set_title("MaxVio_global (held-out)")
    ax[2].set_title("held-out loss")
    for a in ax:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    ax[0].set_ylabel("MaxVio")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    out = os.path.join(d, "maxvio.png")
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
