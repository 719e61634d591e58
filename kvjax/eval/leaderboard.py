"""`kvjax eval leaderboard`: quality against the real bytes a cache holds, for every method family, on
several models and tasks, from one command.

    kvjax eval leaderboard                                   # the full protocol (hours on a CPU)
    kvjax eval leaderboard --models smollm2-135m --tasks niah ppl --lengths 1024 --n 2   # minutes
    kvjax eval leaderboard --report-only                     # re-draw tables and plots from the CSVs

For each model and task it runs `kvjax eval TASK` twice into `OUT/<model>/<task>.csv` (resumable): the
token methods of `GRID` (eviction, latent, cross-layer, learned, and compositions such as eviction +
4-bit quantization) at every ratio, then the full cache with every quantizer of `QUANTIZERS` (or the
eval's own `--quant`). The
protocol defaults follow kvpress's leaderboard: ratios 0.25 / 0.5 / 0.75 / 0.875, the question after
compression (query-agnostic), RULER-style tasks at 4k, plus NIAH and perplexity.

Then it writes, into `OUT`:

* `leaderboard.md`: per model and task, every configuration ranked by score within bands of equal
  bytes (the fraction of the full cache's bytes the cache really held, `kvjax.cache_nbytes`, never
  the nominal ratio), Pareto-optimal rows starred, each row with the command that reproduces it, and
  kvpress's score on the same prompts beside ours where a `--kvpress` CSV has the method
  (`experiments/kvpress_passkey_sweep.py` writes one for passkey);
* `pareto_<model>_<task>.png`: score against cache bytes, one marker per family, the Pareto front.

Names in `GRID` that are not registered (a family still to come) are skipped with a notice; `--method`
replaces the grid.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from kvjax import methods
from kvjax.eval.plots import pyplot, save_figure
from kvjax.eval.records import read_rows
from kvjax.eval.summary import number

TASKS = ("ruler", "niah", "ppl", "passkey")
DEFAULT_TASKS = ("ruler", "niah", "ppl")
DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m")
RATIOS = (0.25, 0.5, 0.75, 0.875)  # kvpress's leaderboard ratios
OUT = Path("experiments/results/leaderboard")
# (family, method spec): run at every ratio (methods that keep every token, such as cla, run once)
GRID = (
    ("eviction", "streaming_llm"), ("eviction", "snapkv"), ("eviction", "pyramidkv"), ("eviction", "tova"),
    ("eviction", "knorm"), ("eviction", "expected_attention"), ("eviction", "adakv:snapkv"),
    ("eviction", "kvzip"), ("eviction", "keydiff"), ("latent", "think:snapkv"), ("cross-layer", "cla"),
    ("cross-layer", "kvsharer"), ("cross-layer", "duo"), ("composition", "compose(snapkv, kivi-4)"),
    ("composition", "compose(tova, int8)"),
)
QUANTIZERS = ("kivi-2", "kivi-4", "int8", "kvquant-4")  # on the full cache
BANDS = (0.125, 0.25, 0.5, 0.75, 1.0)  # bytes / full: rows are ranked within each band


def add_args(parser: argparse.ArgumentParser) -> None:
    """The leaderboard's options on the `eval` parser (the rest: --lengths, --n, --seed, --method,
    --ratio, --batch, --haystack, --text, --context-len, --eval-len are the eval's own)."""
    g = parser.add_argument_group("leaderboard (kvjax eval leaderboard)")
    g.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="models to rank methods on")
    g.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help=f"tasks among {', '.join(TASKS)}")
    g.add_argument("--out-dir", type=Path, default=OUT, help=f"CSVs, tables and plots (default: {OUT})")
    g.add_argument("--kvpress", type=Path, default=None,
                   help="passkey results of kvpress on the same prompts (experiments/kvpress_passkey_sweep.py)")
    g.add_argument("--report-only", action="store_true", help="only re-draw the tables and plots from the CSVs")


@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration's result on one model and task (scores averaged over its rows)."""

    family: str
    method: str
    ratio: str
    quant: str
    bytes: float  # mean cache bytes held per sequence
    fraction: float  # bytes / the full cache's bytes on the same prompts
    score: float  # % correct, or perplexity (task ppl: lower is better)
    rows: int
    command: str


def family_of(method: str, quant: str) -> str:
    """The family a configuration belongs to: the grid's, else quantization (full + quantizer), else eviction."""
    for family, spec in GRID:
        if spec == method:
            return family
    if method == "full":
        return "quantization" if quant else "full"
    return "composition" if quant else "eviction"


