"""Compression of a prefilled cache by an eviction method: budgets (host, static) and eviction (jit).

kvpress semantics: every layer's prefill attention ran over the full K/V (so later layers saw
uncompressed hidden states); afterwards each layer keeps its top-scored tokens. New tokens then
continue at the original length (`KVCache.next_pos` is unchanged).

Legend: B batch, K KV heads, S slots before, C slots after (capacity), D head dim, L layers.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.kv_state import EMPTY_POS, DenseKV, KVCache
from kvjax.methods.base import Budget, EvictionMethod, ScoreContext
from kvjax.models.config import LlamaConfig
from kvjax.rolling_kv import RollingKV


def resolve_keep(method: EvictionMethod, budget: Budget, lengths, n_layers: int) -> np.ndarray:
    """Tokens kept per layer and row, int32 [L, B], from each row's prompt length (host-side).

    Raises ValueError if a budget is below the tokens the method always protects.
    """
    lengths = [int(n) for n in np.asarray(lengths)]
    keep = np.array([[min(n, method.layer_keep(budget, n, layer, n_layers)) for n in lengths]
                     for layer in range(n_layers)], np.int32)
    need = method.protected()
    for n, row in zip(lengths, keep.T):
        if n > row.min() and row.min() < need:
            raise ValueError(f"{method.name} always keeps {need} tokens (window/sinks) but the budget keeps "
                             f"only {row.min()} of {n} in some layer: raise the budget or lower the ratio")
    return keep


def keep_top(state: DenseKV, scores, n_keep, capacity: int, carry=None):
    """Keep each row's top `n_keep[b]` slots per KV head by score, in ascending position order.

    Args:
      state: dense layer state with S slots.  scores: float32 [B, K, S] (higher = keep).
      n_keep: int32 [B] tokens kept per head (<= length).  capacity: static C >= max(n_keep).
      carry: optional [B, K, S] array gathered along (returned as a second value, [B, K, C]).
    """
    if capacity > state.capacity:
        state = state.with_capacity(capacity)
        if carry is not None:
            carry = jnp.pad(carry, [(0, 0), (0, 0), (0, capacity - carry.shape[2])])
        scores = jnp.pad(scores, [(0, 0), (0, 0), (0, capacity - scores.shape[2])])
    s_idx = jnp.arange(state.capacity)
    scores = jnp.where(s_idx[None, None, :] < state.length[:, None, None], scores, -jnp.inf)
    top = jax.lax.top_k(scores, capacity)[1]  # [B, K, C] best first
    kept = jnp.arange(capacity)[None, None, :] < n_keep[:, None, None]
    pos = jnp.take_along_axis(state.pos, top, axis=2)
    order = jnp.argsort(jnp.where(kept, pos, EMPTY_POS), axis=2)  # kept slots by position, then the rest
    idx = jnp.take_along_axis(top, order, axis=2)
    gather = lambda x: jnp.take_along_axis(x, idx[..., None], axis=2)  # noqa: E731
    out = DenseKV(k=gather(state.k), v=gather(state.v),
                  pos=jnp.where(kept, jnp.take_along_axis(state.pos, idx, axis=2), EMPTY_POS),
                  length=n_keep.astype(jnp.int32))
    return out if carry is None else (out, jnp.take_along_axis(carry, idx, axis=2))


@functools.partial(jax.jit, static_argnames=("method", "cfg", "capacities", "rolling", "attention_impl"))
def compress(cache: KVCache, obs, n_keep, *, method: EvictionMethod, cfg: LlamaConfig,
             capacities: tuple[int, ...], rolling: bool = False, attention_impl: str = "xla") -> KVCache:
    """Evict every layer of a freshly prefilled cache down to `n_keep` int32 [L, B] tokens per head.

    `capacities[l]` (static) is layer l's slot count after eviction (>= max over rows of n_keep[l]).
    With `rolling`, layers become `RollingKV` of that capacity, which keep evicting while decoding
    under the method's `decode_rule`. `attention_impl` reaches scorers that attend (`ScoreContext`).
    """
    layers = []
    for i, (state, layer_obs) in enumerate(zip(cache.layers, obs)):
        ctx = ScoreContext(k=state.k, v=state.v, pos=state.pos, length=state.length, n_tokens=cache.next_pos,
                           obs=layer_obs, layer=i, n_layers=len(cache.layers), cfg=cfg,
                           attention_impl=attention_impl)
        with jax.named_scope(f"evict_{i}"):
            scores = method.score(ctx).astype(jnp.float32)
            if rolling:
                rule, n_sink, recent = method.decode_rule(capacities[i])
                kept, init = keep_top(state, scores, n_keep[i], capacities[i], method.decode_init_score(ctx))
                layers.append(RollingKV(k=kept.k, v=kept.v, pos=kept.pos, length=kept.length,
                                        score=init.astype(jnp.float32), rule=rule, n_sink=n_sink, recent=recent))
            else:
                layers.append(method.select(ctx, state, scores, n_keep[i], capacities[i]))
    return KVCache(layers=tuple(layers), next_pos=method.next_positions(cache.next_pos, n_keep[0]))
