"""Memory and speed of eviction methods vs the full cache, measured side by side in one run.

    python experiments/bench_eviction.py [--model smollm2-135m] [--context 4096] [--ratios 0.25 0.5 0.75]
        [--methods snapkv knorm ...] [--new-tokens 32] [--out experiments/results/bench_eviction.md]

For each method and ratio: the compressed cache's bytes (the `nbytes` of its arrays) against the full
cache of the same prompt, next to the kept fraction; prefill time with scoring + eviction against the
plain prefill; decode tok/s on the compressed cache against the full one, the full cache re-measured
right after each row. Each configuration runs twice and the second run is reported (the first
compiles); compile time is reported apart.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

import kvjax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import emit, prompt_ids  # noqa: E402

DEFAULT_METHODS = ["streaming_llm", "snapkv", "pyramidkv", "tova", "knorm", "observed_attention",
                   "expected_attention", "adakv:snapkv"]


def run(lm, ids, new_tokens, **kw):
    """Second of two identical generate calls (the first compiles), and the compressed prefill cache."""
    first = lm.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False, **kw)
    out = lm.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False, **kw)
    cache = lm.prefill(ids, **kw)
    return dict(prefill_s=out.prefill_s, decode_tok_s=(len(out.ids) - 1) / out.decode_s,
                compile_s=first.compile_s, bytes=kvjax.cache_nbytes(cache))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    lm = kvjax.load(args.model, dtype="float32")
    ids = prompt_ids(lm, args.context).tolist()
    for m in args.methods:  # fail on a bad name before the long run
        kvjax.methods.get(m)
    full = run(lm, ids, args.new_tokens)
    lines = [f"{args.model}, float32, CPU, context {args.context} tokens, {args.new_tokens} new tokens; "
             f"full cache {full['bytes']:,} bytes, prefill {full['prefill_s']:.2f} s, "
             f"decode {full['decode_tok_s']:.1f} tok/s", "",
             "| method | ratio | kept fraction | bytes | bytes / full | prefill s (full) | decode tok/s (full) | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    configs = [(m, r) for m in args.methods for r in args.ratios]
    for m, r in tqdm(configs, desc="methods x ratios", file=sys.stderr):
        row = run(lm, ids, args.new_tokens, method=m, ratio=r)
        full = run(lm, ids, args.new_tokens)  # re-measured beside each row: the machine is noisy
        kept = max(1, int(args.context * (1 - r))) / args.context
        lines.append(f"| {m} | {r} | {kept:.3f} | {row['bytes']:,} | {row['bytes'] / full['bytes']:.3f} | "
                     f"{row['prefill_s']:.2f} ({full['prefill_s']:.2f}) | {row['decode_tok_s']:.1f} "
                     f"({full['decode_tok_s']:.1f}) | {row['compile_s']:.1f} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
