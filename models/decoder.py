"""What every family's decoder does around its blocks: embed, run the layers over their states (a layer
reading a state another layer wrote computes no K/V), the final norm, the logits (tied or not, at every
position or one per row), and the cache's new positions. A family's module calls `decoder_stack` from
its compact `__call__`, so the submodules (`embed`, `layers_i`, `final_norm`, `lm_head`) are its own and
checkpoint names are the same in every family.

Legend: B batch, T tokens, E d_model, V vocab.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.states.cache import KVCache


def decoder_stack(module: nn.Module, block: Callable, norm: Callable, tokens, positions, cache: KVCache,
                  n_valid=None, logits_at=None, obs=None, embed_scale: float | None = None,
                  final_softcap: float | None = None):
    """The decoder's call (`kvjax.models.llama.Llama.__call__` documents the contract) for `module`
    (a Flax module whose `cfg`, `attn_block` and `observe` fields it reads), built of
    `block(cfg, layer, attn_block, observe, writes, name=...)` layers and `norm(eps, dtype, name=...)`.

    `embed_scale`: the embedding is multiplied by it (Gemma: sqrt(E), in the model's dtype).
    `final_softcap`: logits = c * tanh(logits / c) in float32 (Gemma 2/3's final soft-cap).
    Returns (logits float32 [B, T, V] or [B, V] with `logits_at`, cache), plus the observations with
    `module.observe`."""
    cfg, dt = module.cfg, module.cfg.jnp_dtype
    b, t = tokens.shape
    if cache.n_model_layers != cfg.n_layers:
        raise ValueError(f"the cache has states for {cache.n_model_layers} layers, the model {cfg.n_layers}")
    if n_valid is None:
        n_valid = jnp.full((b,), t, jnp.int32)
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=dt, name="embed")
    x = embed(tokens)
    if embed_scale is not None:
        x = x * jnp.asarray(embed_scale, dt)
    if cache.route is not None:
        x, states = _routed_layers(module, block, x, positions, cache, n_valid)
        new_obs = None
    else:
        states, new_obs = list(cache.layers), []
        for i in range(cfg.n_layers):
            # a state several layers read may hold something per reader (MiniCache's magnitudes, xKV's bases):
            # the layer reads it as its reader (`LayerState.reading`); readers of such a state keep their own K/V
            s = cache.state_index(i)
            state = states[s].reading(cache.reader(i))
            x, state, layer_obs = block(cfg, i, module.attn_block, module.observe,
                                        cache.writes(i) or state.readers_write, name=f"layers_{i}")(
                x, positions, state, n_valid, None if obs is None else obs[i], cache.attention_impl)
            states[s] = state.reading(0)
            new_obs.append(layer_obs)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)[:, 0]  # [B, E]
    x = norm(cfg.rms_eps, dt, name="final_norm")(x)
    module.sow("hidden", "final", x)  # the normed final hidden states, kept only when asked (KVSharer's search)
    with jax.named_scope("lm_head"):
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=dt, name="lm_head")(x)
    logits = logits.astype(jnp.float32)
    if final_softcap:
        logits = jnp.tanh(logits / final_softcap) * final_softcap
    cache = dataclasses.replace(cache, layers=tuple(states), next_pos=cache.next_pos + n_valid)
    if module.observe is not None:
        return logits, cache, tuple(new_obs)
    return logits, cache


def _routed_layers(module, block, x, positions, cache: KVCache, n_valid):
    """The layers under `cache.route` (int32 [L], traced; `kvjax.states.cache.routed_cache`): layer i
    attends to the K/V layer route[i] wrote. The layer states are stacked ([L, ...] leaves); a layer
    that keeps its own K/V appends to its state, a reading layer gets its producer's state and appends its
    own K/V with n_valid = 0 (past the producer's length: no query sees them), then attends. One program
    serves every route. Returns (x, the layer states)."""
    cfg, route = module.cfg, cache.route
    t = x.shape[1]
    if module.observe is not None or cache.share is not None or any(layer.capacity < 2 * t for layer in cache.layers):
        raise ValueError("a routed forward runs without observations or share=, on an empty cache of 2 * T slots "
                         "per layer (routed_cache)")
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *cache.layers)
    for i in range(cfg.n_layers):
        own = route[i] == i
        state = jax.tree_util.tree_map(lambda a: jnp.where(own, a[i], a[route[i]]), stacked)
        x, state, _ = block(cfg, i, module.attn_block, None, True, name=f"layers_{i}")(
            x, positions, state, jnp.where(own, n_valid, 0), None, cache.attention_impl)
        stacked = jax.tree_util.tree_map(lambda a, new: a.at[i].set(new), stacked, state)
    return x, [jax.tree_util.tree_map(lambda a: a[i], stacked) for i in range(cfg.n_layers)]


def sliding_attention(cfg, layer: int, state, writes: bool, q, positions, k_rot, v, n_valid, block):
    """A sliding-window layer (`cfg.windows[layer]` = W: Gemma 3's local layers, Mistral, Qwen2's upper
    layers): the queries attend to the layer's `WindowKV` ring and to the chunk's own keys, each query to
    the W tokens ending at it (HF's sliding-window mask), then the chunk enters the ring.

    q [B, T, H, D] (RoPE applied), k_rot / v [B, K, T, D]. Returns (out [B, T, H, D], new state)."""
    window = cfg.windows[layer]
    if not state.sliding or state.window != window or not writes:
        raise ValueError(f"layer {layer} is a sliding-window layer (window {window}): its state must be a WindowKV "
                         f"of that window of its own, got a {type(state).__name__}")
    with jax.named_scope("attend"):
        out = state.attend_new(q, positions, k_rot, v, positions, n_valid, block)
    with jax.named_scope("cache_update"):
        return out, state.append(k_rot, v, positions, n_valid)
