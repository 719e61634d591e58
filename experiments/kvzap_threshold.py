"""Query-agnostic passkey under KVzap by threshold (`kvjax eval` takes ratios only), with the kept fraction.

    python experiments/kvzap_threshold.py --runs runs/kvzap-mlp runs/kvzap-linear --thresholds -5 -4 \\
        --lengths 1024 --n 5 --seed 0 --out experiments/results/kvzap/passkey_threshold.md

The prompts are `kvjax eval passkey`'s (same builder and seed): the context is compressed with
`kvzap(checkpoint=RUN, threshold=T)`, then the question is fed on top of the compressed cache and the
greedy answer checked for the key. `kept` is the share of the context's (layer, KV head, token) pairs
the cache holds (the recent window of 128 tokens included), averaged over the prompts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import kvjax
from kvjax.eval import prompts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, nargs="+", required=True)
    p.add_argument("--thresholds", type=float, nargs="+", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024])
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    lm = kvjax.load(args.model, dtype="float32")
    filler = prompts.filler_haystack(lm.tokenizer.encode)
    samples = [prompts.passkey_sample(lm.tokenizer, filler, n, None, i, args.seed, False)
               for n in args.lengths for i in range(args.n)]
    lines = ["| scorer | threshold | " + " | ".join(f"{n} correct" for n in args.lengths) + " | kept |",
             "|---|---|" + "---|" * len(args.lengths) + "---|"]
    for run in args.runs:
        for t in args.thresholds:
            correct, kept = {n: 0 for n in args.lengths}, []
            for s in samples:
                cache = lm.prefill(list(s.context), method=f"kvzap(checkpoint={run}, threshold={t})")
                held = sum(int(np.asarray(layer.length).sum()) for layer in cache.layers)
                kept.append(held / (lm.cfg.n_layers * lm.cfg.n_kv_heads * len(s.context)))
                out = lm.generate(list(s.suffix), cache=cache, max_new_tokens=s.max_new_tokens)
                correct[s.length] += s.answers[0] in out.text
            lines.append(f"| {run.name} | {t} | " + " | ".join(f"{correct[n]}/{args.n}" for n in args.lengths)
                         + f" | {np.mean(kept):.3f} |")
            print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
