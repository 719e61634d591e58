"""DMS, threshold form, around any plain scorer: `dms(threshold=T):snapkv`. Every token outside the
`sliding_window_size` most recent whose score is below `threshold` is evicted, per KV head, so each head
keeps as many tokens as pass (the compression follows the content, not a ratio).

Dynamic Memory Sparsification (Łańcucki et al. 2025, arXiv 2506.05345), as kvpress 0.5.5 `DMSPress`
implements it (dense prefill, no trained evictors; sliding_window_size 128; `threshold` has no default:
it depends on the scorer): the scorer scores the prompt's keys; of the T - sliding_window_size oldest, those
scoring < threshold are masked, per (row, KV head). kvpress's `decoding=True` (evicting again while
generating) is not part of this form: the prompt's selection is made once, after the prefill. Heads keep
different counts, so the layer is stored ragged (`RaggedKV`, as Ada-KV); its pool holds K T slots (the
counts are data-dependent), of which each head uses and attends over its kept tokens only.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.methods.adakv import in_capacity
from kvjax.methods.base import WRAPPERS, EvictionMethod, ScoreContext, Wrapper, check_wrapped
from kvjax.states.ragged import ragged_from_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class DMS(Wrapper):
    wrapper: ClassVar[str] = "dms"
    own_budget: ClassVar[bool] = True  # the threshold sets the compression
    press: EvictionMethod
    threshold: float | None = None
    sliding_window_size: int = 128

    def __post_init__(self):
        check_wrapped("dms", self.press)
        t = self.threshold
        if t is None or isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ValueError(f"dms: give threshold= (tokens scoring below it are evicted; its scale is the scorer's), "
                             f"got {t!r}")
        w = self.sliding_window_size
        if not isinstance(w, int) or isinstance(w, bool) or w < 0:
            raise ValueError(f"dms: sliding_window_size must be an integer >= 0, got {w!r}")

    def bind(self, cfg, ratio=None, budget=None, model_name: str = "") -> "DMS":
        if ratio is not None or budget is not None:
            raise ValueError("dms evicts by threshold= (its compression follows the scores): no ratio= / budget=")
        return self

    def layer_keep(self, budget, n_tokens: int, layer: int, n_layers: int) -> int:
        return n_tokens  # capacity per head: every token may pass

    def decode_rule(self, capacity: int):
        raise ValueError("dms selects by threshold once after the prefill: capacity= does not apply")

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        state, scores = in_capacity(state, scores, capacity)  # room beyond the prefill's slots (empty)
        slot = jnp.arange(scores.shape[2])[None, None, :]
        t = ctx.length[:, None, None]
        keep = (slot < t) & ((scores >= self.threshold) | (slot >= t - self.sliding_window_size))
        return ragged_from_selection(state.k, state.v, state.pos, keep, state.k.shape[1] * capacity)


WRAPPERS["dms"] = DMS
