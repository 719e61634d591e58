"""Gemma 3 decoder (text) as a pure Flax Linen module, and its config.

    logits, cache = Gemma3(cfg).apply({"params": params}, tokens, positions, cache)

Gemma Team 2025, "Gemma 3 Technical Report" (arXiv 2503.19786); numerics follow HF transformers
`modeling_gemma3.py` (Gemma3ForCausalLM): embeddings scaled by sqrt(d_model); RMSNorm in float32
multiplying by (1 + w); pre- and post-norms around attention and MLP; RMSNorm of q and k per head
before RoPE; attention scale query_pre_attn_scalar^-1/2; GeGLU MLP with tanh-approximated GELU;
tied lm_head with an optional final logit soft-cap. Local (sliding-window) layers alternate with
global ones, `sliding_pattern - 1` local layers then one global, each kind with its own RoPE base.

A local layer's state is a `WindowKV` ring of W slots (`kvjax.states.window`): it attends to the ring
and the new tokens before storing them (`attend_new`). A global layer appends and attends like any
Llama layer, so every state type and compression method applies to global layers unchanged (and
eviction to local layers too with `compress_local`; column sums are gathered on global layers only).

Legend: B batch, T tokens, E d_model, F d_ff, H query heads, K KV heads, D head dim, V vocab.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.models.decoder import decoder_stack, sliding_attention
from kvjax.models.llama import token_features
from kvjax.models.rope import apply_rope, rope_inv_freq
from kvjax.observe import ObsSpec, observe_chunk
from kvjax.states.cache import KVCache, init_cache, register_layout

HF_ARCHITECTURES = ("Gemma3ForCausalLM",)
GGUF_ARCHITECTURES = ("gemma3",)
# llama.cpp's Gemma 3 constants for what its GGUF metadata does not carry (src/llama-model.cpp, LLM_ARCH_GEMMA3:
# `hparams.set_swa_pattern(6)`, `rope_freq_base_train_swa = 10000.0`, attention scale 1/sqrt(key_length)
# except 27B); HF's Gemma3TextConfig defaults are the same (sliding_window_pattern 6, rope_local_base_freq
# 1e4, query_pre_attn_scalar 256 = head_dim here, no soft-caps).
LLAMA_CPP_SWA_PATTERN, LLAMA_CPP_LOCAL_ROPE_BASE = 6, 10000.0


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Frozen and hashable (a static jit argument). `sliding_pattern` p: layer i is global iff
    (i + 1) % p == 0 (HF's `layer_types`); `rope_theta` / `rope_scaling` are the global layers',
    `rope_local_theta` the local layers' (no scaling)."""

    kv_layout: ClassVar[str] = "window"  # `kvjax.states.cache.model_cache`: WindowKV rings for local layers

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rms_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_local_theta: float = LLAMA_CPP_LOCAL_ROPE_BASE
    rope_scaling: tuple | None = None  # ("linear", factor): global layers only
    sliding_window: int = 512
    sliding_pattern: int = LLAMA_CPP_SWA_PATTERN
    query_pre_attn_scalar: float = 256.0
    final_logit_softcap: float | None = None
    max_positions: int = 32768
    tie_embeddings: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.rope_scaling, list):  # from JSON
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.sliding_pattern < 1 or self.sliding_window < 1:
            raise ValueError(f"sliding_pattern ({self.sliding_pattern}) and sliding_window ({self.sliding_window}) "
                             "must be >= 1")

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def is_local(self, layer: int) -> bool:
        return (layer + 1) % self.sliding_pattern != 0

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Per layer: its sliding window (a local layer) or None (a global layer)."""
        return tuple(self.sliding_window if self.is_local(i) else None for i in range(self.n_layers))

    def rope_for(self, layer: int) -> tuple[float, tuple | None]:
        return (self.rope_local_theta, None) if self.is_local(layer) else (self.rope_theta, self.rope_scaling)

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies in the global layers' full-precision cache (local layers
        hold a fixed window)."""
        n_global = sum(w is None for w in self.windows)
        return 2 * n_global * self.n_kv_heads * self.head_dim * np.dtype(self.jnp_dtype).itemsize

    def replace(self, **kw) -> "Gemma3Config":
        return dataclasses.replace(self, **kw)

    # ----------------------------------------------------------------------------------- builders
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], dtype: str = "float32") -> "Gemma3Config":
        """From a Gemma3ForCausalLM config.json (`layer_types` or `sliding_window_pattern`; RoPE bases from
        `rope_parameters` (transformers >= 5) or `rope_theta` / `rope_local_base_freq`)."""
        n_heads = hf["num_attention_heads"]
        n_layers = hf["num_hidden_layers"]
        pattern = hf.get("sliding_window_pattern", LLAMA_CPP_SWA_PATTERN)
        if hf.get("layer_types"):
            globals_ = [i for i, t in enumerate(hf["layer_types"]) if t == "full_attention"]
            pattern = globals_[0] + 1 if globals_ else n_layers + 1
            want = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
            if list(hf["layer_types"]) != want:
                raise ValueError(f"layer_types {hf['layer_types']} is not a repeating sliding/full pattern")
        rp = hf.get("rope_parameters") or {}
        full, local = rp.get("full_attention", {}), rp.get("sliding_attention", {})
        scaling = hf.get("rope_scaling") or ({k: v for k, v in full.items() if k != "rope_theta"} or None)
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind not in ("default", "linear"):
            raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear")
        if hf.get("attn_logit_softcapping"):
            raise ValueError("attention logit soft-capping (Gemma 2) is not supported")
        return cls(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim", 256),
            d_ff=hf["intermediate_size"], rms_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=full.get("rope_theta", hf.get("rope_theta", 1_000_000.0)),
            rope_local_theta=local.get("rope_theta", hf.get("rope_local_base_freq", LLAMA_CPP_LOCAL_ROPE_BASE)),
            rope_scaling=("linear", float(scaling["factor"])) if kind == "linear" else None,
            sliding_window=hf.get("sliding_window", 512), sliding_pattern=pattern,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            max_positions=hf.get("max_position_embeddings", 32768),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)), dtype=dtype)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], tensor_names: set[str],
                           read_tensor: Callable[[str], Any] = lambda name: None,
                           dtype: str = "float32") -> "Gemma3Config":
        """From a `gemma3` GGUF's metadata: sizes, eps, window, global RoPE base; the keys newer llama.cpp
        writes when they are there (`attention.sliding_window_pattern`, `rope.freq_base_swa`,
        `final_logit_softcapping`, `rope.scaling.*`), llama.cpp's own Gemma 3 constants when not (see
        `LLAMA_CPP_*`). The attention scale is 1/sqrt(key_length), as llama.cpp computes it."""
        arch = meta.get("general.architecture")
        p = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
        missing = [k for k in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
                   if p(k) is None]
        if missing:
            raise ValueError(f"GGUF metadata lacks {', '.join(f'{arch}.{k}' for k in missing)}")
        if p("attn_logit_softcapping"):
            raise ValueError("attention logit soft-capping (Gemma 2) is not supported")
        d_model, n_heads = int(p("embedding_length")), int(p("attention.head_count"))
        head_dim = int(p("attention.key_length", d_model // n_heads))
        if int(p("attention.value_length", head_dim)) != head_dim:
            raise ValueError("Gemma 3 GGUF with key_length != value_length is not supported")
        scaling = None
        if p("rope.scaling.type") == "linear":
            scaling = ("linear", float(p("rope.scaling.factor")))
        elif p("rope.scaling.type") not in (None, "none"):
            raise ValueError(f"unsupported RoPE scaling {p('rope.scaling.type')!r} in GGUF")
        pattern = p("attention.sliding_window_pattern", LLAMA_CPP_SWA_PATTERN)
        if isinstance(pattern, list):  # per-layer booleans (True: sliding) in newer files
            globals_ = [i for i, s in enumerate(pattern) if not s]
            pattern = globals_[0] + 1 if globals_ else len(pattern) + 1
        softcap = p("final_logit_softcapping")
        return cls(
            vocab_size=int(p("vocab_size") or len(meta["tokenizer.ggml.tokens"])), d_model=d_model,
            n_layers=int(p("block_count")), n_heads=n_heads, n_kv_heads=int(p("attention.head_count_kv", n_heads)),
            head_dim=head_dim, d_ff=int(p("feed_forward_length")),
            rms_eps=float(p("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(p("rope.freq_base", 1_000_000.0)),
            rope_local_theta=float(p("rope.freq_base_swa", LLAMA_CPP_LOCAL_ROPE_BASE)),
            rope_scaling=scaling, sliding_window=int(p("attention.sliding_window", 512)),
            sliding_pattern=int(pattern), query_pre_attn_scalar=float(head_dim),
            final_logit_softcap=float(softcap) if softcap else None,
            max_positions=int(p("context_length", 32768)), tie_embeddings="output.weight" not in tensor_names,
            dtype=dtype)


def window_cache(cfg: Gemma3Config, batch: int, capacity: int, attention_impl: str = "xla") -> KVCache:
    """The empty cache of a Gemma 3 model: a `WindowKV` ring of W slots per local layer, a `DenseKV` of
    `capacity` slots per global layer."""
    return init_cache(cfg.n_layers, batch, cfg.n_kv_heads, capacity, cfg.head_dim, cfg.jnp_dtype,
                      attention_impl=attention_impl, windows=cfg.windows)


register_layout("window", window_cache)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + w) in float32 (w zero-centred; HF `Gemma3RMSNorm`)."""

    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):  # [..., E]
        w = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * (1.0 + w.astype(jnp.float32))).astype(self.dtype)


class Attention(nn.Module):
    """One attention layer; `layer` (static) picks local or global, and its RoPE."""

    cfg: Gemma3Config
    layer: int = 0
    attn_block: int | None = None
    observe: ObsSpec | None = None
    writes: bool = True

    @nn.compact
    def __call__(self, x, positions, state, n_valid, obs=None, impl: str = "xla"):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        b, t, _ = x.shape
        local = cfg.is_local(self.layer)
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=dt, param_dtype=dt, name=name)  # noqa: E731
        heads = lambda y, n: y.reshape(b, t, n, cfg.head_dim)  # noqa: E731
        q = RMSNorm(cfg.rms_eps, dt, name="q_norm")(heads(dense(cfg.n_heads * cfg.head_dim, "q_proj")(x), cfg.n_heads))
        if cfg.query_pre_attn_scalar != cfg.head_dim:  # the engine scales by D^-1/2
            q = q * jnp.asarray(math.sqrt(cfg.head_dim / cfg.query_pre_attn_scalar), dt)
        q_pre = q
        inv_freq = jnp.asarray(rope_inv_freq(cfg, self.layer))
        with jax.named_scope("rope"):
            q = apply_rope(q, positions[:, :, None], inv_freq)
        need_lse = self.observe is not None and self.observe.col_sums and not local
        if self.writes:
            k = RMSNorm(cfg.rms_eps, dt, name="k_norm")(heads(dense(cfg.n_kv_heads * cfg.head_dim, "k_proj")(x),
                                                              cfg.n_kv_heads))
            v = heads(dense(cfg.n_kv_heads * cfg.head_dim, "v_proj")(x), cfg.n_kv_heads)
            features = token_features(q_pre, k, v)
            self.sow("intermediates", "qkv", features)
            with jax.named_scope("rope"):
                k_rot = apply_rope(k, positions[:, :, None], inv_freq).transpose(0, 2, 1, 3)
            v_tokens, v = v, v.transpose(0, 2, 1, 3)  # [B, T, K, D] for the observations, [B, K, T, D] stored
        if local:
            out, state = sliding_attention(cfg, self.layer, state, self.writes, q, positions, k_rot, v, n_valid,
                                           self.attn_block)
        else:
            if self.writes:
                with jax.named_scope("cache_update"):
                    state = state.append(k_rot, v, positions, n_valid, features)
            with jax.named_scope("attend"):
                out = state.attend(q, positions, self.attn_block, return_lse=need_lse, impl=impl)
                out, lse = out if need_lse else (out, None)
                state = state.observe_query(q, positions)
        o_proj = dense(cfg.d_model, "o_proj")
        out = o_proj(out.reshape(b, t, cfg.n_heads * cfg.head_dim))
        if self.observe is not None:  # local layers: window queries and statistics (`compress_local`), no column sums
            with jax.named_scope("observe"):
                spec = dataclasses.replace(self.observe, col_sums=False) if local else self.observe
                wo = o_proj.variables["params"]["kernel"] if spec.wov else None
                obs = observe_chunk(spec, obs, q_pre, q, positions, n_valid, state, None if local else lse,
                                    self.attn_block, impl, values=v_tokens if self.writes else None, wo=wo)
        return out, state, obs


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)) (HF `gelu_pytorch_tanh`)."""

    cfg: Gemma3Config

    @nn.compact
    def __call__(self, x):
        dt = self.cfg.jnp_dtype
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=dt, param_dtype=dt, name=name)  # noqa: E731
        gate = nn.gelu(dense(self.cfg.d_ff, "gate_proj")(x), approximate=True)
        return dense(self.cfg.d_model, "down_proj")(gate * dense(self.cfg.d_ff, "up_proj")(x))


class Block(nn.Module):
    cfg: Gemma3Config
    layer: int = 0
    attn_block: int | None = None
    observe: ObsSpec | None = None
    writes: bool = True

    @nn.compact
    def __call__(self, x, positions, state, n_valid, obs=None, impl: str = "xla"):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        norm = lambda name: RMSNorm(cfg.rms_eps, dt, name=name)  # noqa: E731
        h, state, obs = Attention(cfg, self.layer, self.attn_block, self.observe, self.writes, name="attn")(
            norm("attn_norm")(x), positions, state, n_valid, obs, impl)
        x = x + norm("post_attn_norm")(h)
        x = x + norm("post_mlp_norm")(MLP(cfg, name="mlp")(norm("mlp_norm")(x)))
        return x, state, obs


class Gemma3(nn.Module):
    """The decoder; the same call contract as `kvjax.models.llama.Llama` (see its docstring)."""

    cfg: Gemma3Config
    attn_block: int | None = None
    observe: ObsSpec | None = None

    @nn.compact
    def __call__(self, tokens, positions, cache: KVCache, n_valid=None, logits_at=None, obs=None):
        return decoder_stack(self, Block, RMSNorm, tokens, positions, cache, n_valid, logits_at, obs,
                             embed_scale=math.sqrt(self.cfg.d_model), final_softcap=self.cfg.final_logit_softcap)
