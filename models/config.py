"""`LlamaConfig`: the static description of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM).

Frozen and hashable, so it can be a static argument of `jax.jit` and part of the compile-cache key.
Built from a Hugging Face `config.json` (`from_hf_config`) or from GGUF metadata (`from_gguf_metadata`),
the builders the family registry (`kvjax.models.family`) calls for the architectures below.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
MISTRAL_DEFAULT_WINDOW = 4096  # transformers' MistralConfig.sliding_window when config.json has no key
QWEN_DEFAULT_MAX_WINDOW_LAYERS = 28  # transformers' Qwen2Config / Qwen3Config.max_window_layers


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    # ("linear", factor), ("llama3", factor, low_freq_factor, high_freq_factor, original_max_positions)
    # or ("freq_factors", f_0, ..., f_{D/2-1}): llama.cpp's per-frequency divisors (GGUF `rope_freqs`)
    rope_scaling: tuple | None = None
    max_positions: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
    sliding_window: int | None = None  # W of the layers in `sliding_layers` (Mistral: all; Qwen2/3: upper ones)
    sliding_layers: tuple[int, ...] = ()
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("rope_scaling", "sliding_layers"):
            if isinstance(getattr(self, name), list):  # from JSON
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.sliding_layers and not (self.sliding_window and self.sliding_window >= 1):
            raise ValueError(f"sliding_layers {self.sliding_layers} need a sliding_window >= 1, got "
                             f"{self.sliding_window}")
        if any(not 0 <= i < self.n_layers for i in self.sliding_layers):
            raise ValueError(f"sliding_layers {self.sliding_layers} name layers outside 0..{self.n_layers - 1}")

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA group size G)."""
        return self.n_heads // self.n_kv_heads

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def windows(self) -> tuple[int | None, ...] | None:
        """Per layer: its sliding window, or None (a global layer); None when no layer slides (the cache
        layout, `kvjax.states.cache.model_cache`, gives sliding layers a `WindowKV` ring)."""
        if not self.sliding_layers:
            return None
        return tuple(self.sliding_window if i in self.sliding_layers else None for i in range(self.n_layers))

    def rope_for(self, layer: int) -> tuple[float, tuple | None]:
        """(theta, scaling) of RoPE at `layer` (one for every layer here; families with local and
        global layers, such as Gemma 3, differ by layer)."""
        return self.rope_theta, self.rope_scaling

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies in the global layers' full-precision cache (sliding-window
        layers hold a fixed ring)."""
        n_global = self.n_layers - len(self.sliding_layers)
        return 2 * n_global * self.n_kv_heads * self.head_dim * np.dtype(self.jnp_dtype).itemsize

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    # ----------------------------------------------------------------------------------- builders
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], dtype: str = "float32") -> "LlamaConfig":
        arch = (hf.get("architectures") or ["?"])[0]
        if arch not in HF_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r} in config.json; supported: {HF_ARCHITECTURES}")
        n_heads = hf["num_attention_heads"]
        window, sliding = _hf_sliding_layers(hf, arch)
        return cls(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            d_ff=hf["intermediate_size"],
            rms_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", 10000.0),
            rope_scaling=_hf_rope_scaling(hf.get("rope_scaling")),
            max_positions=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=window,
            sliding_layers=sliding,
            dtype=dtype,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], tensor_names: set[str],
                           read_tensor: Callable[[str], Any] = lambda name: None,
                           dtype: str = "float32") -> "LlamaConfig":
        """From a GGUF's metadata and tensor names: no `output.weight` means tied embeddings, a
        `blk.0.attn_q.bias` means q/k/v biases, a `blk.0.attn_q_norm.weight` q/k RMSNorm (Qwen3), and `rope_freqs.weight` (read with `read_tensor`) is
        how llama.cpp stores Llama 3.1+ RoPE scaling (inverse frequencies are divided by it)."""
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {GGUF_ARCHITECTURES}")
        has_output, has_qkv_bias = "output.weight" in tensor_names, "blk.0.attn_q.bias" in tensor_names
        rope_freq_factors = read_tensor("rope_freqs.weight") if "rope_freqs.weight" in tensor_names else None
        p = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
        d_model, n_heads = int(p("embedding_length")), int(p("attention.head_count"))
        scaling = None
        if p("rope.scaling.type") == "linear":
            scaling = ("linear", float(p("rope.scaling.factor")))
        elif p("rope.scaling.type") not in (None, "none"):
            raise ValueError(f"unsupported RoPE scaling {p('rope.scaling.type')!r} in GGUF")
        if rope_freq_factors is not None:
            if scaling is not None:
                raise ValueError("GGUF has both rope.scaling.type and rope_freqs; cannot combine them")
            scaling = ("freq_factors",) + tuple(float(f) for f in np.ravel(rope_freq_factors))
        vocab = p("vocab_size") or len(meta["tokenizer.ggml.tokens"])
        return cls(
            vocab_size=int(vocab),
            d_model=d_model,
            n_layers=int(p("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(p("attention.head_count_kv", n_heads)),
            head_dim=int(p("attention.key_length", d_model // n_heads)),
            d_ff=int(p("feed_forward_length")),
            rms_eps=float(p("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(p("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_positions=int(p("context_length", 2048)),
            tie_embeddings=not has_output,
            qkv_bias=has_qkv_bias,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            dtype=dtype,
        )


def _hf_sliding_layers(hf: Mapping[str, Any], arch: str) -> tuple[int | None, tuple[int, ...]]:
    """(window, sliding layers) as transformers reads a config.json: Mistral slides on every layer when
    `sliding_window` is set (its default 4096 when the key is absent); Qwen2 / Qwen3 only with
    `use_sliding_window`, on the layers `layer_types` marks "sliding_attention", or else on those from
    `max_window_layers` on; Llama never."""
    n_layers = hf["num_hidden_layers"]
    if arch == "MistralForCausalLM":
        window = hf.get("sliding_window", MISTRAL_DEFAULT_WINDOW)
        return (int(window), tuple(range(n_layers))) if window else (None, ())
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and hf.get("use_sliding_window") and hf.get("sliding_window"):
        types = hf.get("layer_types")
        if types is not None and len(types) != n_layers:
            raise ValueError(f"config.json: layer_types has {len(types)} entries for {n_layers} layers")
        first = hf.get("max_window_layers", QWEN_DEFAULT_MAX_WINDOW_LAYERS)
        layers = tuple(i for i in range(n_layers)
                       if (types[i] == "sliding_attention" if types is not None else i >= first))
        return (int(hf["sliding_window"]), layers) if layers else (None, ())
    return None, ()


def _hf_rope_scaling(rs: Mapping[str, Any] | None) -> tuple | None:
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return ("linear", float(rs["factor"]))
    if kind == "llama3":
        return ("llama3", float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]),
                int(rs["original_max_position_embeddings"]))
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")
