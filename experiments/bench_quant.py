"""Bytes and decode speed of quantized KV caches vs the full cache, measured side by side in one run.

    python experiments/bench_quant.py [--contexts 2048 8000] [--quant int8 fp8 kivi-4 kivi-2 ...]
        [--new-tokens 32] [--out experiments/results/bench_quant.md]

For each context length and quantizer: the cache's bytes (codes + scales + zeros + residual +
positions: the `nbytes` of its arrays) against the full cache, effective bits per element, and greedy
decode tok/s (second of two runs; compile apart) against the full cache re-measured beside it.
On CPU the jnp attention dequantizes the whole store every step, so quantized decode is slower than
full-precision decode here; the Pallas kernels (kernels issue) dequantize inside the kernel.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

import kvjax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import emit, prompt_ids  # noqa: E402

DEFAULT_QUANT = ["int8", "fp8", "per_token-4", "kivi-4", "kivi-2", "kvquant-4", "kvquant-3", "kvquant-2"]


def measure(lm, ids, new_tokens, quant):
    runs = [lm.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False, quant=quant) for _ in range(2)]
    cache = lm.prefill(ids, quant=quant)
    return dict(tok_s=(len(runs[1].ids) - 1) / runs[1].decode_s, compile_s=runs[0].compile_s,
                bytes=kvjax.cache_nbytes(cache), bits=kvjax.memory_report(cache)["bits_per_element"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8000])
    p.add_argument("--quant", nargs="+", default=DEFAULT_QUANT)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    for q in args.quant:
        kvjax.quantizers.get(q)
    lm = kvjax.load(args.model, dtype="float32")
    lines = [f"{args.model}, float32, CPU, {args.new_tokens} new tokens; decode tok/s of the full cache "
             "re-measured beside each row", "",
             "| context | quant | bits / element | bytes | bytes / full | decode tok/s (full) | compile s |",
             "|---|---|---|---|---|---|---|"]
    for n in args.contexts:
        ids = prompt_ids(lm, n).tolist()
        for q in tqdm(args.quant, desc=f"{n} tokens", file=sys.stderr):
            row, full = measure(lm, ids, args.new_tokens, q), measure(lm, ids, args.new_tokens, None)
            lines.append(f"| {n} | {q} | {row['bits']:.2f} | {row['bytes']:,} | {row['bytes'] / full['bytes']:.3f} | "
                         f"{row['tok_s']:.1f} ({full['tok_s']:.1f}) | {row['compile_s']:.1f} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
