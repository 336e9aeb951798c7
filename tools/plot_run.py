#!/usr/bin/env python3
"""PNG plots of one foremoe run's metrics.jsonl; run by `foremoe plot`.

    python3 tools/plot_run.py <run dir> <out dir>

Reads <run dir>/metrics.jsonl (one JSON object per line) and writes, for the
series present:
  reward.png       reward_mean and train accuracy per RL step, eval accuracy as markers
  kl_entropy.png   kl and entropy per RL step (two panels)
  timing.png       stacked bars of the timing_s stage times per RL step
  expert_load.png  one heat-map panel per MoE layer: x = step, y = expert,
                   colour = the expert's share of that layer's token assignments
  imbalance.png    one panel per balanced stage (balance.<stage> of the RL records):
                   max/mean rank load of every micro-step (mean over MoE layers, steps
                   in order) with every token at its home expert and under the run's
                   planner
  loss.png         loss per step of SFT / LM runs (lines without "kind"), eval accuracy
Absent series are skipped; unknown keys and record kinds are ignored; null
(non-finite) values are left out of the lines. Standard library + matplotlib.

Exit codes: 0 ok, 1 bad input (message on stderr naming file and line),
3 matplotlib missing (the caller says which package to install).
"""

import json
import math
import os
import sys

EXIT_BAD_INPUT = 1
EXIT_NO_MATPLOTLIB = 3


def fail(message, code=EXIT_BAD_INPUT):
    print(f"plot_run.py: {message}", file=sys.stderr)
    sys.exit(code)


