"""Approximate leverage scores of the pre-RoPE keys (Chari & Van Durme 2025, "Compactor", arXiv 2507.08143):
keep the keys that are geometric outliers of their head's key cloud.

Follows kvpress 0.5.5 `LeverageScorePress` (sketch_dimension 48): pre-RoPE keys X (kvjax un-rotates the
cached keys, R(-p) k, instead of recomputing k_proj) centered over the prompt, sketched X Phi with a
Gaussian Phi [D, 48] / sqrt(48) per head; G = (X Phi)^T (X Phi) + jitter I (jitter 1e-2, raised
tenfold up to four times while the Cholesky factorization fails); score_j = x_j^T G^-1 x_j, floored at
0, then z-normalized over the layer (unbiased std floored at 1e-6). The sketch is random: kvpress
draws it from torch's global generator, kvjax from `seed` folded with the layer, so kept sets agree
with kvpress in distribution, not set by set (`tests/test_kvpress_parity.py`).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax.methods.base import EvictionMethod, ScoreContext, check_positive, register
from kvjax.methods.non_causal_attention import znorm
from kvjax.models.rope import apply_rope, rope_inv_freq


def leverage_scores(x, used, phi):
    """x [B, K, S, D] pre-RoPE keys (used [B, 1, S]), phi [B, K, D, r] -> [B, K, S] sketched leverage."""
    n = jnp.maximum(used.sum(-1), 1)[..., None, None].astype(jnp.float32)  # [B, 1, 1, 1]
    m = used[..., None].astype(jnp.float32)
    x = x.astype(jnp.float32)
    x = (x - (x * m).sum(2, keepdims=True) / n) * m
    xs = jnp.einsum("bksd,bkdr->bksr", x, phi)  # [B, K, S, r] (zero on unused slots)
    g = jnp.einsum("bksr,bksq->bkrq", xs, xs)
    g = 0.5 * (g + jnp.swapaxes(g, -1, -2))
    eye = jnp.eye(g.shape[-1], dtype=jnp.float32)
    chol = jnp.linalg.cholesky(g + 1e-2 * eye)
    done = jnp.isfinite(chol).all((-1, -2), keepdims=True)
    for jitter in (1e-1, 1.0, 10.0, 100.0):  # kvpress chol_with_jitter(jitter=1e-2, max_tries=5)
        c = jnp.linalg.cholesky(g + jitter * eye)
        chol = jnp.where(done, chol, c)
        done = done | jnp.isfinite(c).all((-1, -2), keepdims=True)
    y = jax.scipy.linalg.cho_solve((chol, True), jnp.swapaxes(xs, -1, -2))  # G^-1 X^T [B, K, r, S]
    return jnp.maximum((xs * jnp.swapaxes(y, -1, -2)).sum(-1), 0.0)


@register("leverage")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Leverage(EvictionMethod):
    sketch_dimension: int = 48
    seed: int = 0

    def __post_init__(self):
        check_positive(sketch_dimension=self.sketch_dimension)

    def score(self, ctx: ScoreContext):
        b, n_kv, _, d = ctx.k.shape
        r = self.sketch_dimension
        pre = apply_rope(ctx.k.astype(jnp.float32), -ctx.pos, jnp.asarray(rope_inv_freq(ctx.cfg, ctx.layer)))
        key = jax.random.fold_in(jax.random.key(self.seed), ctx.layer)
        phi = jax.random.normal(key, (b, n_kv, d, r), jnp.float32) / math.sqrt(r)
        scores = leverage_scores(pre, ctx.used, phi)
        used = jnp.broadcast_to(ctx.used, scores.shape)
        return znorm(scores, used)
