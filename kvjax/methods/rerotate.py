"""Key re-rotation around any plain scorer: `rerotate:snapkv`. The kept keys are re-rotated to the
contiguous positions 0..n_kept-1 of their cache slots, and new tokens continue at n_kept (as in
StreamingLLM's and FINCH's papers and HF's SinkCache).

Follows kvpress 0.5.5 `KeyRerotationPress`: the scorer's top n_kept = max(1, int(T (1 - ratio)))
tokens per head, sorted by position; key j at original position p_j moved to slot i by the rotation
R(i - p_j) (exact: RoPE rotations compose); values unchanged; kvpress's pipeline then continues at the
compressed length. The scorer's own budget rule (PyramidKV's) is not used, as in kvpress: every layer
keeps the same count, so every layer's next position is the same.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.methods.base import WRAPPERS, Budget, EvictionMethod, ScoreContext, Wrapper, check_wrapped
from kvjax.models.rope import apply_rope, rope_inv_freq


def rerotate_to_slots(state, n_keep, inv_freq):
    """A dense state's kept keys moved from their positions to their slot indices (R(slot - pos) k)."""
    b, n_kv, c, _ = state.k.shape
    slot = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, n_kv, c))
    kept = slot < n_keep[:, None, None]
    delta = jnp.where(kept, slot - state.pos, 0)
    k = apply_rope(state.k, delta, inv_freq)
    return dataclasses.replace(state, k=k, pos=jnp.where(kept, slot, state.pos))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rerotate(Wrapper):
    wrapper: ClassVar[str] = "rerotate"
    press: EvictionMethod

    def __post_init__(self):
        check_wrapped("rerotate", self.press)

    def layer_keep(self, budget: Budget, n_tokens: int, layer: int, n_layers: int) -> int:
        return budget.keep(n_tokens)  # kvpress: compute_n_kept for every layer

    def decode_rule(self, capacity: int):
        raise ValueError("decode-time eviction keeps original positions: use the scorer without rerotate:")

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        kept = state.keep_top(scores, n_keep, capacity)
        return rerotate_to_slots(kept, n_keep, jnp.asarray(rope_inv_freq(ctx.cfg, ctx.layer)))

    def next_positions(self, next_pos, n_keep):
        return n_keep.astype(next_pos.dtype)


WRAPPERS["rerotate"] = Rerotate
