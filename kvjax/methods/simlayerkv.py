"""SimLayerKV (Zhang et al. 2024, arXiv 2410.13846): find the "lazy" layers, whose last queries look almost
only at the first and the most recent tokens, and keep just those tokens there; other layers keep everything.

Follows kvpress 0.5.5 `SimLayerKVPress` (lazy_threshold 1.0, n_last 1, n_recent 1024, n_initial 4): the
softmax attention of the prompt's last `n_last` queries (post-RoPE, causal, as SnapKV's window) averaged over
the query heads and those queries; the layer is lazy when its mass on the first `n_initial` key positions
and the `n_recent` positions before the last n_last (kvpress's `compute_window_attention` drops the window's
own columns before `[-n_recent:]`) is above `lazy_threshold`. A lazy layer keeps positions [0, n_initial) and the last
n_recent - n_last ones (kvpress's `keys[-n_recent + n_last:]`); prompts of at most n_initial + n_recent + n_last
tokens, and lazy_threshold 1.0 (the default), compress nothing. The method sets its own compression (no
ratio= / budget=). kvpress averages over the batch too (one decision for all rows); kvjax decides per row,
the same for a batch of one. The decision is data-dependent, so every layer keeps T slots of capacity and a
lazy layer uses (and attends over) only its n_initial + n_recent - n_last of them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.methods.base import EvictionMethod, ScoreContext, check_positive, register
from kvjax.methods.window import window_attention
from kvjax.observe import ObsSpec


@register("simlayerkv")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SimLayerKV(EvictionMethod):
    lazy_threshold: float = 1.0
    n_last: int = 1
    n_recent: int = 1024
    n_initial: int = 4

    own_budget = True  # lazy layers keep sinks + recent tokens, others all: no ratio

    def __post_init__(self):
        t = self.lazy_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"simlayerkv: lazy_threshold must be in [0, 1], got {t!r}")
        check_positive(n_last=self.n_last, n_recent=self.n_recent)
        if not isinstance(self.n_initial, int) or isinstance(self.n_initial, bool) or self.n_initial < 0:
            raise ValueError(f"simlayerkv: n_initial must be an integer >= 0, got {self.n_initial!r}")
        if self.n_recent <= self.n_last:
            raise ValueError(f"simlayerkv: n_recent ({self.n_recent}) must exceed n_last ({self.n_last}): a lazy "
                             "layer keeps the last n_recent - n_last tokens")

    def bind(self, cfg, ratio=None, budget=None, model_name: str = "") -> "SimLayerKV":
        if ratio is not None or budget is not None:
            raise ValueError("simlayerkv sets its own compression (lazy layers keep n_initial + n_recent - n_last "
                             "tokens): set lazy_threshold= in its name, not ratio= / budget=")
        return self

    def observations(self) -> ObsSpec:
        return ObsSpec(window=self.n_last)

    def layer_keep(self, budget, n_tokens: int, layer: int, n_layers: int) -> int:
        return n_tokens  # capacity: a layer that is not lazy keeps every token

    def mass(self, ctx: ScoreContext) -> jax.Array:
        """float32 [B]: the last n_last queries' mean attention on the first n_initial and the recent keys."""
        attn = window_attention(ctx, self.n_last).mean((1, 2))  # [B, S]
        slot = jnp.arange(attn.shape[-1])[None, :]
        end = ctx.length[:, None] - self.n_last  # kvpress drops the n_last window columns, then [-n_recent:]
        edge = (slot < self.n_initial) | ((slot >= end - self.n_recent) & (slot < end))
        return jnp.where(edge, attn, 0.0).sum(-1)

    def lazy(self, ctx: ScoreContext) -> jax.Array:
        """bool [B]: the layer is lazy for that row (and the prompt is long enough to compress)."""
        long = ctx.length > self.n_initial + self.n_recent + self.n_last
        return (self.mass(ctx) > self.lazy_threshold) & long & (self.lazy_threshold < 1.0)

    def score(self, ctx: ScoreContext):
        """1 for the tokens a lazy layer keeps (sinks and the recent n_recent - n_last), 0 for the others."""
        slot = jnp.arange(ctx.k.shape[2])[None, None, :]
        t = ctx.length[:, None, None]
        keep = (slot < self.n_initial) | ((slot >= t - (self.n_recent - self.n_last)) & (slot < t))
        return jnp.broadcast_to(keep, ctx.pos.shape).astype(jnp.float32)

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        lazy_keep = jnp.minimum(ctx.length, self.n_initial + self.n_recent - self.n_last)
        n = jnp.where(self.lazy(ctx), lazy_keep, ctx.length).astype(jnp.int32)
        return state.keep_top(scores, n, capacity)
