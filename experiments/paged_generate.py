"""`LM.generate(layout="paged")` on SmolLM2-135M against the padded layout: the same greedy tokens, and the
cache's bytes (issue 22).

Two chat prompts of different lengths in one batch; each method evicts at ratio 0.5 after the prefill
(kvpress semantics), then 16 tokens are decoded greedily. Reported per method: whether the paged
layout's tokens equal the padded layout's (a `DenseKV` padded to the longest row, or Ada-KV's `RaggedKV`
pool), the bytes of both caches after decoding (`cache_nbytes`: what is allocated), and the pages the
paged layout holds against its pools' pages (30 layers, pages of `--page-size` slots).

    python experiments/paged_generate.py --page-size 16 > experiments/results/paged/generate_smollm2.md
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_line  # noqa: E402
import kvjax  # noqa: E402

QUESTIONS = ["Write a short poem about the sea, the wind and the sailors who cross it at night. " * 16
             + "Give it a title.",
             "Remember: the secret word is apple. " * 16 + "What is the secret word?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--methods", default="snapkv,adakv:snapkv,knorm")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    lm = kvjax.load("smollm2-135m", dtype="float32")
    ids = [lm.chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    print(f"# Paged layout on SmolLM2-135M: greedy tokens against the padded layout\n\n{date}  \n{cpu_line()}  \n"
          f"`python experiments/paged_generate.py --page-size {args.page_size} --methods {args.methods} "
          f"--max-new-tokens {args.max_new_tokens}`\n\nprompts of {[len(r) for r in ids]} tokens, ratio 0.5, "
          f"{args.max_new_tokens} new tokens, float32\n")
    print("| method | same tokens | padded bytes | paged bytes | pages held | pool pages |\n|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        kw = dict(method=method, ratio=0.5, max_new_tokens=args.max_new_tokens, stop_at_eos=False)
        padded = lm.generate(ids, **kw)
        paged = lm.generate(ids, layout="paged", page_size=args.page_size, **kw)
        layers = paged.cache.layers
        print(f"| {method} | {paged.ids == padded.ids} | {padded.cache_bytes:,} | {paged.cache_bytes:,} | "
              f"{sum(int(x.pages_held()) for x in layers):,} | {sum(x.n_pages for x in layers):,} |", flush=True)
    print(f"\nanswers (padded layout, last method): {padded.text!r}")


if __name__ == "__main__":
    main()
