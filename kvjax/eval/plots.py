"""Figures from result rows (matplotlib, Agg backend): `plot_all(csv)` draws every figure its tasks allow.

* `<stem>_accuracy_<task>.png`: score vs ratio, one line per method, one panel per context length
  (the full cache as a dashed line);
* `<stem>_niah_heatmap.png`: needle depth x context length, one green-red grid per configuration;
* `<stem>_ppl.png`: perplexity vs cache bytes, one line per method over its ratios.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from kvjax.eval.records import read_rows
from kvjax.eval.summary import number


PLOTTED = ("score", "cache_bytes", "nll", "n_tokens")  # result columns the figures read, besides the key


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(rows: list[dict], path: Path, title: str) -> Path:
    plt = pyplot()
    lengths = sorted({int(r["length"]) for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], lengths):
        by = defaultdict(list)
        for r in rows:
            if int(r["length"]) == n:
                label = r["method"] + (f" +{r['quant']}" if r["quant"] else "")
                by[label, number(r["ratio"])].append(number(r["score"]))
        for m in dict.fromkeys(k[0] for k in by):
            pts = sorted((x, 100 * sum(v) / len(v)) for (mm, x), v in by.items() if mm == m)
            if m.startswith("full"):
                ax.axhline(pts[0][1], color="k", ls="--", lw=1, label=m)
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=m)
        ax.set_title(f"{title}, {n} tokens")
        ax.set_xlabel("ratio (fraction removed)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (%)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmaps(rows: list[dict], path: Path) -> Path:
    plt = pyplot()
    configs = list(dict.fromkeys((r["method"], r["ratio"], r["quant"]) for r in rows))
    depths = sorted({number(r["depth"]) for r in rows})
    lengths = sorted({int(r["length"]) for r in rows})
    cols = min(4, len(configs))
    n_rows = -(-len(configs) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.2 * cols, 2.8 * n_rows), squeeze=False, layout="constrained")
    for ax in axes.ravel()[len(configs):]:
        ax.axis("off")
    for ax, c in zip(axes.ravel(), configs):
        grid = [[0.0] * len(lengths) for _ in depths]
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                v = [number(r["score"]) for r in rows if (r["method"], r["ratio"], r["quant"]) == c
                     and number(r["depth"]) == d and int(r["length"]) == n]
                grid[i][j] = 100 * sum(v) / len(v) if v else float("nan")
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set_title(" ".join(x for x in (c[0], c[1], c[2]) if x), fontsize=8)
    fig.supxlabel("context length (tokens)")
    fig.supylabel("needle depth")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="score (%)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ppl(rows: list[dict], path: Path) -> Path:
    plt = pyplot()
    by = defaultdict(list)
    for r in rows:
        by[r["method"] + (f" +{r['quant']}" if r["quant"] else ""), number(r["cache_bytes"])].append(
            (number(r["nll"]), number(r["n_tokens"])))
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(k[0] for k in by):
        pts = sorted((b / 2**20, math.exp(sum(n * t for n, t in v) / sum(t for _, t in v)))
                     for (mm, b), v in by.items() if mm == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="*" if m.startswith("full") else "o",
                ms=9 if m.startswith("full") else 4, label=m)
    ax.set_xlabel("cache bytes per sequence (MiB)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    return save_figure(fig, ax, path)


def save_figure(fig, ax, path: Path) -> Path:
    """Grid, legend, tight layout; write the figure to `path` and free it."""
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_all(csv_path, out_dir=None) -> list[Path]:
    """Every figure the rows of a results CSV allow, written beside it (or into `out_dir`). A file that is
    not a results CSV (binary, other columns) is a ValueError naming it."""
    csv_path = Path(csv_path)
    rows = read_rows(csv_path)  # ValueError naming the file if it is not a results CSV
    missing = [c for c in PLOTTED if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{str(csv_path)!r} is not a kvjax results CSV (no column {', '.join(missing)})")
    folder = Path(out_dir) if out_dir else csv_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / csv_path.stem
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        part = [r for r in rows if r["task"] == task]
        if task in ("passkey", "niah", "ruler"):
            out.append(plot_accuracy(part, Path(f"{stem}_accuracy_{task}.png"), task))
        if task == "niah" and len({r["depth"] for r in part}) > 1:
            out.append(plot_heatmaps(part, Path(f"{stem}_niah_heatmap.png")))
        if task == "ppl":
            out.append(plot_ppl(part, Path(f"{stem}_ppl.png")))
    return out