def _grid(args) -> list[tuple[str, str]]:
    if args.method != ["full"]:  # the eval's own --method replaces the grid
        return [(family_of(m, ""), m) for m in args.method if m != "full"]
    out = []
    for family, spec in GRID:
        try:
            methods.get(spec)
        except ValueError as e:
            print(f"leaderboard: skipped {spec!r} ({e})", file=sys.stderr)
            continue
        out.append((family, spec))
    return out


def _label(model: str) -> str:
    """The folder of a model's results: its name, or a checkpoint path's last part (without .gguf)."""
    name = Path(model).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def _eval_argv(args, model: str, task: str, out: Path) -> list[str]:
    argv = ["eval", task, "--model", model, "--n", str(args.n), "--seed", str(args.seed), "--out", str(out),
            "--batch", str(args.batch), "--no-plots"]
    if task == "ppl":
        argv += ["--context-len", str(args.context_len), "--eval-len", str(args.eval_len)]
    else:
        argv += ["--lengths", *map(str, args.lengths)] + (["--depths", *map(str, args.depths)] if args.depths else [])
    for flag, value in (("--haystack", args.haystack), ("--text", args.text), ("--dtype", args.dtype)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def run(args, run_eval, make_parser) -> None:
    """Run the grid (`run_eval` on argv parsed by `make_parser()`), then write the tables and plots."""
    for task in args.tasks:
        if task not in TASKS:
            raise ValueError(f"leaderboard: unknown task {task!r}; tasks: {', '.join(TASKS)}")
    ratios = args.ratio or list(RATIOS)
    quants = [q for q in args.quant if q != "none"] or list(QUANTIZERS)  # the eval's own --quant replaces them
    if not args.report_only:
        grid = _grid(args)
        parser = make_parser()
        for model in args.models:
            for task in args.tasks:
                out = args.out_dir / _label(model) / f"{task}.csv"
                out.parent.mkdir(parents=True, exist_ok=True)
                base = _eval_argv(args, model, task, out)
                runs = [base + ["--method", *[spec for _, spec in grid], "--ratio", *map(str, ratios)],
                        base + ["--method", "full", "--quant", "none", *quants]]
                for argv in runs:
                    print(f"leaderboard: kvjax {' '.join(argv)}", file=sys.stderr)
                    run_eval(parser.parse_args(argv + (["--resume"] if out.exists() else [])))
    paths = write_report(args.out_dir, args.kvpress)
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)


def points(csv_path: Path, model: str) -> list[Point]:
    """The configurations of a task's CSV, averaged over their rows."""
    rows = read_rows(csv_path)
    by = defaultdict(list)
    for r in rows:
        by[r["task"], r["method"], r["ratio"], r["budget"], r["quant"]].append(r)
    out = []
    for (task, method, ratio, budget, quant), rs in by.items():
        size = sum(number(r["cache_bytes"]) for r in rs) / len(rs)
        full = sum(number(r["full_cache_bytes"]) for r in rs) / len(rs)
        if task == "ppl":
            tokens = sum(number(r["n_tokens"]) for r in rs)
            score = math.exp(sum(number(r["nll"]) * number(r["n_tokens"]) for r in rs) / tokens)
        else:
            score = 100 * sum(number(r["score"]) for r in rs) / len(rs)
        opts = [f"--method '{method}'"] + ([f"--ratio {ratio}"] if ratio else []) + \
               ([f"--budget {budget}"] if budget else []) + ([f"--quant {quant}"] if quant else [])
        command = f"kvjax eval {task} --model {model} {' '.join(opts)} {_options(rs)}"
        out.append(Point(family_of(method, quant), method, ratio, quant, size, size / full, score, len(rs),
                         command.strip()))
    return out


def _options(rows: list[dict]) -> str:
    """The eval flags that rebuild a configuration's prompts: seed, samples, lengths and depths (or the
    perplexity context), and the task's own options."""
    o = json.loads(rows[0]["options"])
    flags = [f"--seed {rows[0]['seed']}", f"--n {len({r['sample'] for r in rows})}"]
    if o.get("task") == "ppl":
        flags += [f"--context-len {o['context_len']}", f"--eval-len {o['eval_len']}"]
    else:
        flags += ["--lengths " + " ".join(map(str, o["lengths"]))]
        depths = sorted({r["depth"] for r in rows if r["depth"]}, key=float)
        flags += ["--depths " + " ".join(depths)] if depths else []
        flags += ["--subtasks " + " ".join(o["subtasks"])] if o.get("subtasks") else []
        flags += ["--question-in-context"] if o.get("question_in_context") else []
    return " ".join(flags)


