"""Checkpoint conversion: Hugging Face / GGUF tensor names to kvjax's parameter tree, and a safetensors cache.

kvjax params are a plain nested dict (Flax Linen layout of `kvjax.models.Llama`), with Dense kernels
stored [in, out]. Flat keys join the path with "/" (e.g. "layers_0/attn/q_proj/kernel").
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.gguf_io import unpermute_qk
from kvjax.models.config import LlamaConfig

_LAYER_MAP = {  # HF suffix after "model.layers.{i}." -> (kvjax path after "layers_{i}/", transpose)
    "self_attn.q_proj.weight": ("attn/q_proj/kernel", True),
    "self_attn.k_proj.weight": ("attn/k_proj/kernel", True),
    "self_attn.v_proj.weight": ("attn/v_proj/kernel", True),
    "self_attn.o_proj.weight": ("attn/o_proj/kernel", True),
    "self_attn.q_proj.bias": ("attn/q_proj/bias", False),
    "self_attn.k_proj.bias": ("attn/k_proj/bias", False),
    "self_attn.v_proj.bias": ("attn/v_proj/bias", False),
    "mlp.gate_proj.weight": ("mlp/gate_proj/kernel", True),
    "mlp.up_proj.weight": ("mlp/up_proj/kernel", True),
    "mlp.down_proj.weight": ("mlp/down_proj/kernel", True),
    "input_layernorm.weight": ("attn_norm/scale", False),
    "post_attention_layernorm.weight": ("mlp_norm/scale", False),
}
_TOP_MAP = {
    "model.embed_tokens.weight": ("embed/embedding", False),
    "model.norm.weight": ("final_norm/scale", False),
    "lm_head.weight": ("lm_head/kernel", True),
}
_GGUF_LAYER = {  # GGUF suffix after "blk.{i}." -> HF suffix after "model.layers.{i}."
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def hf_to_flat(cfg: LlamaConfig, tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Map (HF name, [out, in] array) pairs to (kvjax flat key, array). Unknown names raise."""
    for name, arr in tensors:
        if name in _TOP_MAP:
            key, transpose = _TOP_MAP[name]
        elif name.startswith("model.layers."):
            idx, _, suffix = name[len("model.layers."):].partition(".")
            if suffix.endswith("rotary_emb.inv_freq"):
                continue
            if suffix not in _LAYER_MAP:
                raise ValueError(f"unexpected tensor {name!r} in checkpoint")
            path, transpose = _LAYER_MAP[suffix]
            key = f"layers_{idx}/{path}"
        else:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint")
        if key == "lm_head/kernel" and cfg.tie_embeddings:
            continue
        yield key, (np.ascontiguousarray(arr.T) if transpose else arr)


def gguf_to_hf(arch: str, cfg: LlamaConfig, tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Rename GGUF tensors to HF names, un-permuting llama.cpp's q/k rows for the `llama` architecture."""
    for name, arr in tensors:
        if name in _GGUF_TOP:
            yield _GGUF_TOP[name], arr
            continue
        if not name.startswith("blk."):
            if name == "rope_freqs.weight":  # RoPE scaling factors: read into the config instead
                continue
            raise ValueError(f"unexpected tensor {name!r} in GGUF")
        idx, _, suffix = name[4:].partition(".")
        if suffix not in _GGUF_LAYER:
            raise ValueError(f"unexpected tensor {name!r} in GGUF")
        if arch == "llama" and suffix.startswith(("attn_q.", "attn_k.")):
            n = cfg.n_heads if suffix.startswith("attn_q.") else cfg.n_kv_heads
            arr = unpermute_qk(arr.reshape(arr.shape[0], -1), n).reshape(arr.shape)
        yield f"model.layers.{idx}.{_GGUF_LAYER[suffix]}", arr


def expected_keys(cfg: LlamaConfig) -> set[str]:
    keys = {"embed/embedding", "final_norm/scale"} | ({"lm_head/kernel"} if not cfg.tie_embeddings else set())
    for i in range(cfg.n_layers):
        for path, _ in _LAYER_MAP.values():
            if path.endswith("bias") and not cfg.qkv_bias:
                continue
            keys.add(f"layers_{i}/{path}")
    return keys


def unflatten(flat: Mapping[str, jax.Array]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save_flat(path: str, flat: Mapping[str, np.ndarray], cfg: LlamaConfig) -> None:
    """Write a converted checkpoint (float32 safetensors + the config) atomically."""
    from safetensors.numpy import save_file

    tmp = path + ".tmp"
    save_file(dict(flat), tmp, metadata={"kvjax_config": json.dumps(_cfg_to_json(cfg))})
    os.replace(tmp, path)


def load_flat(path: str, dtype: str | None = None,
              put: Callable[[np.ndarray], jax.Array] = jnp.asarray) -> tuple[LlamaConfig, dict]:
    """Read a converted checkpoint one tensor at a time (no second copy of the weights in memory)."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        cfg = LlamaConfig(**json.loads(f.metadata()["kvjax_config"]))
        if dtype is not None:
            cfg = cfg.replace(dtype=dtype)
        flat = {k: put(f.get_tensor(k).astype(cfg.dtype)) for k in f.keys()}
    check_keys(cfg, flat, path)
    return cfg, unflatten(flat)


def check_keys(cfg: LlamaConfig, flat: Mapping[str, object], source: str) -> None:
    missing, extra = expected_keys(cfg) - set(flat), set(flat) - expected_keys(cfg)
    if missing or extra:
        raise ValueError(f"{source}: checkpoint does not match the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}")


def _cfg_to_json(cfg: LlamaConfig) -> dict:
    import dataclasses

    d = dataclasses.asdict(cfg)
    d["rope_scaling"] = list(cfg.rope_scaling) if cfg.rope_scaling else None
    return d
