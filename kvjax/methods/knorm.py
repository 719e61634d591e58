"""Knorm (Devoto et al. 2024, arXiv 2406.11430): keep the keys with the *lowest* L2 norm, which tend to
receive the most attention. kvpress 0.5.5 `KnormPress`: score = -||k||_2 over the head dim, no window
or sink protection.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.methods.base import EvictionMethod, ScoreContext, register


@register("knorm")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Knorm(EvictionMethod):
    def score(self, ctx: ScoreContext):
        return -jnp.linalg.norm(ctx.k.astype(jnp.float32), axis=-1)
