"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) as a pure Flax Linen module.

    logits, cache = Llama(cfg).apply({"params": params}, tokens, positions, cache)

No mutable collections: the KV cache (`kvjax.states.KVCache`) goes in and comes out. Prefill and
decode differ only in the length of `tokens`. Each attention layer calls its layer state's `append`
and `attend` (`kvjax.states.LayerState`), so any state type (dense, quantized, ragged, latent, a
learned compressor's) plugs in unchanged; the model knows no method. A layer whose state an earlier
layer wrote (`KVCache.share`: cross-layer sharing) computes no K/V and only attends.

Legend: B batch, T tokens, E d_model, F d_ff, H query heads, K KV heads, D head dim, V vocab.
Reference: Touvron et al. 2023 (Llama), HF transformers `modeling_llama.py` for the exact numerics
(RMSNorm in float32, rotate-half RoPE, SwiGLU MLP); `modeling_qwen3.py` for the per-head q/k RMSNorm
(`cfg.qk_norm`); `modeling_mistral.py` / `modeling_qwen2.py` for sliding-window layers (`cfg.windows`:
each such layer holds a `WindowKV` ring and attends through `sliding_attention`).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.models.config import LlamaConfig
from kvjax.models.decoder import decoder_stack, sliding_attention
from kvjax.models.rope import apply_rope, rope_inv_freq
from kvjax.observe import ObsSpec, observe_chunk
from kvjax.states.cache import KVCache


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):  # [..., E]
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * x32.astype(self.dtype)


def token_features(q_pre, k_pre, v):
    """Pre-RoPE q [B, T, H, D], k, v [B, T, K, D] -> [B, T, (H + 2K) D]: what learned compressors score
    a token by (Locret's retaining heads); states that do not use it ignore it."""
    b, t = q_pre.shape[:2]
    return jnp.concatenate([x.reshape(b, t, -1) for x in (q_pre, k_pre, v)], axis=-1)


class Attention(nn.Module):
    """One attention layer. `layer` (static) picks the layer's RoPE; `writes` (static) is False for a
    layer reading a state an earlier layer wrote (it has no K/V of its own)."""

    cfg: LlamaConfig
    layer: int = 0
    attn_block: int | None = None
    observe: ObsSpec | None = None
    writes: bool = True

    @nn.compact
    def __call__(self, x, positions, state, n_valid, obs=None, impl: str = "xla"):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        b, t, _ = x.shape
        dense = lambda n, name, bias: nn.Dense(n, use_bias=bias, dtype=dt, param_dtype=dt, name=name)  # noqa: E731
        local = cfg.windows is not None and cfg.windows[self.layer] is not None
        heads = lambda y, n, name: (RMSNorm(cfg.rms_eps, dt, name=name)(y.reshape(b, t, n, cfg.head_dim))  # noqa: E731
                                    if cfg.qk_norm else y.reshape(b, t, n, cfg.head_dim))
        q = heads(dense(cfg.n_heads * cfg.head_dim, "q_proj", cfg.qkv_bias)(x), cfg.n_heads, "q_norm")
        q_pre = q
        inv_freq = jnp.asarray(rope_inv_freq(cfg, self.layer))
        with jax.named_scope("rope"):
            q = apply_rope(q, positions[:, :, None], inv_freq)
        if self.writes:
            k = heads(dense(cfg.n_kv_heads * cfg.head_dim, "k_proj", cfg.qkv_bias)(x), cfg.n_kv_heads, "k_norm")
            v = dense(cfg.n_kv_heads * cfg.head_dim, "v_proj", cfg.qkv_bias)(x).reshape(b, t, cfg.n_kv_heads,
                                                                                       cfg.head_dim)
            features = token_features(q_pre, k, v)
            self.sow("intermediates", "qkv", features)  # captured only when asked (Locret training)
            with jax.named_scope("rope"):
                k_rot = apply_rope(k, positions[:, :, None], inv_freq).transpose(0, 2, 1, 3)
        need_lse = self.observe is not None and self.observe.col_sums and not local
        if local:
            out, state = sliding_attention(cfg, self.layer, state, self.writes, q, positions, k_rot,
                                           v.transpose(0, 2, 1, 3), n_valid, self.attn_block)
            lse = None
        else:
            if self.writes:
                with jax.named_scope("cache_update"):
                    state = state.append(k_rot, v.transpose(0, 2, 1, 3), positions, n_valid, features)
            with jax.named_scope("attend"):
                out = state.attend(q, positions, self.attn_block, return_lse=need_lse, impl=impl)
                out, lse = out if need_lse else (out, None)
                state = state.observe_query(q, positions)
        o_proj = dense(cfg.d_model, "o_proj", False)
        out = o_proj(out.reshape(b, t, cfg.n_heads * cfg.head_dim))
        if self.observe is not None:  # sliding layers: window queries and statistics (`compress_local`), no column sums
            with jax.named_scope("observe"):
                spec = dataclasses.replace(self.observe, col_sums=False) if local else self.observe
                wo = o_proj.variables["params"]["kernel"] if spec.wov else None
                obs = observe_chunk(spec, obs, q_pre, q, positions, n_valid, state, lse, self.attn_block, impl,
                                    values=v if self.writes else None, wo=wo, hidden=x)
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
    layer: int = 0
    attn_block: int | None = None
    observe: ObsSpec | None = None
    writes: bool = True

    @nn.compact
    def __call__(self, x, positions, state, n_valid, obs=None, impl: str = "xla"):
        cfg = self.cfg
        h, state, obs = Attention(cfg, self.layer, self.attn_block, self.observe, self.writes, name="attn")(
            RMSNorm(cfg.rms_eps, cfg.jnp_dtype, name="attn_norm")(x), positions, state, n_valid, obs, impl)
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.rms_eps, cfg.jnp_dtype, name="mlp_norm")(x))
        return x, state, obs


class Llama(nn.Module):
    """The decoder. `attn_block` is the key block of the attention's online softmax (None: one pass);
    `observe` (static) makes the call gather eviction observations (`kvjax.observe`). The attention
    implementation is the cache's (`KVCache.attention_impl`)."""

    cfg: LlamaConfig
    attn_block: int | None = None
    observe: ObsSpec | None = None

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
          obs: with `observe`, a tuple of `LayerObs` (one per model layer) to fold this call into.
        Returns:
          (logits float32, new cache), plus the new observations with `observe`.
        """
        return decoder_stack(self, Block, RMSNorm, tokens, positions, cache, n_valid, logits_at, obs)
