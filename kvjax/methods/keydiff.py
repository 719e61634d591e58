"""KeyDiff (Park et al. 2025, arXiv 2504.15364): keep the keys least similar to the layer's mean key
direction; distinctive keys are the ones attention singles out.

Follows kvpress 0.5.5 `KeyDiffPress`: anchor = mean over the prompt's tokens of the L2-normalized keys
(per KV head), score = -cosine(k_j, anchor); no window or sink protection. The paper compresses
block by block while prefilling: kvpress (and kvjax) write that as `block:keydiff` (`BlockPress`).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.methods.base import EvictionMethod, ScoreContext, register

EPS = 1e-8  # torch F.normalize eps 1e-12 and F.cosine_similarity eps 1e-8 (norms here are far above both)


@register("keydiff")
@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyDiff(EvictionMethod):
    def score(self, ctx: ScoreContext):
        k = ctx.k.astype(jnp.float32)  # [B, K, S, D]
        used = ctx.used[..., None]  # [B, 1, S, 1]
        norm = jnp.linalg.norm(k, axis=-1, keepdims=True)
        unit = jnp.where(used, k / jnp.maximum(norm, 1e-12), 0.0)
        anchor = unit.sum(2, keepdims=True) / jnp.maximum(ctx.length, 1)[:, None, None, None]  # [B, K, 1, D]
        cos = (k * anchor).sum(-1) / jnp.maximum(norm[..., 0] * jnp.linalg.norm(anchor, axis=-1), EPS)
        return jnp.where(ctx.used, -cos, 0.0)
