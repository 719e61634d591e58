"""Rotary position embeddings (Su et al. 2021, arXiv 2104.09864), HF's rotate-half convention, with the
parameters of each layer (`cfg.rope_for(layer)`: families with local and global layers, such as
Gemma 3, use a different base per layer).

Legend: D head dim.
"""
from __future__ import annotations

import math

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
