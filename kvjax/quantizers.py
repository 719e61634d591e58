"""KV quantization methods: what layout and width K and V are stored in (`QuantKV` stores them).

    kvjax.quantizers.get("kivi-2")        # spec string: name or name-bits
    kvjax.quantizers.KIVI(bits=4, group=32, residual=128)

* `kivi` (Liu et al. 2024, arXiv 2402.02750): keys per channel (groups of `group` tokens), values
  per token (groups of `group` channels), asymmetric min/max, bits 2 or 4, the newest `residual`
  tokens in full precision (flushed `residual` at a time, as KIVI's reference code does).
* `per_token` (HF transformers `QuantizedCache`, quanto backend): keys and values per token, groups of
  `group` channels (64), residual 128, bits 2/4/8.
* `int8` / `fp8`: one symmetric scale per token per head (e4m3 for fp8), residual 32.
* `kvquant` (Hooper et al. 2024, arXiv 2401.18079): keys per channel *before RoPE* (RoPE applied
  after dequantization), values per token, ~1% outliers in a sparse full-precision side store, the
  first `sink` tokens in full precision, bits 2/3/4, optional non-uniform codebooks from calibration
  (`calibrate_kvquant`).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from kvjax import quant
from kvjax.methods.base import _REGISTRY, check_positive, register_quantizer
from kvjax.methods.base import registry as _registry
from kvjax.methods.spec import instantiate, resolve
from kvjax.models.rope import rope_inv_freq
from kvjax.models.rope import apply_rope
from kvjax.models.rope import rotate_block as rope_block
from kvjax.states.base import EMPTY_POS

_register = register_quantizer  # quantizers share kvjax.methods' registry (kind "quantizer")


def _check_key_groups(who: str, residual: int, group: int) -> None:
    """Per-channel keys are quantized in groups of tokens when the residual flushes: R % G == 0."""
    if residual % group:
        raise ValueError(f"{who}: residual ({residual}) must be a multiple of group ({group}): "
                         "keys are quantized in groups of tokens when the residual flushes")


class Quantizer(abc.ABC):
    """Base of quantization methods (frozen kw-only dataclasses; hashable, used as static args).

    Keys arrive RoPE-rotated, with their positions (a method that quantizes pre-RoPE keys undoes the
    rotation); `sink` leading tokens of each row stay in full precision (0 for most methods).
    """

    name: ClassVar[str] = "?"
    kind: ClassVar[str] = "quantizer"
    residual: int
    sink: ClassVar[int] = 0
    plain_codes: ClassVar[bool] = True  # keys and values are their stored codes dequantized, nothing more:
    # `key_scores` / `value_mix` are the defaults, and `kvjax.native`'s kernel may read the store

    @abc.abstractmethod
    def quantize_keys(self, k, pos):
        """k [B, K, S, D] (rotated), pos int32 [B, K, S] -> QuantizedArray."""

    @abc.abstractmethod
    def quantize_values(self, v):
        """[B, K, S, D] -> QuantizedArray."""

    def dequantize_keys(self, qa, pos, dtype):
        """QuantizedArray, pos [B, K, S] -> rotated keys [B, K, S, D] in `dtype`."""
        return quant.dequantize(qa, dtype)

    def dequantize_values(self, qa, dtype):
        return quant.dequantize(qa, dtype)

    def key_scores(self, q, qa, pos):
        """q [B, K, M, D] . keys^T of a block (qa, pos [B, K, S]) -> float32 [B, K, M, S]; by default
        with the scales folded into q (`quant.scores`), the keys never dequantized."""
        return quant.scores(q, qa)

    def value_mix(self, p, qa):
        """p [B, K, M, S] . values of a block -> float32 [B, K, M, D] (`quant.mix`)."""
        return quant.mix(p, qa)

    def for_model(self, cfg) -> "Quantizer":
        """Validate against the model config (ValueError, before anything compiles); the quantizer
        to use with it (bound to what it needs of the config)."""
        return self

    def for_layer(self, layer: int) -> "Quantizer":
        """The quantizer of one layer (methods with per-layer parameters override)."""
        return self


@_register("kivi")
@dataclasses.dataclass(frozen=True, kw_only=True)
class KIVI(Quantizer):
    bits: int = 2
    group: int = 32
    residual: int = 128

    def __post_init__(self):
        quant.check_bits(self.bits, (2, 4), "kivi")
        check_positive(group=self.group, residual=self.residual)
        _check_key_groups("kivi", self.residual, self.group)

    def for_model(self, cfg) -> Quantizer:
        if cfg.head_dim % self.group:
            raise ValueError(f"kivi: group {self.group} does not divide the head dim {cfg.head_dim} (value groups)")
        return self

    def quantize_keys(self, k, pos):
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

    def for_model(self, cfg) -> Quantizer:
        if cfg.head_dim % self.group:
            raise ValueError(f"per_token: group {self.group} does not divide the head dim {cfg.head_dim}")
        return self

    def quantize_keys(self, k, pos):
        return self.quantize_values(k)

    def quantize_values(self, v):
        return quant.quantize(v, self.bits, axis=-1, group=self.group)


@_register("int8")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8(Quantizer):
    residual: int = 32
    _quantize: ClassVar = staticmethod(quant.quantize_int8)

    def __post_init__(self):
        check_positive(residual=self.residual)

    def quantize_keys(self, k, pos):
        return self.quantize_values(k)

    def quantize_values(self, v):
        return self._quantize(v, axis=-1)  # one scale per token per head


@_register("fp8")
@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8(Int8):
    _quantize: ClassVar = staticmethod(quant.quantize_fp8)


@_register("kvquant")
@dataclasses.dataclass(frozen=True, kw_only=True)
class KVQuant(Quantizer):
    """KVQuant (Hooper et al. 2024, arXiv 2401.18079), with KIVI's streaming residual.

    * Keys per channel, pre-RoPE (Sec. 3.1-3.2): on flush, keys are rotated back by -position,
      quantized in groups of `group` tokens per channel, and RoPE is re-applied after
      dequantization (the positions are stored anyway).
    * Values per token (all D channels of a head share one scale and zero-point).
    * Dense-and-sparse outliers (Sec. 3.5): per quantization vector (a key channel's `group` tokens,
      a value token's D channels), the n = max(1, round(outliers * length)) elements farthest from
      the vector's mean are kept exactly (value + uint8 index) and left out of its range. The paper
      calibrates percentile thresholds that remove ~1% per vector; a fixed count keeps shapes static
      (at the defaults: 1 of 128 per key channel group, 1 of 64 or 128 per value token).
    * Attention sink (Sec. 3.6): the first `sink` tokens of each row stay in full precision.
    * Non-uniform datatype (Sec. 3.4, "nuq"): `codebooks`, per layer a pair (key levels, value levels)
      of 2^bits code points in [0, 1], from `calibrate_kvquant`. The paper's k-means is weighted by
      Fisher information; ours is unweighted (its "nuq without sensitivity" ablation). None: uniform.

    `inv_freq` is bound from the model config by `for_model` (RoPE inverse frequencies).
    """

    plain_codes: ClassVar[bool] = False  # keys are rotated after dequantization (`key_scores`)
    bits: int = 3
    group: int = 128
    residual: int = 128
    outliers: float = 0.01
    sink: int = 1
    codebooks: tuple | None = None
    layer: int | None = None
    inv_freq: tuple[float, ...] | None = None
    layer_freqs: tuple[tuple[float, ...], ...] | None = None  # per layer, bound by `for_model`

    def __post_init__(self):
        quant.check_bits(self.bits, (2, 3, 4), "kvquant")
        check_positive(group=self.group, residual=self.residual)
        _check_key_groups("kvquant", self.residual, self.group)
        if not 0 <= self.outliers < 0.5:
            raise ValueError(f"kvquant: outliers is a fraction in [0, 0.5), got {self.outliers!r}")
        if self.outliers and self.group > quant.MAX_OUTLIER_GROUP:
            raise ValueError(f"kvquant: group must be <= {quant.MAX_OUTLIER_GROUP} with outliers, got {self.group}")
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"kvquant: sink must be an int >= 0, got {self.sink!r}")
        if self.codebooks is not None:
            if any(len(pair) != 2 for pair in self.codebooks):
                raise ValueError("kvquant: codebooks holds one (key levels, value levels) pair per layer")
            object.__setattr__(self, "codebooks", tuple(
                (quant.check_levels(k, self.bits, "kvquant codebook"), quant.check_levels(v, self.bits, "kvquant codebook"))
                for k, v in self.codebooks))

    def for_model(self, cfg) -> Quantizer:
        if cfg.head_dim > quant.MAX_OUTLIER_GROUP and self.outliers:
            raise ValueError(f"kvquant: value outliers need head_dim <= {quant.MAX_OUTLIER_GROUP}, got {cfg.head_dim}")
        if cfg.head_dim % 8:
            raise ValueError(f"kvquant: head_dim must be a multiple of 8 (3-bit packing), got {cfg.head_dim}")
        if self.codebooks is not None and len(self.codebooks) != cfg.n_layers:
            raise ValueError(f"kvquant: codebooks for {len(self.codebooks)} layers, the model has {cfg.n_layers}")
        freqs = tuple(tuple(float(f) for f in rope_inv_freq(cfg, i)) for i in range(cfg.n_layers))
        return dataclasses.replace(self, inv_freq=freqs[0], layer_freqs=freqs)

    def for_layer(self, layer: int) -> Quantizer:
        """Layer `layer`'s codebooks and RoPE frequencies (families may use other bases per layer)."""
        freq = self.inv_freq if self.layer_freqs is None else self.layer_freqs[layer]
        return dataclasses.replace(self, inv_freq=freq, layer=layer if self.codebooks is not None else None)

    def _levels(self, which: int):
        if self.codebooks is None:
            return None
        if self.layer is None:
            raise ValueError("kvquant with codebooks quantizes per layer: use quantizer.for_layer(i)")
        return self.codebooks[self.layer][which]

    def n_outliers(self, length: int) -> int:
        return max(1, round(self.outliers * length)) if self.outliers else 0

    def frequencies(self) -> np.ndarray:
        """float32 [D/2] the bound layer's RoPE inverse frequencies."""
        if self.inv_freq is None:
            raise ValueError("kvquant quantizes pre-RoPE keys: bind the model with quantizer.for_model(cfg)")
        return np.asarray(self.inv_freq, np.float32)

    def rotate(self, k, pos, sign: int):
        return apply_rope(k, sign * pos, self.frequencies())

    def quantize_keys(self, k, pos):
        return quant.quantize(self.rotate(k, pos, -1), self.bits, axis=-2, group=self.group,
                              outliers=self.n_outliers(self.group), levels=self._levels(0))

    def dequantize_keys(self, qa, pos, dtype):
        return self.rotate(quant.dequantize(qa, jnp.float32), pos, 1).astype(dtype)

    def key_scores(self, q, qa, pos):
        """Pre-RoPE keys of a block: dequantized (outliers written back), rotated (`rotate_block`),
        then the product."""
        return jnp.einsum("...mc,...sc->...ms", q, self.rotate_block(quant.dequantize(qa, jnp.float32), pos))

    def rotate_block(self, k, pos):
        """RoPE of a block of keys k [B, K, S, D] at pos int32 [B, K, S] (`models.rope.rotate_block`): one
        sin/cos per row where the used slots hold consecutive positions (a flushed block of the store),
        per key where they do not (tokens evicted between them, or slots refilled out of order)."""
        return rope_block(k, pos, self.frequencies(), pos == EMPTY_POS)

    def quantize_values(self, v):
        return quant.quantize(v, self.bits, axis=-1, outliers=self.n_outliers(v.shape[-1]),
                              levels=self._levels(1))


def registry() -> dict[str, type]:
    """Name -> class of every registered quantizer."""
    return _registry("quantizer")


def get(spec) -> Quantizer:
    """A quantizer from an object or a spec string: "kivi-2", "kivi-4", "per_token-4", "kvquant-3",
    "int8", "fp8", or with parameters, "kivi(bits=4, group=64)"."""
    if isinstance(spec, Quantizer):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"quant must be a spec string or a quantizer object, got {type(spec).__name__}")
    name, kwargs = resolve(spec)
    cls = _REGISTRY.get(name)
    if cls is None or cls.kind != "quantizer":
        what = f"{name!r} is a {cls.kind} method, not a quantizer" if cls else f"unknown quantization {spec!r}"
        raise ValueError(f"{what}; known: {', '.join(sorted(registry()))} "
                         "(with -BITS where the method takes bits, e.g. kivi-2, per_token-4)")
    return instantiate(cls, name, kwargs)
