"""Compression of a prefilled cache by an eviction method: budgets (host, static) and eviction (jit).

kvpress semantics: every layer's prefill attention ran over the full K/V (so later layers saw
uncompressed hidden states); afterwards each layer keeps its top-scored tokens. New tokens then
continue at the original length (`KVCache.next_pos` is unchanged).

Legend: B batch, K KV heads, S slots before, C slots after (capacity), D head dim, L layers.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.methods.base import Budget, EvictionMethod, ScoreContext
from kvjax.models.config import LlamaConfig
from kvjax.states.cache import KVCache
from kvjax.states.dense import DenseKV
from kvjax.states.paged import PagedKV
from kvjax.states.rolling import RollingKV
from kvjax.states.window import WindowKV


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
                             f"only {row.min()} of {n} in some layer: {_remedy(method, budget, n, n_layers)}")
    return keep


def _remedy(method: EvictionMethod, budget: Budget, n: int, n_layers: int) -> str:
    """What makes a budget below the protected tokens work: with a ratio, the shortest prompt whose
    budget covers them (searched upwards, at most 64x the protected count) or a smaller ratio."""
    need = method.protected()
    if budget.ratio is None:
        return f"give a budget of at least {need} tokens"
    for m in range(n + 1, max(64 * need, n + 2)):
        if all(min(m, method.layer_keep(budget, m, layer, n_layers)) >= need for layer in range(n_layers)):
            return (f"the prompt must have at least {m} tokens for ratio {budget.ratio} (it has {n})"
                    + (", or lower the ratio" if n > need else ""))
    return "lower the ratio or give a budget"


@functools.partial(jax.jit, static_argnames=("method", "cfg", "capacities", "rolling", "local"))
def compress(cache: KVCache, obs, n_keep, *, method: EvictionMethod, cfg: LlamaConfig,
             capacities: tuple[int, ...], rolling: bool = False, local: bool = False) -> KVCache:
    """Evict every layer of a freshly prefilled cache down to `n_keep` int32 [L, B] tokens per head.

    `capacities[l]` (static) is layer l's slot count after eviction (>= max over rows of n_keep[l]).
    With `rolling`, layers become `RollingKV` of that capacity, which keep evicting while decoding
    under the method's `decode_rule`. The cache's `attention_impl` reaches scorers that attend
    (`ScoreContext`). A state shared by several layers is compressed once, by its producer's scores.
    Sliding-window states (`LayerState.sliding`: Gemma 3's local layers) are kept as they are, or with
    `local`, cut to the method's top `n_keep` of their window per KV head in a ring of
    `capacities[l]` slots (per-head top-k; new tokens then replace the oldest kept ones). Paged states
    (`PagedKV`) are scored on their logical view and evicted in place (`method.page_keep`): the pages left
    empty return to the pool (`capacities` does not apply; `PagedKV.shrunk` then cuts the pool).
    """
    layers = []
    for i, state in enumerate(cache.layers):
        producer = cache.producer(i)
        if state.sliding and not local:
            layers.append(state)
            continue
        view = state.dense() if isinstance(state, PagedKV) else state  # pages scored in logical order
        ctx = ScoreContext(k=view.k, v=view.v, pos=view.pos, length=view.length, n_tokens=cache.next_pos,
                           obs=obs[producer], layer=producer, n_layers=cfg.n_layers, cfg=cfg,
                           attention_impl=cache.attention_impl, n_keep=n_keep[producer])
        with jax.named_scope(f"evict_{i}"):
            scores = method.score(ctx).astype(jnp.float32)
            if isinstance(state, PagedKV):
                layers.append(state.evict(method.page_keep(state, scores, n_keep[producer])))
            elif state.sliding:
                kept = DenseKV(k=state.k, v=state.v, pos=state.pos, length=state.length).keep_top(
                    scores, n_keep[producer], capacities[producer])
                layers.append(WindowKV(k=kept.k, v=kept.v, pos=kept.pos, length=kept.length,
                                       window_size=state.window))
            elif rolling:
                rule, n_sink, recent = method.decode_rule(capacities[producer])
                kept, init = state.keep_top(scores, n_keep[producer], capacities[producer],
                                            method.decode_init_score(ctx))
                layers.append(RollingKV(k=kept.k, v=kept.v, pos=kept.pos, length=kept.length,
                                        score=init.astype(jnp.float32), rule=rule, n_sink=n_sink, recent=recent))
            else:
                layers.append(method.select(ctx, state, scores, n_keep[producer], capacities[producer]))
    return dataclasses.replace(cache, layers=tuple(layers), next_pos=method.next_positions(cache.next_pos, n_keep[0]))
