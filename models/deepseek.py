"""DeepSeek-V2/V3-style decoder: multi-head latent attention (MLA) and DeepSeekMoE, as a pure Flax module.

    logits, cache = DeepSeek(cfg).apply({"params": params}, tokens, positions, cache)

References: DeepSeek-V2 (arXiv 2405.04434) Sec. 2.1 (MLA, eqs. 1-19) and 2.2 (DeepSeekMoE, eqs. 20-23);
HF transformers `modeling_deepseek_v2.py` (5.x) for the exact numerics, which the golden test checks.

**Attention (MLA).** Queries from a plain projection or a low-rank one (q-LoRA: W^DQ, RMSNorm, W^UQ,
eqs. 12-13); keys and values from the latent c^KV = RMSNorm(W^DKV h) of rank d_c (eq. 9, `kv_a_proj_with_mqa`
also yields the decoupled RoPE key, eq. 14) up-projected by `kv_b_proj` = [W^UK; W^UV] per head. RoPE
covers only the P decoupled dims, in DeepSeek's interleaved layout (pairs (x_{2i}, x_{2i+1}) rotate
together, the complex-multiplication form), and with YaRN (arXiv 2309.00071) when configured: the
frequency ramp, the attention factor on the rotated dims, and mscale(s, mscale_all_dim)^2 on the
softmax scale (DeepSeek's reference `softmax_scale`). The cache is an `MLAKV` per layer (latent and
RoPE key per token: `cfg.kv_layout = "mla"`); decode steps use the absorbed form (W^UK folded into the
query, W^UV applied to the latent output: no per-head K/V), prefill chunks the expanded form
(`cfg.mla_absorb`: "decode" | "always" | "never"). The model knows no method: eviction and
quantization act on the `MLAKV` state.

**MLP.** The first `first_k_dense_replace` layers (and layers not a multiple of `moe_layer_freq`) are
dense SwiGLU; the others DeepSeekMoE: shared experts (one SwiGLU of n_shared * moe_d_ff) plus routed
experts, softmax gating over the router logits in float32, top-k greedy or group-limited greedy
(the best `topk_group` of `n_group` expert groups by their best expert, then top-k inside them),
weights times `routed_scaling_factor` (normalized first if `norm_topk_prob`, as DeepSeek's reference
does; transformers 5.25 ignores that flag, and DeepSeek-V2(-Lite) checkpoints set it false). Routed
experts run as grouped matmuls (`jax.lax.ragged_dot` over tokens sorted by expert): each token costs
k experts, not all of them.

Legend: B batch, T tokens, E d_model, H heads, N no-RoPE q/k dims per head, P RoPE dims, V value dims
per head, R latent rank d_c, Q q-LoRA rank, X routed experts, I expert width, k experts per token.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.models.decoder import decoder_stack
from kvjax.models.llama import RMSNorm
from kvjax.observe import ObsSpec, observe_chunk
from kvjax.states.cache import KVCache, check_route

HF_ARCHITECTURES = ("DeepseekV2ForCausalLM",)
TOPK_METHODS = ("greedy", "group_limited_greedy")


@dataclasses.dataclass(frozen=True)
class DeepSeekConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int  # dense layers' SwiGLU width
    kv_lora_rank: int  # R = d_c
    qk_nope_head_dim: int  # N
    qk_rope_head_dim: int  # P
    v_head_dim: int  # V
    q_lora_rank: int | None = None  # Q, None: a plain q projection
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None or ("yarn", factor, original_max_positions, beta_fast, beta_slow, mscale, mscale_all_dim,
    # attention_factor (None: derived), truncate)
    rope_scaling: tuple | None = None
    max_positions: int = 2048
    tie_embeddings: bool = False
    attention_bias: bool = False
    n_routed_experts: int = 0  # X (0: every layer dense)
    n_shared_experts: int = 0
    moe_d_ff: int = 0  # I
    n_experts_per_tok: int = 1  # k
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    mla_absorb: str = "decode"  # "decode": absorbed at T = 1, expanded otherwise; "always"; "never"
    dtype: str = "float32"
    # Converted models (`kvjax convert mla`, TransMLA), not DeepSeek's checkpoints: no RMSNorm on the latent
    # (TransMLA's MLA has none), and RoPE dims in blocks of `rope_period` each rotating with the original
    # model's frequencies theta^(-2i/rope_period) (several rotated heads kept positional).
    latent_norm: bool = True
    rope_period: int | None = None
    # CLLA (`kvjax convert clla`): layer i reads the latent (and RoPE key) of layer latent_route[i], its group's
    # producer; a consumer layer has no down-projection and stores nothing. None: every layer its own latent.
    latent_route: tuple | None = None

    kv_layout: ClassVar[str] = "mla"  # the empty cache is `MLAKV` latents (`kvjax.states.cache.model_cache`)

    def __post_init__(self):
        if isinstance(self.rope_scaling, list):  # from JSON
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
        if self.latent_route is not None:
            object.__setattr__(self, "latent_route", tuple(int(r) for r in self.latent_route))
            check_route(self.latent_route, self.n_layers)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.rope_period is not None and (self.rope_period % 2 or self.qk_rope_head_dim % self.rope_period
                                             or self.rope_scaling is not None):
            raise ValueError(f"rope_period={self.rope_period} must be even, divide qk_rope_head_dim="
                             f"{self.qk_rope_head_dim}, and go without rope_scaling")
        if self.mla_absorb not in ("decode", "always", "never"):
            raise ValueError(f"mla_absorb must be 'decode', 'always' or 'never', got {self.mla_absorb!r}")
        if self.n_routed_experts:
            if self.topk_method not in TOPK_METHODS:
                raise ValueError(f"unsupported topk_method {self.topk_method!r}; supported: {TOPK_METHODS}")
            if self.n_routed_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts} "
                                 f"and 1 <= topk_group={self.topk_group} <= n_group")
            if not 1 <= self.n_experts_per_tok <= self.n_routed_experts:
                raise ValueError(f"num_experts_per_tok={self.n_experts_per_tok} must be in [1, n_routed_experts]")

    # ----------------------------------------------------------------- what generic code reads
    @property
    def n_kv_heads(self) -> int:
        """One latent head: every query head reads the same latent (the eviction unit)."""
        return 1

    @property
    def head_dim(self) -> int:
        """Width of the absorbed query and key, R + P (what observed queries and scorers see)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def group(self) -> int:
        return self.n_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def rope_for(self, layer: int) -> tuple[float, tuple | None]:
        return self.rope_theta, self.rope_scaling

    def writes_latent(self, layer: int) -> bool:
        """Whether `layer` computes and stores its own latent (False: a CLLA consumer, `latent_route`)."""
        return self.latent_route is None or self.latent_route[layer] == layer

    def is_moe(self, layer: int) -> bool:
        """DeepSeek's rule: routed experts from layer `first_k_dense_replace` on, every `moe_layer_freq`."""
        return bool(self.n_routed_experts) and layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    def kv_bytes_per_token(self) -> int:
        """Bytes one token occupies in a full-precision MLA cache, over all layers that store a latent:
        (R + P) numbers a layer."""
        stored = sum(self.writes_latent(i) for i in range(self.n_layers))
        return stored * self.head_dim * np.dtype(self.jnp_dtype).itemsize

    def replace(self, **kw) -> "DeepSeekConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------------------- builders
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], dtype: str = "float32") -> "DeepSeekConfig":
        arch = (hf.get("architectures") or ["?"])[0]
        if arch not in HF_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r} in config.json; supported: {HF_ARCHITECTURES}")
        scoring = hf.get("scoring_func", "softmax")
        if scoring != "softmax":
            raise ValueError(f"unsupported scoring_func {scoring!r} (DeepSeek-V2 gating is softmax)")
        n_routed = hf.get("n_routed_experts", hf.get("num_experts")) or 0
        theta, scaling = _hf_rope(hf)
        return cls(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"], kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"], q_lora_rank=hf.get("q_lora_rank"), rms_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta, rope_scaling=scaling, max_positions=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)), n_routed_experts=int(n_routed),
            n_shared_experts=int(hf.get("n_shared_experts") or 0), moe_d_ff=int(hf.get("moe_intermediate_size") or 0),
            n_experts_per_tok=int(hf.get("num_experts_per_tok") or 1),
            first_k_dense_replace=int(hf.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(hf.get("moe_layer_freq") or 1), topk_method=hf.get("topk_method", "greedy"),
            n_group=int(hf.get("n_group") or 1), topk_group=int(hf.get("topk_group") or 1),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)), dtype=dtype)

    @classmethod
    def from_gguf_metadata(cls, meta, tensor_names, read_tensor=lambda name: None, dtype="float32"):
        raise ValueError("DeepSeek models load from a Hugging Face directory (config.json + safetensors), not GGUF")


