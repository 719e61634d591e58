"""H2O / ObservedAttention: keep the tokens that received the most attention during the prefill.

Follows kvpress 0.5.5 `ObservedAttentionPress`: score_j = sum_i A[h, i, j] / (T - j) over all prompt
queries i (the number of queries that can see key j), mean over each KV group. The column sums come
from a chunked second attention pass (`kvjax.attention.attention_column_sums`), never a T x T matrix.
H2O (Zhang et al. 2023, arXiv 2306.14048) also evicts during decoding: `capacity=` with `h2o`.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.methods.base import EvictionMethod, ScoreContext, group_mean, register
from kvjax.observe import ObsSpec


@register("observed_attention", "h2o")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ObservedAttention(EvictionMethod):
    recent_fraction: float = 0.5  # decode-time eviction: share of the capacity kept as recent window (H2O)

    def __post_init__(self):
        if not 0 <= self.recent_fraction < 1:
            raise ValueError(f"recent_fraction must be in [0, 1), got {self.recent_fraction!r}")

    def decode_rule(self, capacity: int):
        return ("h2o", 0, int(capacity * self.recent_fraction))

    def decode_init_score(self, ctx: ScoreContext):
        return group_mean(ctx.obs.col_sum, ctx.k.shape[1])  # attention accumulated over the prefill

    def observations(self) -> ObsSpec:
        return ObsSpec(col_sums=True)

    def score(self, ctx: ScoreContext):
        n_k = ctx.k.shape[1]
        seen_by = (ctx.n_tokens[:, None, None] - ctx.pos).astype(jnp.float32)  # queries that see each key
        seen_by = jnp.repeat(jnp.maximum(seen_by, 1.0), ctx.cfg.group, axis=1)  # [B, H, S]
        return group_mean(ctx.obs.col_sum / seen_by, n_k)
