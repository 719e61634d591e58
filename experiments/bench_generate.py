"""Prefill and decode speed of kvjax, optionally side by side with Hugging Face transformers.

    python experiments/bench_generate.py [--model smollm2-135m] [--lengths 512 2048 4096]
        [--decode-context 2048] [--decode-tokens 64] [--repeats 3] [--compare] [--out FILE.md]

Every figure is measured in this run on this machine: prefill tok/s at each length (best of
`--repeats`, compile excluded and reported apart), decode tok/s for `--decode-tokens` greedy tokens
after a `--decode-context`-token prompt, peak RSS after loading and at the end. With `--compare`,
transformers (float32, sdpa attention, same GGUF weights) is measured the same way, and ratios printed.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_line  # noqa: E402
ESSAYS = REPO.parent / "shared" / "data" / "paul_graham_essays"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(lines: list[str], out: Path | None) -> None:
    """Print a markdown table and, with `out`, write it there too."""
    table = "\n".join(lines)
    print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")


def prompt_ids(lm, n: int) -> np.ndarray:
    """n real-text token ids (Paul Graham essays if present, else a fixed pseudo-random sequence)."""
    if ESSAYS.is_dir():
        text = "\n\n".join(p.read_text() for p in sorted(ESSAYS.glob("*.txt")))
        ids = lm.encode(text[: n * 8])
        if len(ids) >= n:
            return np.asarray(ids[:n], np.int32)
    return np.random.default_rng(0).integers(100, lm.cfg.vocab_size, n).astype(np.int32)


def bench_kvjax(lm, lengths, decode_context, decode_tokens, repeats):
    import jax

    from kvjax.timing import compile_seconds

    rows = {}
    for n in lengths:
        ids = prompt_ids(lm, n)[None]
        times, c0 = [], compile_seconds()
        t0 = time.perf_counter()
        for r in range(repeats + 1):
            t = time.perf_counter()
            logits, _ = lm._prefill([ids[0].tolist()])
            jax.block_until_ready(logits)
            times.append(time.perf_counter() - t)
        compile_s = compile_seconds() - c0
        rows[f"prefill {n}"] = dict(tok_s=n / min(times[1:]), compile_s=compile_s,
                                    first_call_s=times[0], wall_s=time.perf_counter() - t0)
    ids = prompt_ids(lm, decode_context)
    best = None
    for r in range(repeats + 1):
        out = lm.generate(ids, max_new_tokens=decode_tokens, stop_at_eos=False)
        steps = len(out.ids) - 1  # the first new token comes from the prefill's logits
        rate = steps / out.decode_s
        if r == 0:
            first_compile = out.compile_s
        elif best is None or rate > best:
            best = rate
    rows[f"decode {decode_tokens} @ {decode_context}"] = dict(tok_s=best, compile_s=first_compile)
    return rows


def bench_transformers(gguf_path, lengths, decode_context, decode_tokens, repeats, lm):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    rows = {}
    with torch.inference_mode():
        for n in lengths:
            ids = torch.from_numpy(prompt_ids(lm, n)[None].astype(np.int64))
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                model(ids, use_cache=True, logits_to_keep=1)
                times.append(time.perf_counter() - t)
            rows[f"prefill {n}"] = dict(tok_s=n / min(times))
        ids = torch.from_numpy(prompt_ids(lm, decode_context)[None].astype(np.int64))
        best = None
        for _ in range(repeats):
            out = model(ids, use_cache=True, logits_to_keep=1)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(decode_tokens - 1):  # same step count as kvjax: first token from prefill
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            rate = (decode_tokens - 1) / (time.perf_counter() - t)
            best = rate if best is None else max(best, rate)
        rows[f"decode {decode_tokens} @ {decode_context}"] = dict(tok_s=best)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    p.add_argument("--decode-context", type=int, default=2048)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare", action="store_true", help="also measure transformers (needs torch)")
    p.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = p.parse_args(argv)

    import kvjax
    from kvjax.hub import fetch

    t = time.perf_counter()
    lm = kvjax.load(args.model, dtype="float32")
    load_s, rss_load = time.perf_counter() - t, peak_rss_mb()
    print(f"loaded {lm} in {load_s:.1f}s, peak RSS {rss_load:.0f} MB", file=sys.stderr)
    ours = bench_kvjax(lm, args.lengths, args.decode_context, args.decode_tokens, args.repeats)
    rss_end = peak_rss_mb()
    theirs = {}
    if args.compare:
        theirs = bench_transformers(fetch(args.model), args.lengths, args.decode_context, args.decode_tokens,
                                    args.repeats, lm)

    lines = [f"model {args.model}, float32, CPU; load {load_s:.1f}s; peak RSS after load {rss_load:.0f} MB, "
             f"after kvjax runs {rss_end:.0f} MB", "", cpu_line(), "",
             "| measurement | kvjax tok/s | compile s | transformers tok/s | ratio |", "|---|---|---|---|---|"]
    for name, row in ours.items():
        other = theirs.get(name, {}).get("tok_s")
        ratio = f"{row['tok_s'] / other:.2f}x" if other else "-"
        other_s = f"{other:.1f}" if other else "-"
        lines.append(f"| {name} | {row['tok_s']:.1f} | {row['compile_s']:.1f} | {other_s} | {ratio} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