def _hf_rope(hf: Mapping[str, Any]) -> tuple[float, tuple | None]:
    """(theta, scaling) from transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "yarn":
        raise ValueError(f"unsupported rope scaling {kind!r} for DeepSeek; supported: default, yarn")
    orig = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    factor = params.get("factor")
    if factor is None:
        factor = hf["max_position_embeddings"] / orig
    return theta, ("yarn", float(factor), int(orig), float(params.get("beta_fast") or 32),
                   float(params.get("beta_slow") or 1), params.get("mscale"), params.get("mscale_all_dim"),
                   params.get("attention_factor"), bool(params.get("truncate", True)))


# ------------------------------------------------------------------------------------------ RoPE
def yarn_mscale(scale: float, mscale: float | None = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(s) + 1 (arXiv 2309.00071 eq. 21; 1 for s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * (1.0 if mscale is None else mscale) * math.log(scale) + 1.0


def rope_params(cfg: DeepSeekConfig) -> tuple[np.ndarray, float, float]:
    """(inverse frequencies [P/2], factor on the rotated dims, softmax scale) of the decoupled RoPE.

    YaRN (transformers' `_compute_yarn_parameters`, DeepSeek's `DeepseekV2YarnRotaryEmbedding`):
    frequencies blend interpolation (theta^(-2i/P) / s) and extrapolation by a linear ramp between the
    correction dims of beta_fast and beta_slow rotations; the attention factor is
    mscale(s, mscale) / mscale(s, mscale_all_dim) unless given; the softmax scale 1/sqrt(N + P) is
    multiplied by mscale(s, mscale_all_dim)^2."""
    p, theta = cfg.qk_rope_head_dim, cfg.rope_theta
    period = cfg.rope_period or p  # blocks of `rope_period` dims share the frequencies (converted models)
    base = np.tile(theta ** (np.arange(0, period, 2, dtype=np.float32) / period), p // period)
    inv = 1.0 / base
    scale = cfg.qk_head_dim ** -0.5
    if cfg.rope_scaling is None:
        return inv.astype(np.float32), 1.0, scale
    _, factor, orig, beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor, truncate = cfg.rope_scaling
    if attention_factor is None:
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))

    def correction_dim(rotations):
        return p * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, p - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(p // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    inv = (1.0 / (factor * base)) * (1 - extrapolate) + (1.0 / base) * extrapolate
    if mscale_all_dim:
        scale = scale * yarn_mscale(factor, mscale_all_dim) ** 2
    return inv.astype(np.float32), float(attention_factor), float(scale)


def apply_rope_interleaved(x, positions, inv_freq, factor: float = 1.0):
    """DeepSeek's RoPE: pairs (x_{2i}, x_{2i+1}) rotate by position * inv_freq[i] (the complex form of
    transformers' `apply_rotary_emb`), times YaRN's attention `factor`. x [..., P], positions [...]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [..., P/2]
    cos, sin = jnp.cos(angles) * factor, jnp.sin(angles) * factor
    x32 = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
    re, im = x32[..., 0], x32[..., 1]
    return jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1).reshape(x.shape).astype(x.dtype)


