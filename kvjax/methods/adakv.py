"""Ada-KV (Feng et al. 2024, arXiv 2407.11550): per-head budgets. A wrapper around any scorer: the
layer keeps its K * n_kept best (head, token) pairs over all KV heads together, with a safeguard of
at least floor(alpha * n_kept) tokens per head.

Follows kvpress 0.5.5 `AdaKVPress` (alpha_safeguard 0.2: each head's top n_safe set to the float max,
then one top-k over the flattened [K * T] scores). kvpress only masks the evicted keys (no memory
saved); kvjax stores the result in a `RaggedKV` pool, so the kept tokens are the only ones held.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.methods.base import Budget, EvictionMethod, ScoreContext, Wrapper, check_wrapped
from kvjax.states.ragged import ragged_from_selection


@dataclasses.dataclass(frozen=True)
class AdaKV(Wrapper):
    wrapper: ClassVar[str] = "adakv"
    press: EvictionMethod
    alpha_safeguard: float = 0.2

    def __post_init__(self):
        check_wrapped("adakv", self.press)  # kvpress: AdaKVPress asserts a ScorerPress
        if not 0 <= self.alpha_safeguard <= 1:
            raise ValueError(f"alpha_safeguard must be in [0, 1], got {self.alpha_safeguard!r}")

    def layer_keep(self, budget: Budget, n_tokens: int, layer: int, n_layers: int) -> int:
        return self.press.layer_keep(budget, n_tokens, layer, n_layers)

    def decode_rule(self, capacity: int):
        raise ValueError("decode-time eviction (capacity=) keeps one budget for every head: use the scorer alone")

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        state, scores = in_capacity(state, scores, capacity)
        rank = jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)  # 0 = best slot of its head
        n_safe = jnp.floor(n_keep * self.alpha_safeguard).astype(jnp.int32)
        scores = jnp.where(rank < n_safe[:, None, None], jnp.finfo(jnp.float32).max, scores)
        return top_pairs(state, scores, state.k.shape[1] * n_keep, state.k.shape[1] * capacity)

    def page_keep(self, state, scores, n_keep):
        return state.keep_top_pairs(scores, n_keep, self.alpha_safeguard)  # the pairs `select` keeps


def in_capacity(state, scores, capacity: int):
    """(state, scores [B, K, C]) widened to `capacity` slots (empty slots, and slots past each row's
    length, score -inf)."""
    if capacity > state.capacity:  # room asked beyond the prefill's slots
        scores = jnp.pad(scores, [(0, 0), (0, 0), (0, capacity - state.capacity)])
        state = state.with_capacity(capacity)
    s = scores.shape[2]
    return state, jnp.where(jnp.arange(s)[None, None, :] < state.length[:, None, None], scores, -jnp.inf)


def top_pairs(state, scores, n_pairs, total: int):
    """A `RaggedKV` pool of `total` (static) slots holding each row's top `n_pairs` [B] (KV head, slot)
    pairs of the dense `state` by `scores` [B, K, S], over all heads together (any number per head)."""
    b, n_kv, s = scores.shape
    top = jax.lax.top_k(scores.reshape(b, n_kv * s), total)[1]  # [B, total]
    chosen = jnp.arange(total)[None, :] < n_pairs[:, None]
    keep = jnp.zeros((b, n_kv * s), bool).at[jnp.arange(b)[:, None], top].set(chosen).reshape(b, n_kv, s)
    return ragged_from_selection(state.k, state.v, state.pos, keep, total)
