"""Rotary position embeddings (Su et al. 2021, arXiv 2104.09864), HF's rotate-half convention, with the
parameters of each layer (`cfg.rope_for(layer)`: families with local and global layers, such as
Gemma 3, use a different base per layer).

Legend: D head dim.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_freq(cfg, layer: int = 0) -> np.ndarray:
    """Inverse frequencies [D/2] of layer `layer`'s RoPE, with HF's linear / llama3 scaling rules and
    llama.cpp's per-frequency divisors (`freq_factors`)."""
    theta, scaling = cfg.rope_for(layer)
    d = cfg.head_dim
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if scaling is None:
        return inv.astype(np.float32)
    kind, factor = scaling[0], scaling[1]
    if kind == "linear":
        return (inv / factor).astype(np.float32)
    if kind == "freq_factors":
        factors = np.asarray(scaling[1:], np.float64)
        if factors.shape != inv.shape:
            raise ValueError(f"rope_freqs has {factors.size} factors, expected head_dim/2 = {inv.size}")
        return (inv / factors).astype(np.float32)
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    _, factor, low, high, orig = scaling
    wavelen = 2 * math.pi / inv
    smooth = (orig / wavelen - low) / (high - low)
    scaled = np.where(wavelen > orig / low, inv / factor, inv)
    mid = (wavelen <= orig / low) & (wavelen >= orig / high)
    scaled = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return scaled.astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE. x [..., D], positions int [...] (x's leading axes, or broadcastable to them);
    rotating by -positions undoes it."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [..., D/2]
    return rotate(x, jnp.cos(angles), jnp.sin(angles))


def rotate(x, cos, sin):
    """Rotate-half RoPE of x [..., D] by the angles whose cos and sin [..., D/2] are given."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def consecutive_run(pos, skip):
    """(run, p0) of a block of slots, pos int [..., S]: p0 = pos[..., :1] (each row's first slot) and run,
    bool [], True iff every slot not `skip` (bool like pos) holds p0 + j, j its index along the last axis."""
    p0 = pos[..., :1]
    return jnp.all(skip | (pos == p0 + jnp.arange(pos.shape[-1], dtype=pos.dtype))), p0


def offset_rotations(n: int, inv_freq):
    """(cos, sin) float32 [n, D/2] of the angles j theta, j < n. Numpy frequencies give constants (float64
    math); traced ones (a state's leaf) are built from one cos and sin of each 2^i theta by angle addition,
    log2(n) doublings of the table, not n D/2 transcendentals (~2.5 ns each on XLA:CPU)."""
    if isinstance(inv_freq, np.ndarray):
        step = np.arange(n, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)
        return np.cos(step).astype(np.float32), np.sin(step).astype(np.float32)
    inv = inv_freq.astype(jnp.float32)
    cos, sin = jnp.ones((1,) + inv.shape, jnp.float32), jnp.zeros((1,) + inv.shape, jnp.float32)
    while cos.shape[0] < n:  # rows [m, 2m) = rows [0, m) rotated by m theta (m a power of two: m * theta exact)
        m = cos.shape[0]
        cm, sm = jnp.cos(m * inv), jnp.sin(m * inv)
        cos, sin = jnp.concatenate([cos, cos * cm - sin * sm]), jnp.concatenate([sin, sin * cm + cos * sm])
    return cos[:n], sin[:n]


def rotate_block(x, pos, inv_freq, skip):
    """RoPE of a block x [..., S, D] at pos int [..., S], without a sin or cos per slot where each row's
    slots not `skip` (bool like pos: unused or masked slots) hold consecutive positions p0 + j
    (`consecutive_run`): the rotation by p0 + j is that by p0 (one sin/cos per row) composed with the
    constant rotations by j theta (`offset_rotations`). Other blocks (tokens evicted between them, slots
    refilled out of order) rotate per slot, as `apply_rope`. XLA:CPU spends ~2.5 ns per sin or cos: per
    key, the rotation costs more than the rest of a block's attention. Skipped slots hold garbage."""
    run, p0 = consecutive_run(pos, skip)

    def table(x):
        cj, sj = offset_rotations(pos.shape[-1], inv_freq)
        a0 = p0[..., None].astype(jnp.float32) * inv_freq  # [..., 1, D/2]
        c0, s0 = jnp.cos(a0), jnp.sin(a0)
        return rotate(x, c0 * cj - s0 * sj, s0 * cj + c0 * sj)

    return jax.lax.cond(run, table, lambda x: apply_rope(x, pos, inv_freq), x)
