"""KV quantization methods: what layout and width K and V are stored in (`QuantKV` stores them).

    kvjax.quantizers.get("kivi-2")        # spec string: name or name-bits
    kvjax.quantizers.KIVI(bits=4, group=32, residual=128)

* `kivi` (Liu et al. 2024, arXiv 2402.02750): keys per channel (groups of `group` tokens), values
  per token (groups of `group` channels), asymmetric min/max, bits 2 or 4, the newest `residual`
  tokens in full precision (flushed `residual` at a time, as KIVI's reference code does).
* `per_token` (HF transformers `QuantizedCache`, quanto backend): keys and values per token, groups of
  `group` channels (64), residual 128, bits 2/4/8.
* `int8` / `fp8`: one symmetric scale per token per head (e4m3 for fp8), residual 32.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

from kvjax import quant
from kvjax.methods.base import check_positive

_REGISTRY: dict[str, type] = {}


def _register(name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


class Quantizer(abc.ABC):
    """Base of quantization methods (frozen kw-only dataclasses; hashable, used as static args)."""

    name: ClassVar[str] = "?"
    residual: int

    @abc.abstractmethod
    def quantize_keys(self, k):
        """[B, K, S, D] -> QuantizedArray."""

    @abc.abstractmethod
    def quantize_values(self, v):
        """[B, K, S, D] -> QuantizedArray."""

    def check(self, head_dim: int) -> None:
        """Validate against the model's head dim (ValueError), before anything compiles."""


@_register("kivi")
@dataclasses.dataclass(frozen=True, kw_only=True)
class KIVI(Quantizer):
    bits: int = 2
    group: int = 32
    residual: int = 128

    def __post_init__(self):
        quant.check_bits(self.bits, (2, 4), "kivi")
        check_positive(group=self.group, residual=self.residual)
        if self.residual % self.group:
            raise ValueError(f"kivi: residual ({self.residual}) must be a multiple of group ({self.group}): "
                             "keys are quantized in groups of tokens when the residual flushes")

    def check(self, head_dim: int) -> None:
        if head_dim % self.group:
            raise ValueError(f"kivi: group {self.group} does not divide the head dim {head_dim} (value groups)")

    def quantize_keys(self, k):
        return quant.quantize(k, self.bits, axis=-2, group=self.group)

    def quantize_values(self, v):
        return quant.quantize(v, self.bits, axis=-1, group=self.group)


@_register("per_token")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PerToken(Quantizer):
    bits: int = 4
    group: int = 64
    residual: int = 128

    def __post_init__(self):
        quant.check_bits(self.bits, (2, 4, 8), "per_token")
        check_positive(group=self.group, residual=self.residual)

    def check(self, head_dim: int) -> None:
        if head_dim % self.group:
            raise ValueError(f"per_token: group {self.group} does not divide the head dim {head_dim}")

    def quantize_keys(self, k):
        return quant.quantize(k, self.bits, axis=-1, group=self.group)

    quantize_values = quantize_keys


@_register("int8")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8(Quantizer):
    residual: int = 32
    _quantize: ClassVar = staticmethod(quant.quantize_int8)

    def __post_init__(self):
        check_positive(residual=self.residual)

    def quantize_keys(self, k):
        return self._quantize(k, axis=-1)  # one scale per token per head

    quantize_values = quantize_keys


@_register("fp8")
@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8(Int8):
    _quantize: ClassVar = staticmethod(quant.quantize_fp8)


def registry() -> dict[str, type]:
    return dict(_REGISTRY)


def get(spec) -> Quantizer:
    """A quantizer from an object or a spec string: "kivi-2", "kivi-4", "per_token-4", "int8", "fp8"."""
    if isinstance(spec, Quantizer):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"quant must be a spec string or a quantizer object, got {type(spec).__name__}")
    name, _, bits = spec.rpartition("-") if spec.rpartition("-")[2].isdigit() else (spec, "", "")
    if name not in _REGISTRY:
        raise ValueError(f"unknown quantization {spec!r}; known: {', '.join(sorted(_REGISTRY))} "
                         "(with -BITS where the method takes bits, e.g. kivi-2, per_token-4)")
    cls = _REGISTRY[name]
    if bits:
        if "bits" not in {f.name for f in dataclasses.fields(cls)}:
            raise ValueError(f"{name} has a fixed width; write {name!r}, not {spec!r}")
        return cls(bits=int(bits))
    return cls()
