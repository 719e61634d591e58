"""Memory and speed of eviction methods vs the full cache, measured side by side in one run.

    python experiments/bench_eviction.py [--model smollm2-135m] [--context 4096] [--ratios 0.25 0.5 0.75]
        [--methods snapkv knorm ...] [--decode-methods streaming_llm h2o] [--new-tokens 64] [--repeats 3] [--out experiments/results/bench_eviction.md]

For each method and ratio: the compressed cache's bytes (the `nbytes` of its arrays) against the full
cache of the same prompt, next to the kept fraction; prefill time with scoring + eviction against the
plain prefill; decode tok/s on the compressed cache against the full one. `--decode-methods` run
decode-time eviction (`capacity=`: a rolling cache of the kept size); "adakv:..." keeps a ragged pool.
Every configuration runs once to compile and once to time its prefill, then `--repeats` interleaved
timed rounds of decoding on its cache (`bench_common.decode_runs`): best run, spread, and the ratio
of best runs; compile time is reported apart.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import kvjax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_line, decode_runs  # noqa: E402
from bench_generate import emit, prompt_ids  # noqa: E402

DEFAULT_METHODS = ["streaming_llm", "snapkv", "pyramidkv", "tova", "knorm", "observed_attention",
                   "expected_attention", "adakv:snapkv"]
DEFAULT_DECODE = ["streaming_llm", "h2o"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--decode-methods", nargs="*", default=DEFAULT_DECODE,
                   help="decode-time eviction (a `RollingKV` of capacity context * (1 - ratio))")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    lm = kvjax.load(args.model, dtype="float32")
    ids = prompt_ids(lm, args.context).tolist()
    for m in args.methods + args.decode_methods:  # fail on a bad name before the long run
        kvjax.methods.get(m)
    keep = {r: max(1, int(args.context * (1 - r))) for r in args.ratios}
    rows = [(m, r, f"{m} {r}") for m in args.methods for r in args.ratios]
    rows += [(f"{m} (rolling)", r, f"{m} rolling {r}") for m in args.decode_methods for r in args.ratios]
    configs = {"full": {}} | {f"{m} {r}": dict(method=m, ratio=r) for m in args.methods for r in args.ratios}
    configs |= {f"{m} rolling {r}": dict(method=m, capacity=keep[r]) for m in args.decode_methods for r in args.ratios}
    runs = decode_runs(lm, ids, configs, args.new_tokens, args.repeats)
    full = runs["full"]
    lines = [f"{args.model}, float32, context {args.context} tokens, {args.new_tokens} new tokens, {args.repeats} "
             f"interleaved rounds; full cache {full.bytes:,} bytes, prefill {min(full.prefill_s):.2f} s, decode "
             f"{full.best:.1f} tok/s ({full.spread()}); {cpu_line()}", "",
             "| method | ratio | kept fraction | bytes | bytes / full | prefill s (full) | decode tok/s best (spread) | "
             "speed / full | CPU-time speed / full | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r, name in rows:
        row = runs[name]
        lines.append(f"| {m} | {r} | {keep[r] / args.context:.3f} | {row.bytes:,} | {row.bytes / full.bytes:.3f} | "
                     f"{min(row.prefill_s):.2f} ({min(full.prefill_s):.2f}) | {row.best:.1f} ({row.spread()}) | "
                     f"{row.best / full.best:.2f} | {row.cpu_best / full.cpu_best:.2f} | {row.compile_s:.1f} |")
        print(lines[-1], flush=True)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
