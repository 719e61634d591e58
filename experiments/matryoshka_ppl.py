"""MatryoshkaKV: perplexity vs cache size, PCA-initialized projections against trained ones.

    python experiments/matryoshka_ppl.py --run runs/matryoshka [--windows 8] [--seq-len 512]
        [--fractions 1 0.75 0.5 0.375 0.25] [--search 0.5] [--out experiments/results/matryoshka]

Windows of WikiText-2 *test* (the run trains on other text) are run with every layer's keys and
values stored as `LatentKV` projections at a fraction f of the head dim (uniform ranks f·D for
keys and values: the cache holds f of the full K/V bytes); the perplexity of each window's next
tokens is compared for the PCA bases the run started from (its `const`, params zero) and the trained
bases. With `--search F`, the greedy per-layer ranks meeting fraction F (searched on validation
text) are evaluated too. Writes OUT.csv, OUT.md and OUT.png.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import kvjax
from kvjax.eval.perplexity import text_chunks
from kvjax.checkpoints import load_trained, model_id
from kvjax.train.matryoshka import MatryoshkaTask, cross_entropy

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a `kvjax train matryoshka --out` directory")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--fractions", type=float, nargs="+", default=[1, 0.75, 0.5, 0.375, 0.25])
    p.add_argument("--search", type=float, nargs="*", default=[], help="also greedy per-layer ranks at these fractions")
    p.add_argument("--out", type=Path, default=Path("experiments/results/matryoshka"))
    args = p.parse_args(argv)

    lm = kvjax.load(args.model, dtype="float32")
    params, const, meta = load_trained(args.run, "matryoshka", model_id(args.model, lm.cfg))
    task = MatryoshkaTask(lm.cfg, args.model, n_levels=meta["n_levels"])
    pca = jax.tree_util.tree_map(jnp.zeros_like, params)
    windows = text_chunks(lm.tokenizer, DATA / "wikitext-2" / "test.txt", args.seq_len, 1, args.windows)
    calib = text_chunks(lm.tokenizer, DATA / "wikitext-2" / "valid.txt", 256, 1, 2)
    d, n_layers = lm.cfg.head_dim, lm.cfg.n_layers
    nll = jax.jit(lambda prm, x, y, rk, rv: cross_entropy(task.student_logits(prm, const, lm.params, x, rk, rv), y))

    def ppl(prm, ranks_k, ranks_v) -> float:
        rk, rv = jnp.asarray(ranks_k)[:, None], jnp.asarray(ranks_v)[:, None]
        losses = [float(nll(prm, jnp.asarray(w[None, :-1]), jnp.asarray(w[None, 1:]), rk, rv)) for w in windows]
        return float(np.exp(np.mean(losses)))

    rows = []
    full = ppl(pca, [d] * n_layers, [d] * n_layers)  # rank D: exactly the model (orthogonal bases)
    todo = [(f, "uniform") for f in args.fractions] + [(f, "search") for f in args.search]
    for fraction, ranks_kind in tqdm(todo, desc="matryoshka ppl"):
        for name, prm in (("pca", pca), ("trained", params)):
            t0 = time.perf_counter()
            if ranks_kind == "uniform":
                r = int(round(fraction * d / task.step_rank)) * task.step_rank
                ranks_k = ranks_v = (r,) * n_layers
            else:
                ranks_k, ranks_v, _ = task.search_ranks(prm, const, lm.params, jnp.asarray(calib), fraction)
            stored = (sum(ranks_k) + sum(ranks_v)) / (2 * n_layers * d)
            rows.append(dict(bases=name, ranks=ranks_kind, target_fraction=fraction, kv_fraction=round(stored, 4),
                             kv_bytes_per_token=int(stored * lm.cfg.kv_bytes_per_token()),
                             ppl=round(ppl(prm, ranks_k, ranks_v), 3), full_ppl=round(full, 3),
                             seconds=round(time.perf_counter() - t0, 1),
                             ranks_k=" ".join(map(str, ranks_k)), ranks_v=" ".join(map(str, ranks_v))))
    write(rows, args, meta)


def write(rows, args, meta) -> None:
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# MatryoshkaKV perplexity vs cache size ({args.model})", "",
             f"Run `{args.run}` (step {meta['step']}, {meta['config']['batch_size']} x {meta['config']['seq_len']} "
             f"tokens per step); {args.windows} WikiText-2 test windows of {args.seq_len} tokens, every K/V "
             f"stored projected. Full cache: ppl {rows[0]['full_ppl']}.", "",
             "| ranks | K/V fraction | bytes/token | PCA ppl | trained ppl |", "|---|---|---|---|---|"]
    for pca, trained in zip(rows[0::2], rows[1::2]):
        lines.append(f"| {pca['ranks']} | {pca['kv_fraction']} / {trained['kv_fraction']} | "
                     f"{pca['kv_bytes_per_token']:,} | {pca['ppl']} | {trained['ppl']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, marker in (("pca", "o"), ("trained", "s")):
        pts = sorted((r["kv_fraction"], r["ppl"]) for r in rows if r["bases"] == name and r["ranks"] == "uniform")
        ax.plot(*zip(*pts), marker=marker, label=f"{name} (uniform ranks)")
        found = [(r["kv_fraction"], r["ppl"]) for r in rows if r["bases"] == name and r["ranks"] == "search"]
        if found:
            ax.scatter(*zip(*found), marker="*", s=120, label=f"{name} (searched ranks)")
    ax.axhline(rows[0]["full_ppl"], color="gray", ls="--", label="full cache")
    ax.set_xlabel("fraction of the full K/V bytes")
    ax.set_ylabel("perplexity (WikiText-2 test)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("MatryoshkaKV on " + args.model)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
