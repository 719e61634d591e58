"""Checkpoint conversion: Hugging Face / GGUF tensors to kvjax's parameter tree, and a safetensors cache.

kvjax params are a plain nested dict (Flax Linen layout of the family's module), with Dense kernels
stored [in, out]. Flat keys join the path with "/" (e.g. "layers_0/attn/q_proj/kernel"). The names
are the family's (`kvjax.models.family_of(cfg).weights`, e.g. `kvjax/models/llama_weights.py`); this
module is the generic machinery: renaming, GGUF q/k un-permutation, key checks, the converted cache.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from kvjax.gguf_io import unpermute_qk
from kvjax.models.family import family_named, family_of

DEFAULT_FAMILY = "llama"  # converted checkpoints written before families were recorded


def hf_to_flat(cfg, tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Map (HF name, [out, in] array) pairs to (kvjax flat key, array). Unknown names raise."""
    names = family_of(cfg).weights
    redundant = names.redundant(cfg)
    prefix = names.hf_layer_prefix
    for name, arr in names.hf_regroup(cfg, tensors):
        if name in names.hf_top:
            key, transpose = names.hf_top[name]
        elif name.startswith(prefix):
            idx, _, suffix = name[len(prefix):].partition(".")
            if names.hf_ignored and suffix.endswith(names.hf_ignored):
                continue
            if suffix not in names.hf_layer:
                raise ValueError(f"unexpected tensor {name!r} in checkpoint")
            path, transpose = names.hf_layer[suffix]
            key = f"layers_{idx}/{path}"
        else:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint")
        if key in redundant:
            continue
        yield key, (np.ascontiguousarray(arr.T) if transpose else arr)


def gguf_to_hf(arch: str, cfg, tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Rename GGUF tensors to HF names, un-permuting the q/k rows llama.cpp permuted and undoing what
    else llama.cpp stores differently (the family says which: `WeightNames.gguf_permuted`, `gguf_value`)."""
    names = family_of(cfg).weights
    prefix = names.hf_layer_prefix
    for name, arr in tensors:
        if name in names.gguf_top:
            yield names.gguf_top[name], names.gguf_value(names.gguf_top[name], arr)
            continue
        if not name.startswith("blk."):
            if name in names.gguf_ignored:  # configuration, read by the config builder
                continue
            raise ValueError(f"unexpected tensor {name!r} in GGUF")
        idx, _, suffix = name[4:].partition(".")
        if suffix not in names.gguf_layer:
            raise ValueError(f"unexpected tensor {name!r} in GGUF")
        n_heads = names.gguf_permuted(arch, suffix, cfg)
        if n_heads is not None:
            arr = unpermute_qk(arr.reshape(arr.shape[0], -1), n_heads).reshape(arr.shape)
        hf_name = f"{prefix}{idx}.{names.gguf_layer[suffix]}"
        yield hf_name, names.gguf_value(hf_name, arr)


def expected_keys(cfg) -> set[str]:
    """The flat keys a complete checkpoint of `cfg` has."""
    return family_of(cfg).weights.expected_keys(cfg)


def unflatten(flat: Mapping[str, jax.Array]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save_flat(path: str, flat: Mapping[str, np.ndarray], cfg) -> None:
    """Write a converted checkpoint (float32 safetensors + the config and its family) atomically."""
    tmp = path + ".tmp"
    save_file(dict(flat), tmp, metadata={"kvjax_family": family_of(cfg).name,
                                         "kvjax_config": json.dumps(_cfg_to_json(cfg))})
    os.replace(tmp, path)


def load_flat(path: str, dtype: str | None = None,
              put: Callable[[np.ndarray], jax.Array] = jnp.asarray) -> tuple[object, dict]:
    """Read a converted checkpoint one tensor at a time (no second copy of the weights in memory)."""
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        config_cls = family_named(meta.get("kvjax_family", DEFAULT_FAMILY)).config_cls
        cfg = config_cls(**json.loads(meta["kvjax_config"]))
        if dtype is not None:
            cfg = dataclasses.replace(cfg, dtype=dtype)
        flat = {k: put(f.get_tensor(k).astype(cfg.dtype)) for k in f.keys()}
    check_keys(cfg, flat, path)
    return cfg, unflatten(flat)


def check_keys(cfg, flat: Mapping[str, object], source: str) -> None:
    missing, extra = expected_keys(cfg) - set(flat), set(flat) - expected_keys(cfg)
    if missing or extra:
        raise ValueError(f"{source}: checkpoint does not match the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}")


def _cfg_to_json(cfg) -> dict:
    """The config as JSON values (tuples become lists; config classes take them back, e.g.
    `LlamaConfig.rope_scaling`)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