def read_records(path):
    """The JSON objects of a JSON Lines file; blank lines are skipped."""
    records = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    fail(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})")
                if not isinstance(record, dict):
                    fail(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                records.append(record)
    except OSError as e:
        fail(f"{path}: cannot read ({e.strerror})")
    return records


def number(v):
    """A finite float, or None for null / non-numbers / non-finite values."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def series(records, key):
    """(steps, values) of `key` over records with a numeric step and value."""
    xs, ys = [], []
    for r in records:
        x, y = number(r.get("step")), number(r.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def split_records(records):
    """RL steps, SFT/LM steps and eval records; other kinds are ignored."""
    rl, sft, evals = [], [], []
    for r in records:
        kind = r.get("kind")
        if kind == "rl_step":
            rl.append(r)
        elif kind == "eval" or (kind is None and "eval_examples" in r):
            evals.append(r)
        elif kind is None and "loss" in r:
            sft.append(r)
    return rl, sft, evals


def plot_line(ax, xs, ys, label, **style):
    if not xs:
        return False
    # A single point draws no line: show a marker so a one-step run is visible.
    ax.plot(xs, ys, label=label, marker="o" if len(xs) == 1 else None, **style)
    return True


def save(fig, out_dir, name, written):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=100)
    written.append(path)


def plot_reward(plt, rl, evals, out_dir, written):
    # An SFT run's evals go with its loss; this plot is for RL runs.
    if not rl and not any(e.get("kind") == "eval" for e in evals):
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = plot_line(ax, *series(rl, "reward_mean"), "reward_mean")
    drawn |= plot_line(ax, *series(rl, "accuracy"), "train accuracy")
    xs, ys = series(evals, "accuracy")
    if xs:
        ax.plot(xs, ys, linestyle="none", marker="D", color="black", label="eval accuracy")
        drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_title("reward and accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save(fig, out_dir, "reward.png", written)
    plt.close(fig)


def plot_kl_entropy(plt, rl, out_dir, written):
    panels = [(key, series(rl, key)) for key in ("kl", "entropy")]
    panels = [(key, xy) for key, xy in panels if xy[0]]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3 * len(panels)), sharex=True,
                             squeeze=False)
    for ax, (key, (xs, ys)), color in zip(axes[:, 0], panels, ("tab:red", "tab:purple")):
        plot_line(ax, xs, ys, key, color=color)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("KL to the reference and policy entropy")
    fig.tight_layout()
    save(fig, out_dir, "kl_entropy.png", written)
    plt.close(fig)


def plot_timing(plt, rl, out_dir, written):
    rows = [(number(r.get("step")), r.get("timing_s")) for r in rl]
    rows = [(s, t) for s, t in rows if s is not None and isinstance(t, dict)]
    # Stages in pipeline order (unknown ones after, in first-seen order), leaving out those
    # that never took time (no critic, no reference); "step" is the whole step's wall time.
    pipeline = ["gen", "reward", "old_log_prob", "ref", "values", "adv", "update_critic",
                "update_actor"]
    stages = []
    for _, t in rows:
        for k in t:
            if k != "step" and k not in stages and (number(t[k]) or 0.0) > 0.0:
                stages.append(k)
    stages.sort(key=lambda k: pipeline.index(k) if k in pipeline else len(pipeline))
    if not stages:
        return
    steps = [s for s, _ in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bottom = [0.0] * len(rows)
    cmap = plt.get_cmap("tab20")
    for i, stage in enumerate(stages):
        heights = [number(t.get(stage)) or 0.0 for _, t in rows]
        ax.bar(steps, heights, bottom=bottom, width=0.8, label=stage, color=cmap(i % 20))
        bottom = [b + h for b, h in zip(bottom, heights)]
    totals = [(s, number(t.get("step"))) for s, t in rows]
    totals = [(s, v) for s, v in totals if v is not None]
    if totals:
        ax.plot([s for s, _ in totals], [v for _, v in totals], linestyle="none", marker="_",
                markersize=12, color="black", label="step (wall)")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.set_title("time per stage")
    ax.legend(fontsize="small", ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    save(fig, out_dir, "timing.png", written)
    plt.close(fig)


def plot_expert_load(plt, rl, out_dir, written):
    rows = []  # (step, [[count per expert] per layer])
    for r in rl:
        step, load = number(r.get("step")), r.get("expert_load")
        if step is None or not isinstance(load, list):
            continue
        layers = [[number(c) or 0.0 for c in layer] if isinstance(layer, list) else []
                  for layer in load]
        rows.append((step, layers))
    n_layers = max((len(layers) for _, layers in rows), default=0)
    n_experts = [max((len(layers[l]) for _, layers in rows if l < len(layers)), default=0)
                 for l in range(n_layers)]
    shown = [l for l in range(n_layers) if n_experts[l] > 0]
    if not shown:
        return
    steps = [s for s, _ in rows]
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 1.0 + 2.2 * len(shown)), squeeze=False,
                             sharex=True)
    image = None
    for ax, l in zip(axes[:, 0], shown):
        # grid[e][j]: expert e's share of layer l's assignments at the j-th step (NaN: absent).
        grid = [[math.nan] * len(rows) for _ in range(n_experts[l])]
        for j, (_, layers) in enumerate(rows):
            counts = layers[l] if l < len(layers) else []
            total = sum(counts)
            for e, c in enumerate(counts):
                grid[e][j] = c / total if total > 0 else math.nan
        image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest",
                          cmap="viridis", vmin=0.0,
                          extent=(-0.5, len(rows) - 0.5, -0.5, n_experts[l] - 0.5))
        ax.set_ylabel(f"layer {l}\nexpert")
    # Column j is the j-th logged step; label the ticks with the step numbers.
    ticks = list(range(0, len(rows), max(1, len(rows) // 10)))
    axes[-1, 0].set_xticks(ticks)
    axes[-1, 0].set_xticklabels([f"{steps[j]:g}" for j in ticks])
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("expert load share per MoE layer (uniform = 1 / experts)")
    fig.tight_layout()
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="share of tokens")
    save(fig, out_dir, "expert_load.png", written)
    plt.close(fig)


def plot_imbalance(plt, rl, out_dir, written):
    stages = {}  # stage -> [planner, before series, after series]
    for r in rl:
        balance = r.get("balance")
        if not isinstance(balance, dict):
            continue
        for stage, b in balance.items():
            if not isinstance(b, dict):
                continue
            before, after = b.get("micro_before"), b.get("micro_after")
            if not isinstance(before, list) or not isinstance(after, list):
                continue
            entry = stages.setdefault(stage, [str(b.get("planner", "?")), [], []])
            entry[1].extend(number(v) for v in before)
            entry[2].extend(number(v) for v in after)
    shown = [s for s in ("old_log_prob", "update_actor") if s in stages and stages[s][1]]
    shown += [s for s in sorted(stages) if s not in shown and stages[s][1]]
    if not shown:
        return
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 1.0 + 2.6 * len(shown)), squeeze=False)
    for ax, stage in zip(axes[:, 0], shown):
        planner, before, after = stages[stage]
        xs = list(range(len(before)))
        plot_line(ax, xs, before, "every token at home", color="tab:red")
        plot_line(ax, xs[:len(after)], after, f"planner {planner}", color="tab:green")
        ax.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
        ax.set_ylabel(f"{stage}\nmax / mean")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper right")
    axes[-1, 0].set_xlabel("micro-step (RL steps in order)")
    axes[0, 0].set_title("expert-parallel rank load per micro-step (1 = perfect balance)")
    fig.tight_layout()
    save(fig, out_dir, "imbalance.png", written)
    plt.close(fig)


def plot_loss(plt, sft, evals, out_dir, written):
    xs, ys = series(sft, "loss")
    if not xs:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    plot_line(ax, xs, ys, "loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ex, ey = series(evals, "accuracy")
    if ex:
        ax2 = ax.twinx()
        ax2.plot(ex, ey, marker="D", color="black", label="eval accuracy")
        ax2.set_ylabel("eval accuracy")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title("training loss")
    fig.tight_layout()
    save(fig, out_dir, "loss.png", written)
    plt.close(fig)


def main(argv):
    if len(argv) != 3:
        fail("usage: plot_run.py <run dir> <out dir>")
    run_dir, out_dir = argv[1], argv[2]
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        fail(f"{metrics}: no such file")
    records = read_records(metrics)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        fail(f"matplotlib is not importable ({e})", EXIT_NO_MATPLOTLIB)

    rl, sft, evals = split_records(records)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    plot_reward(plt, rl, evals, out_dir, written)
    plot_kl_entropy(plt, rl, out_dir, written)
    plot_timing(plt, rl, out_dir, written)
    plot_expert_load(plt, rl, out_dir, written)
    plot_imbalance(plt, rl, out_dir, written)
    plot_loss(plt, sft, evals, out_dir, written)
    for path in written:
        print(path)
    if not written:
        print(f"nothing to plot in {metrics} ({len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
