"""TOVA (Oren et al. 2024, arXiv 2401.06104): keep the tokens the newest query attends to most,
averaged over all heads. Follows kvpress 0.5.5 `TOVAPress`: attention of the last prompt token over
the other keys, mean over **all** H query heads (one set shared by every KV head), the last token kept
with `max + 1`. (The paper evicts one token per decode step: `kvjax` does that with `capacity=`.)
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.methods.base import EvictionMethod, ScoreContext, protect, register
from kvjax.methods.window import window_attention
from kvjax.observe import ObsSpec


@register("tova")
@dataclasses.dataclass(frozen=True, kw_only=True)
class TOVA(EvictionMethod):
    def observations(self) -> ObsSpec:
        return ObsSpec(window=1)

    def protected(self) -> int:
        return 1

    def decode_rule(self, capacity: int):
        return ("tova", 0, 0)

    def decode_init_score(self, ctx: ScoreContext):
        # the last prompt query's attention itself (no kvpress protection of the last token)
        return jnp.broadcast_to(window_attention(ctx, 1)[:, :, 0].mean(1, keepdims=True), ctx.pos.shape)

    def score(self, ctx: ScoreContext):
        attn = window_attention(ctx, 1)[:, :, 0]  # [B, H, S]
        shared = jnp.broadcast_to(attn.mean(1, keepdims=True), ctx.pos.shape)  # [B, K, S]
        last = ctx.pos == (ctx.n_tokens - 1)[:, None, None]
        return protect(jnp.where(last, 0.0, shared), last)
