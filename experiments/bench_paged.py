"""Pages held by a paged KV layout in which eviction frees pages (`kvjax.states.PagedKV`, issue 22).

A batch of 32 requests with lengths from 256 to 8k (geometrically spaced), one layer of SmolLM2-135M's
cache shapes (3 KV heads, head dim 64, bf16; the model has 30 such layers, each holding the same
pages), compressed at ratio 0.5 by a score method. Reported per layer:

* the padded dense batch (every row padded to the longest, 8k), before and after compression (a
  compressed `DenseKV` keeps the longest row's budget for every row);
* the paged layout without eviction (each head holds ceil(len / P) pages);
* the paged layout after eviction at 0.5 by StreamingLLM (evicts a contiguous span: whole pages empty),
  Knorm (per-head top-k of -||k||: scattered holes) and Ada-KV over Knorm (per-head budgets), with
  compaction (fragmentation threshold 0.25) and without (threshold 1: only pages left empty are freed).

Memory used = pages held x page bytes; the pool's allocated capacity (`nbytes`) is the pages it was
built with (here: the batch's pages without eviction). Timings (CPU time of the jitted eviction and of
one decode-step attention, plain jnp) are repeated and reported as best and spread with the CPU line.

    python experiments/bench_paged.py --repeats 5 > experiments/results/paged/bench_paged.md

Keys and values are random normal (the benchmark counts pages; Knorm's choice over random keys is
the scattered worst case for fragmentation).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_line  # noqa: E402
from kvjax.methods.knorm import Knorm  # noqa: E402
from kvjax.methods.streaming_llm import StreamingLLM  # noqa: E402
from kvjax.states import DenseKV, PagedKV  # noqa: E402

N_KV, HEAD_DIM, N_LAYERS, DTYPE = 3, 64, 30, jnp.bfloat16  # SmolLM2-135M (HF config.json)


def lengths(batch: int, lo: int, hi: int) -> np.ndarray:
    return np.round(np.geomspace(lo, hi, batch)).astype(np.int32)


def cpu_seconds(fn, *args, repeats: int) -> list[float]:
    """Process CPU seconds of `fn(*args)` (compiled first, blocked on) for each of `repeats` runs."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(repeats):
        t = time.process_time()
        jax.block_until_ready(fn(*args))
        out.append(time.process_time() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--page-sizes", default="16,64")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    b, s = args.batch, args.max_len
    lens = lengths(b, args.min_len, s)
    n_keep = np.ceil(lens * (1 - args.ratio)).astype(np.int32)
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.normal(size=(b, N_KV, s, HEAD_DIM)), DTYPE)
    v = jnp.asarray(rng.normal(size=(b, N_KV, s, HEAD_DIM)), DTYPE)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q = jnp.asarray(rng.normal(size=(b, 1, 3 * N_KV, HEAD_DIM)), DTYPE)
    q_pos = jnp.asarray(lens[:, None], jnp.int32)
    itemsize = jnp.dtype(DTYPE).itemsize
    slot_bytes = 2 * HEAD_DIM * itemsize + 4  # K, V and a position per slot and KV head

    print(f"Paged KV: pages held ({b} requests, lengths {lens.min()}-{lens.max()}, ratio {args.ratio})\n")
    print(f"Command: `python experiments/bench_paged.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    print(f"Cache shapes: one layer of SmolLM2-135M ({N_KV} KV heads, head dim {HEAD_DIM}, bf16; x{N_LAYERS} "
          f"layers for the model). Lengths: {lens.tolist()}; tokens {int(lens.sum())}, kept per head "
          f"{int(n_keep.sum())}.\n")
    dense = b * N_KV * s * slot_bytes
    dense_c = b * N_KV * int(n_keep.max()) * slot_bytes
    print("| layout | page size | pages held | free pages | memory used (MiB) | vs padded dense | allocated (MiB) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| padded dense batch, no eviction | - | - | - | {dense / 2**20:.1f} | 1.00 | {dense / 2**20:.1f} |")
    print(f"| padded dense batch, compressed at {args.ratio} | - | - | - | {dense_c / 2**20:.1f} | "
          f"{dense_c / dense:.2f} | {dense_c / 2**20:.1f} |")
    freed = []
    timings = []
    for page in (int(x) for x in args.page_sizes.split(",")):
        n_pages = int(N_KV * np.sum(-(-lens // page)))  # the pool: the batch's pages without eviction
        fill = jax.jit(lambda k, v, page=page, n_pages=n_pages, thr=1.0: PagedKV.init(
            b, N_KV, s, HEAD_DIM, DTYPE, page_size=page, n_pages=n_pages, threshold=thr).append(
            k, v, pos, jnp.asarray(lens)))
        full = fill(k, v)
        assert int(full.n_free) == 0 and int(full.pages_held()) == n_pages
        alloc = full.nbytes() / 2**20

        def row(name, st):
            held = int(st.pages_held())
            used = int(st.held_bytes())
            print(f"| {name} | {page} | {held} | {int(st.n_free)} | {used / 2**20:.1f} | {used / dense:.2f} | "
                  f"{alloc:.1f} |")

        row("paged, no eviction", full)
        lk, lv, lpos = full.logical()
        view = DenseKV(k=lk, v=lv, pos=lpos, length=jnp.asarray(lens))  # what a score method scores
        keep_n = jnp.asarray(n_keep)
        for name, scores in (("StreamingLLM", StreamingLLM().score(view)), ("Knorm", Knorm().score(view))):
            for thr in (0.25, 1.0):
                st = dataclasses.replace(full, threshold=thr)
                evict = jax.jit(lambda st, sc: st.evict(st.keep_top(sc, keep_n)))
                out = evict(st, scores)
                assert np.array_equal(np.asarray(out.length), np.broadcast_to(n_keep[:, None], (b, N_KV)))
                row(f"paged, {name} at {args.ratio}, threshold {thr}", out)
                if thr == 0.25 and name == "Knorm":
                    kept = out
                    freed.append((page, int(out.n_free)))
                if thr == 0.25:
                    timings.append((f"keep_top + evict ({name}, P={page})", cpu_seconds(evict, st, scores, repeats=args.repeats)))
        for thr in (0.25, 1.0):
            st = dataclasses.replace(full, threshold=thr)
            scores = Knorm().score(view)
            out = jax.jit(lambda st, sc: st.evict(st.keep_top_pairs(sc, keep_n)))(st, scores)
            assert int(np.asarray(out.length).sum()) == N_KV * int(n_keep.sum())
            row(f"paged, Ada-KV(Knorm) at {args.ratio}, threshold {thr}", out)
        attend = jax.jit(lambda st, q: st.attend(q, q_pos))
        timings.append((f"decode attention, paged after Knorm (P={page})",
                        cpu_seconds(attend, kept, q, repeats=args.repeats)))
    d_state = DenseKV(k=k, v=v, pos=jnp.broadcast_to(pos[:, None], (b, N_KV, s)), length=jnp.asarray(lens))
    timings.append(("decode attention, padded dense (no eviction)",
                    cpu_seconds(jax.jit(lambda st, q: st.attend(q, q_pos)), d_state, q, repeats=args.repeats)))
    print("\nPages held and memory are one layer's; the model's are x"
          f"{N_LAYERS}. Memory used = pages held x page bytes (page bytes = P x (2 x {HEAD_DIM} x {itemsize} + 4)); "
          "allocated = `nbytes()` of the pool built for the batch without eviction (tables and free stack "
          "included), which eviction returns to the free stack for other requests rather than shrinking.\n")
    mean = lens.mean()
    for page, n_free in freed:
        print(f"After Knorm at {args.ratio} with compaction (P={page}), the {n_free} free pages hold "
              f"{n_free * page // N_KV} tokens per KV head: {n_free * page / N_KV / mean:.1f} more requests of the "
              f"batch's mean length ({mean:.0f} tokens) uncompressed.\n")
    print(f"### CPU time (jnp, jitted; {args.repeats} runs after a compile run)\n")
    print(cpu_line() + "\n")
    print("| step | best (s) | spread (s) |")
    print("|---|---|---|")
    for name, t in timings:
        print(f"| {name} | {min(t):.3f} | {min(t):.3f}-{max(t):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
