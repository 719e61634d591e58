"""Random eviction: the baseline every method must beat (kvpress 0.5.5 `RandomPress`). Scores are
uniform in [0, 1), drawn from `seed` folded with the layer index.
"""
from __future__ import annotations

import dataclasses

import jax

from kvjax.methods.base import EvictionMethod, ScoreContext, register


@register("random")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Random(EvictionMethod):
    seed: int = 0

    def score(self, ctx: ScoreContext):
        key = jax.random.fold_in(jax.random.key(self.seed), ctx.layer)
        return jax.random.uniform(key, ctx.k.shape[:3])
