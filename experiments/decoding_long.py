"""Decode-time compression on a long generation (`kvjax.recompress`, kvpress DecodingPress semantics): SmolLM2-135M
greedy-generates 2048 tokens after `examples/long_prompt.txt`, once with the full cache and once re-scoring with
SnapKV every `compression_interval` tokens down to `target_size`, all inside the jitted decode loop.

    python experiments/decoding_long.py --new 2048 --interval 128 --target 512 \\
        --out experiments/results/chunked_compression/decoding_long.json

Reports the cache's slots and bytes, decode speed, and how many leading tokens agree with the full cache
(nothing is evicted before the first compression, so up to it they should agree).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import kvjax
from kvjax.recompress import DecodeCompression


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new", type=int, default=2048)
    p.add_argument("--interval", type=int, default=128)
    p.add_argument("--target", type=int, default=512)
    p.add_argument("--method", default="snapkv")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    lm = kvjax.load()
    ids = lm.encode((Path(__file__).resolve().parents[1] / "examples" / "long_prompt.txt").read_text())
    d = DecodeCompression(compression_interval=args.interval, target_size=args.target)
    runs = {"full": lm.generate(ids, max_new_tokens=args.new, stop_at_eos=False),
            "decoding": lm.generate(ids, method=args.method, max_new_tokens=args.new, stop_at_eos=False, decoding=d)}
    a, b = runs["full"].ids, runs["decoding"].ids
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    rows = {k: dict(new_tokens=len(g.ids), slots=int(g.cache.layers[0].k.shape[2]),
                    held=int(np.asarray(g.cache.layers[0].length)[0]), cache_bytes=g.cache_bytes,
                    decode_tok_s=round((len(g.ids) - 1) / g.decode_s, 2), prefill_s=round(g.prefill_s, 2))
            for k, g in runs.items()}
    out = dict(prompt_tokens=len(ids), method=args.method, compression_interval=args.interval,
               target_size=args.target, hidden_states_buffer_size=d.hidden_states_buffer_size,
               first_compression_after=args.interval, tokens_agreeing_with_full=agree, runs=rows,
               decoding_text_tail=runs["decoding"].text[-300:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
