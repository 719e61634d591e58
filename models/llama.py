"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) as a pure Flax Linen module.

    logits, cache = Llama(cfg).apply({"params": params}, tokens, positions, cache)

No mutable collections: the KV cache (`kvjax.kv_state.KVCache`) goes in and comes out. Prefill and
decode differ only in the length of `tokens`. Each attention layer calls its layer state's `append`
and `attend`, so any state type (dense, quantized, ragged, ...) plugs in unchanged.

Legend: B batch, T tokens, E d_model, F d_ff, H query heads, K KV heads, D head dim, V vocab.
Reference: Touvron et al. 2023 (Llama), HF transformers `modeling_llama.py` for the exact numerics
(RMSNorm in float32, rotate-half RoPE, SwiGLU MLP).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.kernels import dispatch
from kvjax.kv_state import KVCache
from kvjax.locret import LocretKV, RetainingHead, token_features
from kvjax.models.config import LlamaConfig, rope_inv_freq
from kvjax.observe import ObsSpec, observe_chunk


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):  # [..., E]
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * x32.astype(self.dtype)


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE (Su et al. 2021, HF convention). x [..., D], positions int [...] (x's leading
    axes, or broadcastable to them); rotating by -positions undoes it."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [..., D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    cfg: LlamaConfig
    attn_block: int | None = None
    observe: ObsSpec | None = None
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, positions, state, n_valid, obs=None):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        b, t, _ = x.shape
        dense = lambda n, name, bias: nn.Dense(n, use_bias=bias, dtype=dt, param_dtype=dt, name=name)  # noqa: E731
        q = dense(cfg.n_heads * cfg.head_dim, "q_proj", cfg.qkv_bias)(x).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = dense(cfg.n_kv_heads * cfg.head_dim, "k_proj", cfg.qkv_bias)(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = dense(cfg.n_kv_heads * cfg.head_dim, "v_proj", cfg.qkv_bias)(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        q_pre, k_pre = q, k
        self.sow("intermediates", "qkv", token_features(q_pre, k_pre, v))  # captured only when asked (Locret training)
        with jax.named_scope("rope"):
            inv_freq = jnp.asarray(rope_inv_freq(cfg))
            q, k = (apply_rope(x, positions[:, :, None], inv_freq) for x in (q, k))
        with jax.named_scope("cache_update"):
            kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            if isinstance(state, LocretKV):  # Locret: each new token scored by the layer's retaining head
                score = RetainingHead(state.hidden, cfg.n_kv_heads, name="retain")(token_features(q_pre, k_pre, v))
                state = state.append_scored(kt, vt, positions, n_valid, score)
            else:
                state = state.append(kt, vt, positions, n_valid)
        with jax.named_scope("attend"):
            need_lse = self.observe is not None and self.observe.col_sums
            if self.attention_impl in ("pallas", "auto"):  # auto: plain jnp for states with no kernel
                out = dispatch.attend(state, q, positions, return_lse=need_lse, strict=self.attention_impl == "pallas")
            else:
                out = state.attend(q, positions, self.attn_block, return_lse=need_lse)
            out, lse = out if need_lse else (out, None)
            state = state.observe_query(q, positions)
        if self.observe is not None:
            with jax.named_scope("observe"):
                obs = observe_chunk(self.observe, obs, q_pre, q, positions, n_valid, state, lse, self.attn_block,
                                    self.attention_impl)
        out = dense(cfg.d_model, "o_proj", False)(out.reshape(b, t, cfg.n_heads * cfg.head_dim))
        return out, state, obs


class MLP(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        dt = self.cfg.jnp_dtype
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=dt, param_dtype=dt, name=name)  # noqa: E731
        return dense(self.cfg.d_model, "down_proj")(
            nn.silu(dense(self.cfg.d_ff, "gate_proj")(x)) * dense(self.cfg.d_ff, "up_proj")(x))


class Block(nn.Module):
    cfg: LlamaConfig
    attn_block: int | None = None
    observe: ObsSpec | None = None
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, positions, state, n_valid, obs=None):
        cfg = self.cfg
        h, state, obs = Attention(cfg, self.attn_block, self.observe, self.attention_impl, name="attn")(
            RMSNorm(cfg.rms_eps, cfg.jnp_dtype, name="attn_norm")(x), positions, state, n_valid, obs)
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.rms_eps, cfg.jnp_dtype, name="mlp_norm")(x))
        return x, state, obs


class Llama(nn.Module):
    """The decoder. `attn_block` is the key block of the attention's online softmax (None: one pass);
    `observe` (static) makes the call gather eviction observations (`kvjax.observe`);
    `attention_impl` "xla" attends with the states' plain-jnp `attend`, "pallas" with their kernels
    (`kvjax.kernels.dispatch`)."""

    cfg: LlamaConfig
    attn_block: int | None = None
    observe: ObsSpec | None = None
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, tokens, positions, cache: KVCache, n_valid=None, logits_at=None, obs=None):
        """Run T tokens through the model, appending their K/V to the cache.

        Args:
          tokens: int32 [B, T]; positions: int32 [B, T].
          cache: `KVCache` with room for T more slots in every row.
          n_valid: int32 [B] real tokens per row (right padding after them); default T.
          logits_at: int32 [B] one index into T per row: return logits [B, V] only there (a prefill
            needs the last position only, and full-vocabulary logits at every position are costly);
            None returns [B, T, V].
          obs: with `observe`, a tuple of `LayerObs` (one per layer) to fold this call into.
        Returns:
          (logits float32, new cache), plus the new observations with `observe`.
        """
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        b, t = tokens.shape
        if n_valid is None:
            n_valid = jnp.full((b,), t, jnp.int32)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=dt, name="embed")
        x = embed(tokens)
        layers, new_obs = [], []
        for i, state in enumerate(cache.layers):
            x, state, layer_obs = Block(cfg, self.attn_block, self.observe, self.attention_impl, name=f"layers_{i}")(
                x, positions, state, n_valid, None if obs is None else obs[i])
            layers.append(state)
            new_obs.append(layer_obs)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)[:, 0]  # [B, E]
        x = RMSNorm(cfg.rms_eps, dt, name="final_norm")(x)
        with jax.named_scope("lm_head"):
            if cfg.tie_embeddings:
                logits = embed.attend(x)
            else:
                logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=dt, name="lm_head")(x)
        cache = dataclasses.replace(cache, layers=tuple(layers), next_pos=cache.next_pos + n_valid)
        if self.observe is not None:
            return logits.astype(jnp.float32), cache, tuple(new_obs)
        return logits.astype(jnp.float32), cache
