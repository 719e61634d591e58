"""Attention of the prompt's last W queries over all keys (SnapKV, PyramidKV, TOVA observe this)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.methods.base import ScoreContext


def window_attention(ctx: ScoreContext, window: int) -> jax.Array:
    """Softmax attention float32 [B, H, W, S] of the last `window` prompt queries over the layer's keys.

    Causal (key position <= query position), so inside the window it is lower-triangular; queries
    are post-RoPE at their own positions, keys post-RoPE (kvpress `compute_window_attention`).
    """
    q = ctx.obs.q_win[:, -window:].astype(jnp.float32)  # [B, W, H, D]
    q_pos = ctx.obs.win_pos[:, -window:]  # [B, W]
    b, w, h, d = q.shape
    n_kv = ctx.k.shape[1]
    qg = q.reshape(b, w, n_kv, h // n_kv, d)
    sc = jnp.einsum("bwkgd,bksd->bkgws", qg, ctx.k.astype(jnp.float32)) * (d ** -0.5)
    visible = ctx.used[:, :, None, None, :] & (ctx.pos[:, :, None, None, :] <= q_pos[:, None, None, :, None])
    sc = jnp.where(visible, sc, -jnp.inf)
    return jax.nn.softmax(sc, axis=-1).reshape(b, h, w, -1)
