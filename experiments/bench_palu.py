"""Decode speed and bytes of Palu's latent caches vs the full cache, measured side by side in one run.

    python experiments/bench_palu.py [--model smollm2-135m] [--contexts 2048 8192] [--ratio 0.5]
        [--specs palu "palu(group=3)"] [--new-tokens 64] [--repeats 3] [--out experiments/results/latent/...]

For each context length: the full cache and each Palu spec at `--ratio` (the fraction of K/V bytes removed;
bases calibrated once on kvjax's generated prose, in the compile run), decoded greedily on a kept prefill
cache in interleaved rounds (`bench_common.decode_runs`): best run, spread of the runs, and the ratio of
the best runs by the wall clock and by process CPU time. Compile and calibration time are apart. `PaluKV`
rebuilds each key block from its latents inside the attention's block loop (`kvjax.states.palu`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import kvjax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_line, decode_runs  # noqa: E402
from bench_generate import emit, prompt_ids  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--specs", nargs="+", default=["palu", "palu(group=3)"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    for spec in args.specs:  # fail on a bad spec before the long run
        kvjax.methods.get(spec)
    lm = kvjax.load(args.model, dtype="float32")
    lines = [f"{args.model}, float32, ratio {args.ratio}, {args.new_tokens} new tokens, {args.repeats} interleaved "
             f"rounds; {cpu_line()}", "",
             "| context | cache | bytes | bytes / full | decode tok/s best (spread) | full tok/s best (spread) | "
             "speed / full | CPU-time speed / full | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in args.contexts:
        ids = prompt_ids(lm, n).tolist()
        configs = {"full": {}} | {s: dict(method=s, ratio=args.ratio) for s in args.specs}
        runs = decode_runs(lm, ids, configs, args.new_tokens, args.repeats)
        full = runs["full"]
        for s in args.specs:
            r = runs[s]
            lines.append(f"| {n} | `{s}` | {r.bytes:,} | {r.bytes / full.bytes:.3f} | {r.best:.1f} ({r.spread()}) | "
                         f"{full.best:.1f} ({full.spread()}) | {r.best / full.best:.2f} | "
                         f"{r.cpu_best / full.cpu_best:.2f} | {r.compile_s:.1f} |")
            print(lines[-1], flush=True)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
