"""SnapKV (Li et al. 2024, arXiv 2404.14469): score each key by the attention the prompt's last `window`
queries pay it, smoothed by 1-D pooling; the window itself is always kept.

Default semantics follow kvpress 0.5.5 `SnapKVPress`: window 64, kernel 5, softmax over all keys in
float32 (causal inside the window), window columns dropped, **mean** over the window queries,
`avg_pool1d(kernel, stride 1, padding kernel//2)` with zero padding counted, mean over the query heads
of each KV group, window positions get `max + 1`. The official SnapKV code uses window 32, a **sum**
over the window and optionally max pooling: `reduce="sum"`, `pool="max"`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.methods.base import EvictionMethod, ScoreContext, check_positive, group_mean, protect, register
from kvjax.methods.window import window_attention
from kvjax.observe import ObsSpec


def pool1d(x: jax.Array, kernel: int, kind: str) -> jax.Array:
    """Pool [B, H, S] along S, stride 1, padding kernel//2 (avg: zero padding counted, as torch)."""
    pad = ((0, 0), (0, 0), (kernel // 2, kernel // 2))
    if kind == "avg":
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, kernel), (1, 1, 1), pad) / kernel
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, kernel), (1, 1, 1), pad)


@register("snapkv")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SnapKV(EvictionMethod):
    window: int = 64
    kernel: int = 5
    reduce: str = "mean"  # "mean" (kvpress) or "sum" (official SnapKV)
    pool: str = "avg"  # "avg" (kvpress) or "max"

    def __post_init__(self):
        check_positive(window=self.window, kernel=self.kernel)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (same-length pooling), got {self.kernel}")
        if self.reduce not in ("mean", "sum") or self.pool not in ("avg", "max"):
            raise ValueError(f"reduce must be 'mean' or 'sum' and pool 'avg' or 'max'; got {self.reduce!r}, {self.pool!r}")

    def observations(self) -> ObsSpec:
        return ObsSpec(window=self.window)

    def protected(self) -> int:
        return self.window

    def score(self, ctx: ScoreContext):
        attn = window_attention(ctx, self.window)  # [B, H, W, S]
        attn = attn.mean(2) if self.reduce == "mean" else attn.sum(2)  # [B, H, S]
        in_window = ctx.pos >= (ctx.n_tokens - self.window)[:, None, None]  # [B, K, S]
        g = ctx.cfg.group
        outside = jnp.repeat(~in_window & ctx.used, g, axis=1)  # [B, H, S] prompt keys before the window
        attn = pool1d(jnp.where(outside, attn, 0.0), self.kernel, self.pool)
        return protect(group_mean(attn, ctx.k.shape[1]), in_window)
