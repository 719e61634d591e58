"""Chunked compression (compress after every prefill chunk, `kvjax.recompress`) against compress-after-prefill:
peak memory of the prefill's programs and passkey accuracy, at long contexts.

    KVJAX_DATA=/work/shared/data python experiments/chunked_compression.py --memory-lengths 4096 8192 16384 \\
        --passkey-lengths 4096 --n 3 --method snapkv --ratio 0.5 --out experiments/results/chunked_compression

Peak memory: every jitted program a prefill runs (each chunk's forward, and the compression) is compiled
for its real shapes and asked `compiled.memory_analysis()`; a program's live bytes are its arguments +
outputs - donated (aliased) bytes + temporaries, and the prefill's peak is the largest over its programs.
The weights are an argument of the forward programs; the table also gives the peak without them. The KV
column is the cache's own bytes at its largest (the dense state: K/V in the model dtype, int32 positions).
SmolLM2-135M takes 8192 positions: at 16384 the programs are compiled and measured, not run.
Passkey: the question is in the prompt (`question_in_context`), the whole prompt is prefilled and
compressed (both modes alike), then greedy decoding; a sample passes if the key is in the answer.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import generation, recompress
from kvjax.compress import compress
from kvjax.eval import prompts
from kvjax.shapes import PREFILL_CHUNK, bucket
from kvjax.states.cache import cache_nbytes, model_cache


def program_peak(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def sds(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def peak_bytes(lm, plan, length: int) -> dict:
    """Live bytes of the prefill's programs for one row of `length` tokens under `plan` (chunked or not)."""
    cfg, method = lm.cfg, plan.method
    spec = method.observations()
    chunked = plan.chunk is not None
    chunk = plan.chunk if chunked else min(bucket(length), PREFILL_CHUNK)
    slots = recompress.slots_for(plan) if chunked else bucket(length)
    cache = jax.eval_shape(lambda: model_cache(cfg, 1, slots))
    obs = jax.eval_shape(lambda: recompress.fresh_obs(cfg, spec, model_cache(cfg, 1, slots), np.array([length])))
    tok = jax.ShapeDtypeStruct((1, chunk), jnp.int32)
    n_valid = jax.ShapeDtypeStruct((1,), jnp.int32)
    last = jax.ShapeDtypeStruct((1, cfg.vocab_size), jnp.float32)
    fwd = generation.prefill_chunk.lower(sds(lm.params), tok, n_valid, cache, last, obs, cfg=cfg,
                                         observe=spec).compile()
    n_keep = jax.ShapeDtypeStruct((cfg.n_layers, 1), jnp.int32)
    caps = (slots,) * cfg.n_layers if chunked else recompress_caps(plan)
    program = recompress.compress_in_place if chunked else compress  # what each prefill runs
    comp = program.lower(cache, obs, n_keep, method=method, cfg=cfg, capacities=caps).compile()
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(lm.params))
    f, c = program_peak(fwd), program_peak(comp)
    kv = cache_nbytes(cache)
    return dict(forward_peak=f, compress_peak=c, peak=max(f, c), peak_without_weights=max(f - weights, c),
                kv_bytes=kv, slots=slots)


def recompress_caps(plan):
    return tuple(int(row.max()) for row in plan.n_keep)


def memory_rows(lm, lengths, method: str, ratio: float, chunk: int) -> list[dict]:
    rows = []
    for length in lengths:
        for mode in ("after", "chunked"):
            kw = dict(method=method, ratio=ratio, chunked_compression=chunk if mode == "chunked" else None)
            rows.append(dict(length=length, mode=mode, method=method, ratio=ratio,
                             chunk=chunk if mode == "chunked" else None,
                             **peak_bytes(lm, lm._plan([[0] * length], **kw), length)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def passkey_rows(lm, lengths, n: int, method: str, ratio: float, chunk: int, seed: int) -> list[dict]:
    filler = prompts.filler_haystack(lm.tokenizer.encode)
    rows = []
    for length in lengths:
        samples = [prompts.passkey_sample(lm.tokenizer, filler, length, None, i, seed, True) for i in range(n)]
        for mode in ("full", "after", "chunked"):
            kw = {} if mode == "full" else dict(method=method, ratio=ratio)
            if mode == "chunked":
                kw["chunked_compression"] = chunk
            hits, secs = 0, 0.0
            for s in samples:
                t0 = time.perf_counter()
                out = lm.generate(list(s.context) + list(s.suffix), max_new_tokens=s.max_new_tokens, **kw)
                secs += time.perf_counter() - t0
                hits += int(s.answers[0] in out.text)
            rows.append(dict(length=length, mode=mode, method="full" if mode == "full" else method,
                             ratio=None if mode == "full" else ratio, chunk=kw.get("chunked_compression"),
                             passkey=hits / n, n=n, seconds=round(secs, 1)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--memory-lengths", type=int, nargs="*", default=[4096, 8192, 16384],
                   help="prompt lengths whose prefill programs are compiled and measured (nothing runs)")
    p.add_argument("--passkey-lengths", type=int, nargs="*", default=[4096])
    p.add_argument("--n", type=int, default=3, help="passkey samples per length")
    p.add_argument("--method", default="snapkv")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--chunk", type=int, default=PREFILL_CHUNK)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    lm = kvjax.load(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.method}_{args.ratio}_chunk{args.chunk}"
    if args.memory_lengths:
        mem = memory_rows(lm, args.memory_lengths, args.method, args.ratio, args.chunk)
        (args.out / f"memory_{name}.json").write_text(json.dumps(mem, indent=1))
    if args.passkey_lengths and args.n:
        rows = passkey_rows(lm, args.passkey_lengths, args.n, args.method, args.ratio, args.chunk, args.seed)
        (args.out / f"passkey_{name}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
