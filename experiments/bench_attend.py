"""One layer's decode attention (the xla/jnp path) of each layer state, timed side by side in one run.

    python experiments/bench_attend.py [--contexts 2048 8192] [--states dense int8 kivi-2 ...]
        [--steps 200] [--repeats 5] [--out experiments/results/bench_attend.md]

Where end-to-end decode time goes apart from the weights: one decode step's `attend_jnp` of one layer
at SmolLM2-135M's attention sizes (9 query heads, 3 KV heads, head dim 64, float32, batch 1) over a
cache of `context` random tokens. A jitted `fori_loop` runs `steps` attends, the state passed through
an `optimization_barrier` each step so XLA cannot hoist its dequantization out of the loop; each
configuration is compiled and warmed, then timed in `repeats` interleaved rounds (after
`block_until_ready`): best time per step, spread, and the ratio of the dense state's best to each.

States: "dense", "ragged" (Ada-KV pool, all heads equal), "rolling" (decode-time eviction, the cache
full), "latent" (MatryoshkaKV projections, half the rank), "palu" / "palu-g3" (`PaluKV`: latents of the
pre-RoPE keys and the values at half the rank, per KV head or jointly over the 3 heads; the random keys
stand for pre-RoPE ones), a quantizer spec (`QuantKV`), or "ragged:SPEC" (`QuantRaggedKV`). A quantized state runs `kvjax.native`'s fused kernel where it applies
(CPU); NAME/jnp is the same state on the jnp path (traced under `native.disabled()`), side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import kvjax
from kvjax import native
from kvjax.models.rope import rope_inv_freq
from kvjax.states import DenseKV, LatentKV, PaluKV, RaggedKV, RollingKV

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_line  # noqa: E402
from bench_generate import emit  # noqa: E402

H, K, D = 9, 3, 64  # SmolLM2-135M
DEFAULT = ["dense", "int8", "fp8", "per_token-4", "kivi-4", "kivi-2", "kvquant-4", "kvquant-3", "kvquant-2",
           "ragged", "ragged:kivi-2", "rolling", "latent", "palu", "palu-g3"]


def build(name: str, n: int, key):
    """A layer state holding n random tokens (positions 0..n-1), with room for the decode steps."""
    name = name.removesuffix("/jnp")
    kk, kv = jax.random.split(key)
    k = jax.random.normal(kk, (1, K, n, D), jnp.float32)
    v = jax.random.normal(kv, (1, K, n, D), jnp.float32)
    pos = jnp.arange(n, dtype=jnp.int32)[None]
    dense = DenseKV.init(1, K, n + 64, D, jnp.float32).append(k, v, pos, jnp.array([n]))
    if name == "dense":
        return dense
    if name == "rolling":
        empty = RollingKV.init(1, K, n, D, jnp.float32)  # filled as a prefill leaves it: full
        return dataclasses.replace(empty, k=k, v=v, pos=jnp.broadcast_to(pos[:, None], (1, K, n)),
                                   length=jnp.array([n], jnp.int32))
    if name == "latent":
        basis = jnp.linalg.qr(jax.random.normal(key, (K, D, D)))[0][:, :, : D // 2]
        return LatentKV.init(1, n + 64, basis, basis, jnp.float32).append(k, v, pos, jnp.array([n]))
    if name.startswith("palu"):
        g = K if name == "palu-g3" else 1
        bases = jnp.linalg.qr(jax.random.normal(key, (2, K // g, g * D, g * D)))[0][..., : g * D // 2]
        features = jnp.concatenate([jnp.zeros((1, n, H * D)), k.transpose(0, 2, 1, 3).reshape(1, n, K * D),
                                    v.transpose(0, 2, 1, 3).reshape(1, n, K * D)], axis=-1)
        empty = PaluKV.init(1, n + 64, bases[0], bases[1], rope_inv_freq(CFG), jnp.float32)
        return empty.append(k, v, pos, jnp.array([n]), features=features)
    if name.startswith("ragged"):
        ragged = RaggedKV.init(1, K, K * (n + 64), D, jnp.float32).append(k, v, pos, jnp.array([n]))
        if name == "ragged":
            return ragged
        q = kvjax.quantizers.get(name.split(":", 1)[1])
        return ragged.quantize(q.for_model(CFG).for_layer(0), n, room=64)
    return dense.quantize(kvjax.quantizers.get(name).for_model(CFG).for_layer(0), n + 64)


class CFG:  # what `Quantizer.for_model` and `rope_inv_freq` read of a model config
    head_dim, n_layers = D, 1

    @staticmethod
    def rope_for(layer):
        return 100000.0, None


def step_fn(steps: int, block: int):
    @jax.jit
    def run(state, q, q_pos):
        def body(i, carry):
            st, acc = carry
            st = jax.lax.optimization_barrier(st)
            out = st.attend_jnp(q + acc * 1e-6, q_pos + i, block=block)
            return st, acc + out
        return jax.lax.fori_loop(0, steps, body, (state, jnp.zeros_like(q)))[1]
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--states", nargs="+", default=DEFAULT)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--block", type=int, default=512, help="the model's attn_block")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    runs = {False: step_fn(args.steps, args.block), True: step_fn(args.steps, args.block)}  # jnp path: own trace

    def run(name, *a):
        jnp_path = name.endswith("/jnp")
        with native.disabled() if jnp_path else contextlib.nullcontext():
            return runs[jnp_path](*a)

    lines = [f"one layer's decode attention (H={H}, K={K}, D={D}, float32, batch 1; NAME: native kernel where it applies, NAME/jnp: xla path), {args.steps} steps "
             f"per run, {args.repeats} interleaved rounds; {cpu_line()}", "",
             "| context | state | bytes | bytes / dense | us / step best (spread) | speed / dense | CPU us / step best |",
             "|---|---|---|---|---|---|---|"]
    for n in args.contexts:
        states = {s: build(s, n, jax.random.key(0)) for s in args.states}
        q = jax.random.normal(jax.random.key(1), (1, 1, H, D), jnp.float32)
        q_pos = jnp.full((1, 1), n, jnp.int32)
        times, cpu = {}, {}
        for s, st in states.items():
            run(s, st, q, q_pos).block_until_ready()  # compile and warm
            times[s], cpu[s] = [], []
        for _ in range(args.repeats):
            for s, st in states.items():
                jax.block_until_ready((st, q))
                t0, c0 = time.perf_counter(), time.process_time()
                run(s, st, q, q_pos).block_until_ready()
                times[s].append((time.perf_counter() - t0) / args.steps * 1e6)
                cpu[s].append((time.process_time() - c0) / args.steps * 1e6)
        base_bytes = kvjax.states.base.tree_nbytes(states.get("dense", build("dense", n, jax.random.key(0))))
        base = min(times["dense"]) if "dense" in times else float("nan")
        for s, st in states.items():
            b = kvjax.states.base.tree_nbytes(st)
            lines.append(f"| {n} | {s} | {b:,} | {b / base_bytes:.3f} | {min(times[s]):.0f} "
                         f"({min(times[s]):.0f}-{max(times[s]):.0f}) | {base / min(times[s]):.2f} | {min(cpu[s]):.0f} |")
            print(lines[-1], flush=True)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
