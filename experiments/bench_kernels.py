"""Pallas kernels on the available accelerator: time vs the jnp reference, achieved HBM bandwidth.

    python experiments/bench_kernels.py [--contexts 8192 32768 131072] [--out experiments/results/bench_kernels.md]

Per kernel and context: median time of the kernel and of its plain-jnp `*_reference` (both jitted),
the bytes the kernel must move (the memory-traffic model in its docstring) / time as a fraction of the
chip's peak HBM bandwidth, and for quantized decode the speed-up over bf16 dense decode (the Pallas
dense kernel on the same shapes). Shapes: Llama-3-8B attention (32 query heads, 8 KV heads, head dim
128), batch 4, bfloat16, every row holding the full context. Not a timed test: run it by hand.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import quantizers
from kvjax.kernels import (attention_column_sums, attention_column_sums_reference, decode_attention,
                           decode_attention_reference, prefill_attention, prefill_attention_reference,
                           quant_decode_attention, quant_decode_attention_reference, ragged_decode_attention,
                           ragged_decode_attention_reference)
from kvjax.states import DenseKV
from kvjax.states import QuantKV

PEAK_BYTES_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "TPU v5 lite": 819e9, "TPU v5e": 819e9,
                "TPU v6 lite": 1.64e12, "TPU v5p": 2.765e12, "TPU v4": 1.2e12}
B, H, K, D = 4, 32, 8, 128
QUANTS = ["kivi-4", "kivi-2", "per_token-4", "int8", "fp8"]


def peak() -> tuple[str, float | None]:
    kind = jax.devices()[0].device_kind
    for name, bw in PEAK_BYTES_S.items():
        if name in kind:
            return kind, bw
    return kind, None


def timed(fn, *args, reps: int = 20) -> float:
    """Median seconds of a jitted call (compiled and warmed up first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def leaves_bytes(*xs) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(xs))


def dense_state(rng, s: int):
    k = jnp.asarray(rng.standard_normal((B, K, s, D), np.float32), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((B, K, s, D), np.float32), jnp.bfloat16)
    return k, v, jnp.full((B,), s, jnp.int32)


def row(name, s, t_kernel, t_ref, nbytes, bw, extra=""):
    frac = f"{nbytes / t_kernel / bw:.0%}" if bw else "n/a"
    return (f"| {name} | {s:,} | {t_kernel * 1e3:.3f} | {t_ref * 1e3:.3f} | {t_ref / t_kernel:.1f}x | "
            f"{nbytes / 1e9:.3f} | {nbytes / t_kernel / 1e9:.0f} | {frac} | {extra} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--prefill-context", type=int, default=8192)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if jax.default_backend() == "cpu":
        raise SystemExit("bench_kernels needs a GPU or TPU (interpret mode on CPU says nothing about speed)")
    kind, bw = peak()
    rng = np.random.default_rng(0)
    q1 = jnp.asarray(rng.standard_normal((B, 1, H, D), np.float32), jnp.bfloat16)
    lines = [f"{kind} ({jax.default_backend()}, jax {jax.__version__}); batch {B}, {H} query heads, {K} KV heads, "
             f"head dim {D}, bfloat16; peak HBM {bw / 1e12 if bw else float('nan'):.2f} TB/s. Times are medians "
             "of 20 jitted calls; bytes from each kernel's memory-traffic model.", "",
             "| kernel | context | kernel ms | jnp ref ms | vs ref | GB moved | GB/s | of peak | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    dense_ms = {}
    for s in args.contexts:
        k, v, length = dense_state(rng, s)
        t_k = timed(jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n)), q1, k, v, length)
        t_r = timed(jax.jit(decode_attention_reference), q1, k, v, length)
        dense_ms[s] = t_k
        lines.append(row("decode (dense bf16)", s, t_k, t_r, leaves_bytes(k, v, q1, q1), bw))
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (B, K, s))
        dense = DenseKV(k, v, pos, length)
        for spec in QUANTS:
            st = QuantKV.from_dense(dense, quantizers.get(spec), s)
            a = (st.kq, st.vq, st.n_q, st.k_res, st.v_res, st.n_r)
            t_q = timed(jax.jit(lambda q, *a: quant_decode_attention(q, *a)), q1, *a)
            t_qr = timed(jax.jit(quant_decode_attention_reference), q1, *a)
            nbytes = leaves_bytes(st.kq, st.vq, st.k_res, st.v_res, q1, q1)
            lines.append(row(f"quant decode ({spec})", s, t_q, t_qr, nbytes, bw,
                             f"{t_k / t_q:.2f}x faster than bf16 dense"))
        del k, v, dense
        # ragged: per-head budgets averaging half the context (Ada-KV at ratio 0.5)
        lens = rng.integers(s // 8, s - s // 8, size=(B, K)).astype(np.int32)
        start = np.concatenate([np.zeros((B, 1), np.int32), np.cumsum(lens, 1)[:, :-1]], 1).astype(np.int32)
        n_pool = int(lens.sum(1).max())
        kp = jnp.asarray(rng.standard_normal((B, n_pool, D), np.float32), jnp.bfloat16)
        vp = jnp.asarray(rng.standard_normal((B, n_pool, D), np.float32), jnp.bfloat16)
        ra = (kp, vp, jnp.asarray(start), jnp.asarray(lens))
        t_g = timed(jax.jit(lambda q, *a: ragged_decode_attention(q, *a)), q1, *ra)
        t_gr = timed(jax.jit(ragged_decode_attention_reference), q1, *ra)
        nbytes = int(lens.sum()) * D * 2 * 2 + 2 * leaves_bytes(q1)  # each head's own K and V, q, out
        lines.append(row("ragged decode (Ada-KV pool)", s, t_g, t_gr, nbytes, bw,
                         f"heads keep {lens.mean() / s:.0%} of the context on average"))
    # scoring prefill: one 512-token chunk at the end of a long prompt
    s, t = args.prefill_context, 512
    k, v, length = dense_state(rng, s)
    q = jnp.asarray(rng.standard_normal((1, t, H, D), np.float32), jnp.bfloat16)
    k, v, length = k[:1], v[:1], length[:1]
    kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (1, K, s))
    q_pos = jnp.arange(s - t, s, dtype=jnp.int32)[None]
    t_p = timed(jax.jit(lambda *a: prefill_attention(*a)), q, q_pos, k, v, kv_pos, length)
    t_pr = timed(jax.jit(prefill_attention_reference), q, q_pos, k, v, kv_pos, length)
    flops = 4 * H * t * s * D
    lines.append(row("prefill forward (512-token chunk)", s, t_p, t_pr, leaves_bytes(k, v) * H // K * (t // 64), bw,
                     f"{flops / t_p / 1e12:.0f} TFLOP/s (compute-bound)"))
    _, lse = prefill_attention(q, q_pos, k, v, kv_pos, length)
    valid = jnp.ones((1, t), bool)
    t_c = timed(jax.jit(lambda *a: attention_column_sums(*a)), q, q_pos, valid, k, kv_pos, length, lse)
    t_cr = timed(jax.jit(attention_column_sums_reference), q, q_pos, valid, k, kv_pos, length)
    lines.append(row("H2O column sums (512 queries)", s, t_c, t_cr, leaves_bytes(k) * H // K, bw,
                     f"{flops / 2 / t_c / 1e12:.0f} TFLOP/s"))
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
