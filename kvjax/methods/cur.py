"""CurDKV (arXiv 2509.15038): keep the tokens with the largest approximate leverage scores of keys and
values (CUR decomposition), normalized inside local windows.

Follows kvpress 0.5.5 `CURPress`: k2 = ||k_j||^2, v2 = ||v_j||^2; with `use_local_approximation`
(default) each is divided by its sum over aligned windows of `local_window_size` (16) tokens (the
last window zero-padded); the score is k2 * v2 (`leverage_type` "kv_product"; or "key", "value",
"kv_avg" = (k2 + v2) / 2), divided by its sum over the prompt per head; the first `num_sinks` (4)
slots score 1.0 (by index, as kvpress: under `block:` those are the best kept so far). `use_random_leverage` first projects keys and values on a Gaussian D x 20 sketch
(kvpress draws it from torch's global generator; kvjax from `seed` folded with the layer).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax.methods.base import EvictionMethod, ScoreContext, check_positive, register

LEVERAGE = ("key", "value", "kv_avg", "kv_product")


def window_normalize(x: jax.Array, used: jax.Array, w: int) -> jax.Array:
    """[B, K, S] -> each value over its aligned window's sum (windows of w slots from slot 0; unused 0)."""
    b, k, s = x.shape
    pad = (-s) % w
    x = jnp.pad(jnp.where(used, x, 0.0), [(0, 0), (0, 0), (0, pad)]).reshape(b, k, -1, w)
    return (x / x.sum(-1, keepdims=True)).reshape(b, k, -1)[..., :s]


@register("cur")
@dataclasses.dataclass(frozen=True, kw_only=True)
class CUR(EvictionMethod):
    num_sinks: int = 4
    leverage_type: str = "kv_product"
    use_random_leverage: bool = False
    use_local_approximation: bool = True
    local_window_size: int = 16
    seed: int = 0

    def __post_init__(self):
        check_positive(local_window_size=self.local_window_size)
        if not isinstance(self.num_sinks, int) or isinstance(self.num_sinks, bool) or self.num_sinks < 0:
            raise ValueError(f"num_sinks must be an integer >= 0, got {self.num_sinks!r}")
        if self.leverage_type not in LEVERAGE:
            raise ValueError(f"leverage_type must be one of {', '.join(LEVERAGE)}, got {self.leverage_type!r}")

    def protected(self) -> int:
        return self.num_sinks

    def score(self, ctx: ScoreContext):
        k, v = ctx.k.astype(jnp.float32), ctx.v.astype(jnp.float32)
        if self.use_random_leverage:
            r = 20
            key = jax.random.fold_in(jax.random.key(self.seed), ctx.layer)
            g = jax.random.normal(key, (k.shape[-1], r), jnp.float32) / math.sqrt(r)
            k, v = k @ g, v @ g
        used = ctx.used
        k2 = jnp.where(used, (k ** 2).sum(-1), 0.0)
        v2 = jnp.where(used, (v ** 2).sum(-1), 0.0)
        if self.use_local_approximation:
            k2 = window_normalize(k2, used, self.local_window_size)
            v2 = window_normalize(v2, used, self.local_window_size)
        scores = {"key": k2, "value": v2, "kv_avg": (k2 + v2) / 2, "kv_product": k2 * v2}[self.leverage_type]
        scores = jnp.where(used, scores, 0.0)
        scores = scores / scores.sum(-1, keepdims=True)
        first = jnp.arange(k.shape[2])[None, None, :] < self.num_sinks  # kvpress: the first slots, by index
        return jnp.where(first & used, 1.0, scores)
