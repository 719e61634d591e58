"""Write the passkey prompts of `kvjax eval passkey` (same builder, same seed) to JSON, for other tools.

    python experiments/passkey_prompts.py --lengths 1024 2048 4096 --n 10 --seed 0 --out prompts.json

Each record: length, sample, context ids (compressed part), suffix ids (question, assistant header,
answer prefix), the pass key, max_new_tokens. `experiments/kvpress_passkey_sweep.py` reads it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import kvjax
from kvjax.eval import prompts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--question-in-context", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    tok = kvjax.load(args.model).tokenizer
    filler = prompts.filler_haystack(tok.encode)
    samples = [prompts.passkey_sample(tok, filler, n, None, i, args.seed, args.question_in_context)
               for n in args.lengths for i in range(args.n)]
    records = [dict(length=s.length, sample=s.index, context=list(s.context), suffix=list(s.suffix),
                    answer=s.answers[0], max_new_tokens=s.max_new_tokens) for s in samples]
    args.out.write_text(json.dumps(dict(seed=args.seed, question_in_context=args.question_in_context,
                                        samples=records)))
    print(f"wrote {len(records)} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
