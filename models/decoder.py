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
    states, new_obs = list(cache.layers), []
    for i in range(cfg.n_layers):
        s = cache.state_index(i)
        x, states[s], layer_obs = block(cfg, i, module.attn_block, module.observe, cache.writes(i),
                                        name=f"layers_{i}")(
            x, positions, states[s], n_valid, None if obs is None else obs[i], cache.attention_impl)
        new_obs.append(layer_obs)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)[:, 0]  # [B, E]
    x = norm(cfg.rms_eps, dt, name="final_norm")(x)
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
