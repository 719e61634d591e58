"""KVzip's reconstruction replay against the plain prefill it follows, on SmolLM2-135M (CPU, float32).

    python experiments/bench_kvzip.py [--lengths 1024 2048 4096] [--repeats 3] [--out experiments/results/kvzip/replay.md]

For each context length T (chat prefix + essay text): the plain prefill of T tokens, and the replay
(`kvjax.pipeline.replay`: "Repeat the previous context" prompts + the context in chunks of `chunk_size`,
fed on top of the prefilled cache, with the reconstruction-attention observation), each timed after a
warm-up call (compile excluded), `--repeats` times; the table gives min and max seconds and the ratio of
the minima. kvpress's own note puts the replay at 2-3x the prefill.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import generation, pipeline
from kvjax.shapes import bucket
from kvjax.states.cache import model_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_line  # noqa: E402

ESSAYS = Path(os.environ.get("KVJAX_DATA", "../shared/data")) / "paul_graham_essays"


def context_ids(lm, n: int) -> list[int]:
    head = lm.encode(lm.tokenizer.chat_frame()[0])
    text = " ".join(p.read_text() for p in sorted(ESSAYS.glob("*.txt")))
    return (head + lm.encode(text))[:n]


def timed(fn, repeats: int) -> list[float]:
    jax.block_until_ready(fn())  # compile
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="kvzip")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/kvzip/replay.md"))
    args = ap.parse_args()
    lm = kvjax.load("smollm2-135m", dtype="float32")
    cfg = lm.cfg
    rows = []
    for n in args.lengths:
        ids = context_ids(lm, n)
        tokens = np.asarray([ids + [0] * (bucket(n) - n)], np.int32)
        lengths = np.asarray([n], np.int32)
        p = pipeline.plan(cfg, [n], args.method, ratio=0.5, tokenizer=lm.tokenizer)

        def prefill():
            return generation.prefill(lm.params, cfg, tokens, lengths, model_cache(cfg, 1, bucket(n)))[1]

        cache = prefill()
        pre = timed(prefill, args.repeats)
        rep = timed(lambda: pipeline.replay(lm.params, cfg, p, jax.tree_util.tree_map(jnp.copy, cache), tokens,
                                            lengths)[1], args.repeats)
        rows.append((n, min(pre), max(pre), min(rep), max(rep)))
        print(rows[-1], flush=True)
    lines = [f"### KVzip replay vs plain prefill ({args.method}, SmolLM2-135M float32, batch 1, seconds, "
             f"min / max of {args.repeats} after a warm-up)", "",
             "| context tokens | prefill min | prefill max | replay min | replay max | replay / prefill (min) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {a:.2f} | {b:.2f} | {c:.2f} | {d:.2f} | {c / a:.2f} |" for n, a, b, c, d in rows]
    lines += ["", f"`python experiments/bench_kvzip.py --lengths {' '.join(map(str, args.lengths))} --repeats "
              f"{args.repeats}`; {cpu_line()}; jax {jax.__version__}, {platform.python_version()}"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