def pareto(pts: list[Point], lower_better: bool) -> set[Point]:
    """The configurations no other beats on both bytes (fewer) and score (better or equal)."""
    best, front = None, set()
    for p in sorted(pts, key=lambda p: (p.bytes, p.score if lower_better else -p.score)):
        if best is None or (p.score < best if lower_better else p.score > best):
            front.add(p)
            best = p.score
    return front


def kvpress_scores(path: Path | None) -> dict:
    """(method, ratio string) -> kvpress's % correct, from a kvpress_passkey_sweep.py CSV."""
    if path is None:
        return {}
    by = defaultdict(list)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            by[r["method"], repr(float(r["ratio"])) if r["ratio"] else ""].append(float(r["correct"]))
    return {k: 100 * sum(v) / len(v) for k, v in by.items()}


def write_report(out_dir: Path, kvpress: Path | None = None) -> list[Path]:
    """leaderboard.md and one Pareto plot per model and task, from `out_dir/<model>/<task>.csv`."""
    csvs = sorted(out_dir.glob("*/*.csv"))
    if not csvs:
        raise ValueError(f"leaderboard: no results under {str(out_dir)!r}: run `kvjax eval leaderboard` first")
    theirs = kvpress_scores(kvpress)
    lines = ["# kvjax leaderboard: quality against real cache bytes", "",
             "Bytes are what the cache's arrays hold (`kvjax.cache_nbytes`), as a fraction of the full cache on "
             "the same prompts. Rows are ranked by score within each band of bytes; ★ marks the Pareto front "
             "(no configuration holds fewer bytes with a better score). Regenerate with `kvjax eval leaderboard` "
             "(see its --help); each row's command reproduces it alone.", ""]
    written = []
    for path in csvs:
        model, task = path.parent.name, path.stem
        pts = points(path, model)
        lower = task == "ppl"
        front = pareto(pts, lower)
        metric = "perplexity (lower is better)" if lower else "score (%)"
        lines += [f"## {model}: {task}", "", f"Metric: {metric}; {sum(p.rows for p in pts)} rows.", ""]
        head = ["band", "rank", "family", "method", "ratio", "quant", "bytes / full", "MiB", metric.split(" (")[0]]
        show_kvpress = task == "passkey" and bool(theirs)
        head += ["kvpress"] if show_kvpress else []
        head += ["Pareto", "command"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lo = 0.0
        for hi in BANDS:
            band = [p for p in pts if lo < round(p.fraction, 6) <= hi]
            band.sort(key=lambda p: (p.score if lower else -p.score, p.bytes))
            for rank, p in enumerate(band, 1):
                cells = [f"≤ {hi:g}", str(rank), p.family, p.method, p.ratio or "-", p.quant or "-",
                         f"{p.fraction:.3f}", f"{p.bytes / 2**20:.2f}", f"{p.score:.2f}" if lower else f"{p.score:.0f}"]
                if show_kvpress:
                    k = theirs.get((p.method, p.ratio)) if not p.quant else None
                    cells.append("-" if k is None else f"{k:.0f}")
                cells += ["★" if p in front else "", f"`{p.command}`"]
                lines.append("| " + " | ".join(cells) + " |")
            lo = hi
        lines.append("")
        written.append(plot_pareto(pts, front, out_dir / f"pareto_{model}_{task}.png", f"{model}: {task}", metric))
    md = out_dir / "leaderboard.md"
    md.write_text("\n".join(lines) + "\n")
    return [md] + written


def plot_pareto(pts: list[Point], front: set[Point], path: Path, title: str, metric: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = dict(full="*", eviction="o", quantization="s", latent="^", composition="D", learned="v")
    markers["cross-layer"] = "P"
    for family in dict.fromkeys(p.family for p in pts):
        fam = [p for p in pts if p.family == family]
        ax.scatter([p.bytes / 2**20 for p in fam], [p.score for p in fam], marker=markers.get(family, "x"),
                   s=60 if family == "full" else 22, label=family, alpha=0.8)
    ordered = sorted(front, key=lambda p: p.bytes)
    ax.step([p.bytes / 2**20 for p in ordered], [p.score for p in ordered], where="post", color="k", lw=1,
            alpha=0.6, label="Pareto front")
    for p in ordered:
        ax.annotate(f"{p.method}{' ' + p.ratio if p.ratio else ''}{' +' + p.quant if p.quant else ''}",
                    (p.bytes / 2**20, p.score), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("cache bytes held per sequence (MiB, log)")
    ax.set_ylabel(metric)
    if "perplexity" in metric:
        ax.set_yscale("log")
    ax.set_title(title)
    return save_figure(fig, ax, path)
