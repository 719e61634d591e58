"""The model-family registry: what kvjax needs to know about a family, registered in one call.

    register_family(LlamaConfig, Llama, name="llama", weights=llama_weights.WEIGHTS,
                    hf_architectures=("LlamaForCausalLM", ...), gguf_architectures=("llama", "qwen2"))

A family is its frozen config class, its Flax module, the names of its weights in Hugging Face and
GGUF checkpoints (`WeightNames`, a file beside the module, e.g. `llama_weights.py`) and the
architecture names under which checkpoints announce it (`architectures[0]` of a config.json,
`general.architecture` of a GGUF). Everything generic dispatches through here: `model_for(cfg)` builds
models, `config_from_hf` / `config_from_gguf` build configs, `kvjax.weights` converts tensors with
`family_of(cfg).weights`. A new family (Gemma 3, Qwen3) is its module, its weight names and one
`register_family` call in `kvjax/models/__init__.py`, plus golden logits.

The config class provides the builders the hub calls:

    ConfigCls.from_hf_config(hf: dict, dtype: str) -> config
    ConfigCls.from_gguf_metadata(meta: dict, tensor_names: set[str], read_tensor, dtype: str) -> config

(`read_tensor(name)`: a GGUF tensor as float32, or None; for tensors that are configuration, such as
llama.cpp's `rope_freqs`). Configs are frozen dataclasses whose `dataclasses.asdict` is JSON (the
converted-checkpoint cache stores them so, with the family's name).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np


def _no_permutation(arch: str, suffix: str, cfg) -> int | None:
    return None


def _nothing_redundant(cfg) -> frozenset[str]:
    return frozenset()


def _as_named(cfg, tensors):
    return tensors


def _as_stored(hf_name: str, arr: np.ndarray) -> np.ndarray:
    return arr


@dataclasses.dataclass(frozen=True)
class WeightNames:
    """How a family's tensors are named in HF and GGUF checkpoints, and which kvjax keys it expects.

    kvjax keys are flat paths of the Flax params ("layers_3/attn/q_proj/kernel"); HF tensors are
    [out, in] where Flax Dense kernels are [in, out] (the `transpose` flags).

    Attributes:
      hf_top: HF name -> (kvjax key, transpose), for tensors outside the layers.
      hf_layer: HF suffix after `{hf_layer_prefix}{i}.` -> (kvjax path after "layers_{i}/", transpose).
      gguf_top, gguf_layer: GGUF name -> HF name; GGUF suffix after "blk.{i}." -> HF layer suffix.
      expected_keys: cfg -> the set of kvjax keys a complete checkpoint of that config has.
      hf_layer_prefix: the HF prefix of layer tensors.
      hf_ignored: endings of HF layer suffixes that are buffers, not weights (skipped).
      gguf_ignored: GGUF tensors that are configuration, read by the config builder (skipped).
      gguf_permuted: (GGUF architecture, layer suffix, cfg) -> the head count whose rows llama.cpp
        permuted for its interleaved RoPE (un-permuted with `gguf_io.unpermute_qk`), or None.
      redundant: cfg -> kvjax keys a checkpoint may carry that the config does not use (a tied
        lm_head): dropped, not an error.
      hf_regroup: (cfg, (HF name, array) pairs) -> pairs, applied before renaming: tensors a family
        stores otherwise than one per HF tensor (DeepSeek's per-expert weights stacked [X, in, out]).
      gguf_value: (HF name, array) -> the array as HF stores it, for tensors llama.cpp stores
        otherwise (Gemma's norm weights, stored as 1 + w).
    """

    hf_top: Mapping[str, tuple[str, bool]]
    hf_layer: Mapping[str, tuple[str, bool]]
    gguf_top: Mapping[str, str]
    gguf_layer: Mapping[str, str]
    expected_keys: Callable[[Any], set[str]]
    hf_layer_prefix: str = "model.layers."
    hf_ignored: tuple[str, ...] = ()
    gguf_ignored: tuple[str, ...] = ()
    gguf_permuted: Callable[[str, str, Any], int | None] = _no_permutation
    redundant: Callable[[Any], frozenset[str]] = _nothing_redundant
    hf_regroup: Callable[[Any, Any], Any] = _as_named
    gguf_value: Callable[[str, np.ndarray], np.ndarray] = _as_stored


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    module_cls: type
    weights: WeightNames = dataclasses.field(repr=False)
    hf_architectures: tuple[str, ...] = ()
    gguf_architectures: tuple[str, ...] = ()


_FAMILIES: dict[str, Family] = {}  # by name, in registration order


def register_family(config_cls: type, module_cls: type, *, name: str, weights: WeightNames,
                    hf_architectures: tuple[str, ...] = (), gguf_architectures: tuple[str, ...] = ()) -> Family:
    """Register a model family: `model_for` builds `module_cls` for configs of class `config_cls`,
    checkpoints whose architecture is one of `hf_architectures` (config.json) or `gguf_architectures`
    (GGUF) load through `config_cls`'s builders and `weights`. Every name must be new."""
    family = Family(name, config_cls, module_cls, weights, tuple(hf_architectures), tuple(gguf_architectures))
    clashes = [f"family name {name!r}" for f in _FAMILIES.values() if f.name == name]
    clashes += [f"config class {config_cls.__name__}" for f in _FAMILIES.values() if f.config_cls is config_cls]
    clashes += [f"HF architecture {a!r}" for a in family.hf_architectures for f in _FAMILIES.values()
                if a in f.hf_architectures]
    clashes += [f"GGUF architecture {a!r}" for a in family.gguf_architectures for f in _FAMILIES.values()
                if a in f.gguf_architectures]
    if clashes:
        raise ValueError(f"cannot register model family {name!r}: already registered: {', '.join(clashes)}")
    _FAMILIES[name] = family
    return family


def families() -> tuple[Family, ...]:
    """The registered families, in registration order."""
    return tuple(_FAMILIES.values())


def family_named(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; registered: {', '.join(_FAMILIES)}") from None


def family_of(cfg) -> Family:
    """The family of a config (by its class)."""
    for family in _FAMILIES.values():
        if type(cfg) is family.config_cls:
            return family
    raise ValueError(f"no model family registered for {type(cfg).__name__}; known: "
                     f"{', '.join(f.config_cls.__name__ for f in _FAMILIES.values())}")


def model_for(cfg) -> type:
    """The Flax module class of a config's family: `model_for(cfg)(cfg, ...)`."""
    return family_of(cfg).module_cls


def hf_architectures() -> tuple[str, ...]:
    return tuple(a for f in _FAMILIES.values() for a in f.hf_architectures)


def gguf_architectures() -> tuple[str, ...]:
    return tuple(a for f in _FAMILIES.values() for a in f.gguf_architectures)


def config_from_hf(hf: Mapping[str, Any], dtype: str = "float32"):
    """The config of a Hugging Face config.json (a dict), built by the family of `architectures[0]`."""
    arch = (hf.get("architectures") or ["?"])[0]
    for family in _FAMILIES.values():
        if arch in family.hf_architectures:
            return family.config_cls.from_hf_config(hf, dtype=dtype)
    raise ValueError(f"unsupported architecture {arch!r} in config.json; supported: {hf_architectures()}")


def config_from_gguf(meta: Mapping[str, Any], tensor_names: set[str],
                     read_tensor: Callable[[str], np.ndarray | None] = lambda name: None, dtype: str = "float32"):
    """The config of a GGUF file (its metadata and tensor names), built by the family of
    `general.architecture`."""
    arch = meta.get("general.architecture")
    for family in _FAMILIES.values():
        if arch in family.gguf_architectures:
            return family.config_cls.from_gguf_metadata(meta, tensor_names, read_tensor, dtype=dtype)
    raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {gguf_architectures()}")
