"""How well trained KVzap scorers predict kvjax's KVzip scores on held-out text, and their training curves.

    python experiments/kvzap_report.py --runs runs/kvzap-mlp runs/kvzap-linear \\
        --data ../shared/data/wikitext-2/test.txt --windows 8 --context 512 --out experiments/results/kvzap

Collects KVzip targets on `--data` exactly as `kvjax train kvzap` does (`kvjax.train.kvzap.collect`: every
token of each window), predicts them with each run's newest checkpoint, and writes `correlation.json`,
`correlation.md` (Pearson / Spearman per window, layer and KV head, averaged; pooled over everything;
the overlap of the kept halves: of the pairs KVzip ranks in a head's top half of a window, the share
KVzap's scores also rank there, chance 0.5; the fraction of pairs a threshold keeps, predicted and by the
true log KVzip score, the recent window aside) and `loss.png` (each run's metrics.jsonl).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

import kvjax
from kvjax.checkpoints import load_trained, model_id
from kvjax.eval.plots import pyplot, save_figure
from kvjax.methods.kvzap import predict
from kvjax.train.data import load_tokens
from kvjax.train.kvzap import collect, correlations

THRESHOLDS = (-7.0, -6.0, -5.0, -4.5, -4.0, -3.0)


def kept_half_overlap(pred, target, window) -> float:
    """Mean over (window, layer, head) of |top half by target ∩ top half by prediction| / half."""
    out = []
    for w in np.unique(window):
        a, b = pred[window == w], target[window == w]
        n = len(a) // 2
        top = lambda s: np.argsort(-s, axis=0, kind="stable")[:n]  # noqa: E731  [n, L, K]
        ta, tb = top(a), top(b)
        for layer in range(a.shape[1]):
            for head in range(a.shape[2]):
                out.append(len(np.intersect1d(ta[:, layer, head], tb[:, layer, head])) / n)
    return float(np.mean(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", required=True, help="held-out text (not the training data)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    lm = kvjax.load(args.model, dtype="float32")
    tokens = load_tokens(args.data, lm.tokenizer)
    table = collect(lm.params, lm.cfg, lm.tokenizer, tokens, n_windows=args.windows, context=args.context,
                    sample=args.context)
    report = {"data": args.data, "windows": args.windows, "context": args.context, "rows": int(len(table["y"])),
              "target_variance": float(table["y"].var(0).mean()), "runs": {},
              "kvzip_kept_at_threshold": {str(t): float(np.mean(table["y"] >= t)) for t in THRESHOLDS}}
    for run in args.runs:
        params, _, meta = load_trained(run, "kvzap", model_id(args.model, lm.cfg))
        per_layer = [jax.tree_util.tree_map(lambda x: x[i], params) for i in range(lm.cfg.n_layers)]  # noqa: B023
        pred = np.stack([np.asarray(predict(p, table["x"][:, i])) for i, p in enumerate(per_layer)], 1)
        stats = correlations(pred, table["y"], table["window"])
        stats["mse"] = float(np.mean((pred - table["y"]) ** 2))
        stats["kept_half_overlap"] = kept_half_overlap(pred, table["y"], table["window"])
        stats["kept_at_threshold"] = {str(t): float(np.mean(pred >= t)) for t in THRESHOLDS}
        stats["step"], stats["hidden"] = int(meta["step"]), int(meta.get("hidden", 0))
        report["runs"][run.name] = stats
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "correlation.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"Held-out: {args.data}, {args.windows} windows of {args.context} tokens ({report['rows']} tokens x "
             f"{lm.cfg.n_layers} layers x {lm.cfg.n_kv_heads} KV heads); target variance (per layer and head, "
             f"mean) {report['target_variance']:.3f}", "",
             "| scorer | steps | MSE | Pearson | Spearman | Pearson pooled | Spearman pooled | kept-half overlap |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in report["runs"].items():
        kind = f"MLP {s['hidden']}" if s["hidden"] else "linear"
        lines.append(f"| {name} ({kind}) | {s['step']} | {s['mse']:.3f} | {s['pearson']:.3f} | {s['spearman']:.3f} "
                     f"| {s['pearson_pooled']:.3f} | {s['spearman_pooled']:.3f} | {s['kept_half_overlap']:.3f} |")
    lines += ["", "Fraction of (layer, head, token) pairs at or above a threshold (kept by `threshold=`, before the "
              "recent window):", "", "| scores | " + " | ".join(str(t) for t in THRESHOLDS) + " |",
              "|---|" + "---|" * len(THRESHOLDS),
              "| log KVzip (target) | " + " | ".join(f"{report['kvzip_kept_at_threshold'][str(t)]:.3f}"
                                                    for t in THRESHOLDS) + " |"]
    for name, s in report["runs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{s['kept_at_threshold'][str(t)]:.3f}" for t in THRESHOLDS) + " |")
    lines += ["", "Spearman per layer (" + ", ".join(report["runs"]) + "):", ""]
    for name, s in report["runs"].items():
        lines.append(f"* {name}: " + " ".join(f"{v:.2f}" for v in s["per_layer_spearman"]))
    (args.out / "correlation.md").write_text("\n".join(lines) + "\n")
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    for run in args.runs:
        log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=run.name)
    ax.axhline(report["target_variance"], ls="--", c="gray", label="target variance (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE of log KVzip score (train batch)")
    save_figure(fig, ax, args.out / "loss.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
