"""StreamingLLM (Xiao et al. 2023, arXiv 2309.17453): keep `n_sink` attention sinks and the most recent
tokens. Follows kvpress 0.5.5 `StreamingLLMPress` (sinks [0, n_sink) and the last n_kept - n_sink
positions; kept keys keep their RoPE phases). `rerotate=True` is the paper's variant (kvpress
`KeyRerotationPress`): kept keys are re-rotated to their cache-slot positions 0..n_kept-1 and new
tokens continue at n_kept.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.methods.base import EvictionMethod, ScoreContext, register
from kvjax.methods.rerotate import rerotate_to_slots
from kvjax.models.rope import rope_inv_freq


@register("streaming_llm", "streamingllm")
@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamingLLM(EvictionMethod):
    n_sink: int = 4
    rerotate: bool = False

    def __post_init__(self):
        if not isinstance(self.n_sink, int) or isinstance(self.n_sink, bool) or self.n_sink < 0:
            raise ValueError(f"n_sink must be an integer >= 0, got {self.n_sink!r}")

    def protected(self) -> int:
        return self.n_sink

    def score(self, ctx: ScoreContext):
        # sinks above everything, then the most recent first
        pos = ctx.pos.astype(jnp.float32)
        return jnp.where(ctx.pos < self.n_sink, 2.0 ** 30, pos)

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        state = super().select(ctx, state, scores, n_keep, capacity)
        if not self.rerotate:
            return state
        # R(slot) k = R(slot - pos) R(pos) k: move each kept key to its cache-slot position
        return rerotate_to_slots(state, n_keep, jnp.asarray(rope_inv_freq(ctx.cfg, ctx.layer)))

    def plain_scorer(self) -> bool:
        return not self.rerotate

    def decode_rule(self, capacity: int):
        if self.rerotate:
            raise ValueError("decode-time eviction keeps original positions: use rerotate=False with capacity=")
        return ("streaming", self.n_sink, 0)

    def next_positions(self, next_pos, n_keep):
        return n_keep.astype(next_pos.dtype) if self.rerotate else next_pos