# ------------------------------------------------------------------------------------- attention
class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 eqs. 9-19) over an `MLAKV` layer state."""

    cfg: DeepSeekConfig
    layer: int = 0
    attn_block: int | None = None
    observe: ObsSpec | None = None
    writes: bool = True

    @nn.compact
    def __call__(self, x, positions, state, n_valid, obs=None, impl: str = "xla"):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        b, t, _ = x.shape
        h, n, p, v, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        dense = lambda m, name, bias=False: nn.Dense(m, use_bias=bias, dtype=dt, param_dtype=dt, name=name)  # noqa: E731
        if cfg.q_lora_rank is None:
            q = dense(h * (n + p), "q_proj")(x)
        else:  # eqs. 12-13: q = W^UQ RMSNorm(W^DQ h)
            cq = RMSNorm(cfg.rms_eps, dt, name="q_a_layernorm")(dense(cfg.q_lora_rank, "q_a_proj", cfg.attention_bias)(x))
            q = dense(h * (n + p), "q_b_proj")(cq)
        q = q.reshape(b, t, h, n + p)
        q_nope, q_rope = q[..., :n], q[..., n:]
        inv_freq, factor, scale = rope_params(cfg)
        inv_freq = jnp.asarray(inv_freq)
        with jax.named_scope("rope"):
            q_rope = apply_rope_interleaved(q_rope, positions[:, :, None], inv_freq, factor)  # eq. 14
        if self.writes:
            ckv = dense(r + p, "kv_a_proj_with_mqa", cfg.attention_bias)(x)  # [B, T, R + P]
            c = ckv[..., :r]
            if cfg.latent_norm:
                c = RMSNorm(cfg.rms_eps, dt, name="kv_a_layernorm")(c)  # eq. 9 (normalized latent)
            with jax.named_scope("rope"):
                k_rope = apply_rope_interleaved(ckv[..., r:], positions, inv_freq, factor)  # eq. 14
            with jax.named_scope("cache_update"):
                state = state.append(k_rope[:, None], c[:, None], positions, n_valid)
        # kv_b_proj = [W^UK; W^UV] per head (eqs. 10-11), [R, H (N + V)]
        w_ukv = self.param("kv_b_proj", nn.initializers.lecun_normal(), (r, h * (n + v)), dt).reshape(r, h, n + v)
        w_uk, w_uv = w_ukv[..., :n], w_ukv[..., n:]
        absorbed = cfg.mla_absorb == "always" or (cfg.mla_absorb == "decode" and t == 1)
        need_lse = self.observe is not None and self.observe.col_sums
        q_abs = None
        if absorbed or self.observe is not None:  # W^UK folded into the query: [B, T, H, R + P], pre-scaled
            q_lat = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk)
            q_abs = jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], axis=-1) * jnp.asarray(
                scale * math.sqrt(r + p), dt)
        with jax.named_scope("attend"):
            if absorbed:
                out = state.attend(q_abs, positions, self.attn_block, return_lse=need_lse, impl=impl)
                out, lse = out if need_lse else (out, None)
                out = jnp.einsum("bthr,rhv->bthv", out, w_uv)  # W^UV applied to the latent output (eq. 18)
            else:
                q_full = jnp.concatenate([q_nope, q_rope], axis=-1) * jnp.asarray(scale * math.sqrt(n + p), dt)
                out = state.attend_expanded(q_full, positions, w_uk, w_uv, self.attn_block, return_lse=need_lse)
                out, lse = out if need_lse else (out, None)
                if lse is not None:  # [B, H, T] -> the absorbed layout [B, 1, H*T] (same logits)
                    lse = lse.reshape(b, 1, h * t)
            state = state.observe_query(q_abs, positions)
        if self.observe is not None:
            with jax.named_scope("observe"):
                obs = observe_chunk(self.observe, obs, q_abs, q_abs, positions, n_valid, state, lse, self.attn_block,
                                    impl)
        out = dense(cfg.d_model, "o_proj", cfg.attention_bias)(out.reshape(b, t, h * v))  # eq. 19
        return out, state, obs


# ------------------------------------------------------------------------------------------- MLPs
class SwiGLU(nn.Module):
    d_ff: int
    d_model: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        dense = lambda m, name: nn.Dense(m, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name=name)  # noqa: E731
        return dense(self.d_model, "down_proj")(nn.silu(dense(self.d_ff, "gate_proj")(x)) * dense(self.d_ff, "up_proj")(x))


def route(cfg: DeepSeekConfig, logits):
    """DeepSeekMoE gating (DeepSeek-V2 eqs. 21-23): logits float32 [M, X] -> (weights [M, k], experts
    int32 [M, k]). Softmax affinities; top-k greedy, or group-limited greedy (device-limited routing:
    groups ranked by their best expert, the top `topk_group` kept, the rest zeroed)."""
    scores = jax.nn.softmax(logits, axis=-1)
    if cfg.topk_method == "group_limited_greedy":
        m = scores.shape[0]
        groups = scores.reshape(m, cfg.n_group, -1)
        best = jax.lax.top_k(groups.max(-1), cfg.topk_group)[1]  # [M, topk_group]
        keep = jnp.zeros((m, cfg.n_group), bool).at[jnp.arange(m)[:, None], best].set(True)
        scores = jnp.where(keep[:, :, None], groups, 0.0).reshape(m, -1)
    weights, experts = jax.lax.top_k(scores, cfg.n_experts_per_tok)
    if cfg.norm_topk_prob and cfg.n_experts_per_tok > 1:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, experts.astype(jnp.int32)


class MoE(nn.Module):
    """Shared experts plus top-k routed experts (DeepSeek-V2 eq. 20)."""

    cfg: DeepSeekConfig

    @nn.compact
    def __call__(self, x):  # [B, T, E]
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        e, i, nx, k = cfg.d_model, cfg.moe_d_ff, cfg.n_routed_experts, cfg.n_experts_per_tok
        init = nn.initializers.lecun_normal()
        gate = self.param("gate", init, (e, nx), dt)
        w_gate = self.param("experts_gate_proj", init, (nx, e, i), dt)
        w_up = self.param("experts_up_proj", init, (nx, e, i), dt)
        w_down = self.param("experts_down_proj", init, (nx, i, e), dt)
        xf = x.reshape(-1, e)  # [M, E]
        weights, experts = route(cfg, xf.astype(jnp.float32) @ gate.astype(jnp.float32))
        # tokens sorted by expert, one grouped matmul per projection: M k rows, not M X
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        token = order // k
        sizes = jnp.bincount(flat, length=nx).astype(jnp.int32)
        xs = xf[token]
        hid = nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(xs, w_up, sizes)
        ys = jax.lax.ragged_dot(hid, w_down, sizes) * weights.reshape(-1)[order][:, None].astype(dt)
        routed = jnp.zeros_like(xf).at[token].add(ys).reshape(x.shape)
        if cfg.n_shared_experts:
            routed = routed + SwiGLU(cfg.moe_d_ff * cfg.n_shared_experts, e, dt, name="shared")(x)
        return routed


class Block(nn.Module):
    cfg: DeepSeekConfig
    layer: int = 0
    attn_block: int | None = None
    observe: ObsSpec | None = None
    writes: bool = True

    @nn.compact
    def __call__(self, x, positions, state, n_valid, obs=None, impl: str = "xla"):
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        y, state, obs = MLAttention(cfg, self.layer, self.attn_block, self.observe, self.writes, name="attn")(
            RMSNorm(cfg.rms_eps, dt, name="attn_norm")(x), positions, state, n_valid, obs, impl)
        x = x + y
        y = RMSNorm(cfg.rms_eps, dt, name="mlp_norm")(x)
        x = x + (MoE(cfg, name="moe")(y) if cfg.is_moe(self.layer) else SwiGLU(cfg.d_ff, cfg.d_model, dt, name="mlp")(y))
        return x, state, obs


class DeepSeek(nn.Module):
    """The decoder (same call as `kvjax.models.Llama`: tokens, positions, cache, n_valid, logits_at, obs)."""

    cfg: DeepSeekConfig
    attn_block: int | None = None
    observe: ObsSpec | None = None

    @nn.compact
    def __call__(self, tokens, positions, cache: KVCache, n_valid=None, logits_at=None, obs=None):
        return decoder_stack(self, Block, RMSNorm, tokens, positions, cache, n_valid, logits_at, obs)

