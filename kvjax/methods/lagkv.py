"""LagKV (Liang et al. 2025, arXiv 2504.04704): score tokens against the *next* partition of the prompt
("lag-relative" statistics), no attention needed.

Follows kvpress 0.5.5 `LagKVPress` (n_sink 4, lag_size 128): after the n_sink sinks the prompt is cut
into partitions of lag_size tokens; a token of partition p is min-max normalized per channel by the
min / max of partition p + 1, its score is the (unbiased) std over channels, softmaxed inside the
partition, averaged between keys and values; without `cross_scoring` (default) it becomes the token's
rank inside its partition / lag_size. Sinks, the last full partition and the remainder score 1.
Prompts shorter than n_sink + 2 lag_size are not compressed by score: sinks 1, then
arange(T - n_sink) / (T - n_sink), so the most recent are kept.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.methods.base import EvictionMethod, ScoreContext, check_positive, register


def lag_scores(x: jax.Array, n_sink: int, lag: int) -> jax.Array:
    """kvpress `_get_states_score` on every partition: x [B, K, S, D] -> [B, K, P, lag] (P partitions from
    slot n_sink; partition p uses p + 1 as reference; the last partition's scores are meaningless)."""
    b, k, s, d = x.shape
    body = x[:, :, n_sink:]
    pad = (-body.shape[2]) % lag
    parts = jnp.pad(body, [(0, 0), (0, 0), (0, pad), (0, 0)]).reshape(b, k, -1, lag, d)
    ref = jnp.concatenate([parts[:, :, 1:], parts[:, :, -1:]], axis=2)  # partition p + 1
    lo, hi = ref.min(3, keepdims=True), ref.max(3, keepdims=True)
    return jax.nn.softmax(jnp.std((parts - lo) / (hi - lo), axis=-1, ddof=1), axis=-1)


@register("lagkv")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LagKV(EvictionMethod):
    n_sink: int = 4
    lag_size: int = 128
    cross_scoring: bool = False

    def __post_init__(self):
        check_positive(lag_size=self.lag_size)
        if not isinstance(self.n_sink, int) or isinstance(self.n_sink, bool) or self.n_sink < 0:
            raise ValueError(f"n_sink must be an integer >= 0, got {self.n_sink!r}")

    def protected(self) -> int:
        return self.n_sink

    def score(self, ctx: ScoreContext):
        b, n_kv, s, _ = ctx.k.shape
        lag, n_sink = self.lag_size, self.n_sink
        t = ctx.length[:, None, None]  # [B, 1, 1] (slots hold positions 0..T-1 after a prefill)
        slot = jnp.arange(s)[None, None, :]
        if s <= n_sink:  # nothing to partition
            return jnp.ones((b, n_kv, s), jnp.float32)
        score = (lag_scores(ctx.k.astype(jnp.float32), n_sink, lag)
                 + lag_scores(ctx.v.astype(jnp.float32), n_sink, lag)) / 2  # [B, K, P, lag]
        if not self.cross_scoring:
            score = jnp.argsort(jnp.argsort(score, axis=-1), axis=-1).astype(jnp.float32) / lag
        score = score.reshape(b, n_kv, -1)[..., : s - n_sink]
        score = jnp.concatenate([jnp.ones((b, n_kv, n_sink), jnp.float32), score], axis=-1)
        end = n_sink + ((t - n_sink) // lag) * lag  # partitions from end - lag on score 1 (reference only)
        scored = jnp.where((slot >= n_sink) & (slot < end - lag), score, 1.0)
        # short prompts: sinks 1, then arange(T - n_sink) / (T - n_sink)
        short = jnp.where(slot < n_sink, 1.0, (slot - n_sink) / jnp.maximum(t - n_sink, 1))
        return jnp.where(t < n_sink + 2 * lag, short, scored).astype(jnp.float32)
