"""Attention of the prompt's last W queries over all keys (SnapKV, PyramidKV, TOVA observe this)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.kernels import dispatch
from kvjax.methods.base import ScoreContext


def window_attention(ctx: ScoreContext, window: int) -> jax.Array:
    """Softmax attention float32 [B, H, W, S] of the last `window` prompt queries over the layer's keys.

    Causal (key position <= query position), so inside the window it is lower-triangular; queries
    are post-RoPE at their own positions, keys post-RoPE (kvpress `compute_window_attention`). With
    `ctx.attention_impl` "pallas" / "auto" the scoring-prefill kernel computes it (`kernels.window_attention`).
    """
    q, q_pos = ctx.obs.q_win[:, -window:], ctx.obs.win_pos[:, -window:]  # [B, W, H, D], [B, W]
    plain = lambda: _window_attention(q.astype(jnp.float32), q_pos, ctx)  # noqa: E731
    if ctx.attention_impl == "xla":
        return plain()
    return dispatch.kernel_or(lambda: dispatch.window_probs(q, q_pos, ctx.k, ctx.pos, ctx.length), plain,
                              strict=ctx.attention_impl == "pallas")


def _window_attention(q, q_pos, ctx: ScoreContext) -> jax.Array:
    b, w, h, d = q.shape
    n_kv = ctx.k.shape[1]
    qg = q.reshape(b, w, n_kv, h // n_kv, d)
    sc = jnp.einsum("bwkgd,bksd->bkgws", qg, ctx.k.astype(jnp.float32)) * (d ** -0.5)
    visible = ctx.used[:, :, None, None, :] & (ctx.pos[:, :, None, None, :] <= q_pos[:, None, None, :, None])
    sc = jnp.where(visible, sc, -jnp.inf)
    return jax.nn.softmax(sc, axis=-1).reshape(b, h, w, -1)
