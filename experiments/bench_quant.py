"""Bytes and decode speed of quantized KV caches vs the full cache, measured side by side in one run.

    python experiments/bench_quant.py [--contexts 2048 8000] [--quant int8 fp8 kivi-4 kivi-2 ...]
        [--new-tokens 64] [--repeats 3] [--out experiments/results/bench_quant.md]

For each context length and quantizer: the cache's bytes (codes + scales + zeros + residual +
positions: the `nbytes` of its arrays) against the full cache, effective bits per element, and greedy
decode tok/s against the full cache, all configurations of a context timed in interleaved rounds
(`bench_common.decode_runs`): best run, spread of the runs, and the ratio of the best runs, by the
wall clock and by process CPU time. Compile time is apart. The jnp attention reads the quantized
store a block at a time inside the online-softmax loop (`QuantStore.attention_parts`), its scales
folded into the query and the probabilities (`quant.scores`, `quant.mix`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import kvjax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_line, decode_runs  # noqa: E402
from bench_generate import emit, prompt_ids  # noqa: E402

DEFAULT_QUANT = ["int8", "fp8", "per_token-4", "kivi-4", "kivi-2", "kvquant-4", "kvquant-3", "kvquant-2"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8000])
    p.add_argument("--quant", nargs="+", default=DEFAULT_QUANT)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    for q in args.quant:
        kvjax.quantizers.get(q)
    lm = kvjax.load(args.model, dtype="float32")
    lines = [f"{args.model}, float32, {args.new_tokens} new tokens, {args.repeats} interleaved rounds; {cpu_line()}", "",
             "| context | quant | bits / element | bytes | bytes / full | decode tok/s best (spread) | "
             "full tok/s best (spread) | speed / full | CPU-time speed / full | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in args.contexts:
        ids = prompt_ids(lm, n).tolist()
        runs = decode_runs(lm, ids, {"full": {}} | {q: dict(quant=q) for q in args.quant}, args.new_tokens,
                           args.repeats)
        full = runs["full"]
        for q in args.quant:
            r = runs[q]
            lines.append(f"| {n} | {q} | {r.bits:.2f} | {r.bytes:,} | {r.bytes / full.bytes:.3f} | "
                         f"{r.best:.1f} ({r.spread()}) | {full.best:.1f} ({full.spread()}) | "
                         f"{r.best / full.best:.2f} | {r.cpu_best / full.cpu_best:.2f} | {r.compile_s:.1f} |")
            print(lines[-1], flush=True)  # rows as they come: a long run shows what it has
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
