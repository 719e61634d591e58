"""Quantized storage for K/V tensors: bit packing, group-wise uniform, int8 and fp8 quantization.

Legend (quantization code is generic over leading axes; the K/V layouts it serves are spelled out):
  ...   any leading axes (for K/V: B batch, K KV heads)
  L     length of the quantized axis `axis` (S tokens for axis=-2, D channels for axis=-1)
  n     elements per quantization group (`group`); L/n groups along `axis`
  C     length of the last axis (D, the head dim, for K/V)
  P     packed bytes along the last axis: C * bits / 8 (3-bit: C * 3 / 8)

The two layouts of KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache", arXiv 2402.02750), for K/V of shape [B, K, S, D]:
  values per token   (axis=-1, groups of n channels): codes [B, K, S, P], scale/zero [B, K, S, D/n]
  keys per channel   (axis=-2, groups of n tokens):   codes [B, K, S, P], scale/zero [B, K, S/n, D]
HF QuantizedCache (quanto backend) is the axis=-1 layout with n=64 for both K and V; int8/fp8 are
the per-token-per-head layout (axis=-1, one group of all D channels).

Codes are always packed along the LAST axis, whatever `axis` the groups run along, so both layouts
share one packed format. Scales and zero-points have x's shape with L replaced by L/n, in the scale
dtype (the model dtype by default).

Bit order. Codes are packed in little-endian blocks: a block of `codes_per_block` codes is one
integer word with code i in bits [bits*i, bits*(i+1)), written out as `bytes_per_block` bytes, least
significant byte first. So at 2 and 4 bits the first code sits in the low bits of its byte:
codes [0, 1, 2, 3] at 2 bits -> 0b11_10_01_00 = 228.

3-bit codes are packed densely, 8 codes into 3 bytes (a 24-bit word), not into 4-bit slots: the
point of 3-bit KVQuant is the memory, 4-bit slots would store exactly what 4-bit codes store. The
price is that the last axis must be a multiple of 8 (head dims are); unpacking is the same shifts
and masks as at 2 and 4 bits. `nbytes` therefore counts 3/8 byte per code.

Rounding of scales (why the error bound needs no scale-rounding term). The zero-point is the group
minimum rounded *down* into the scale dtype and the scale is the step rounded *up*, so the stored
[zero, zero + (2^b - 1) * scale] always covers the group's [min, max]; codes are computed from the
stored (rounded) scale and zero. Hence |x - dequantize(x)| <= scale / 2 for the *stored* scale, at
any scale dtype, up to float32 arithmetic (a few ulps of |x|). With round-to-nearest bf16 scales the
top code would miss the maximum by up to (2^b - 1) * ulp(scale): at 8 bits, as much as the step.

Zero ranges never make NaN. Scales are floored at the smallest normal number of the scale dtype
(`finfo.tiny`): a constant group (max == min) gets scale = tiny, all codes 0, and dequantizes to
exactly `zero` = its value (exact whenever the value is representable in the scale dtype). No
division by zero or by a denormal (flushed to zero on some backends) can happen. NaN/Inf *inputs*
do propagate (a NaN makes its group's scale NaN); the debug check for them is `check_finite`, a
host-side check to call outside jit. The scale dtype must be able to represent the group extrema
(it does when it is the dtype x came in).

All functions are pure jnp and jitted with their integer/dtype arguments static; argument errors
are raised as ValueError at trace time, before anything compiles.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# bits -> (codes per block, bytes per block) of the packed format.
_BLOCK = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}
PACK_BITS = tuple(sorted(_BLOCK))   # bit widths `pack`/`unpack` support
UNIFORM_BITS = PACK_BITS            # bit widths of asymmetric uniform quantization
FP8_MAX = 448.0                     # largest finite float8_e4m3fn
INT8_MAX = 127                      # symmetric int8: codes in [-127, 127]
KINDS = ("uniform", "nuq", "int8", "fp8")
MAX_OUTLIER_GROUP = 256             # outlier indices within a group are stored as uint8


# ----------------------------------------------------------------------------------- validation


def check_bits(bits, allowed, who: str) -> None:
    """Raise ValueError unless `bits` is one of `allowed` (methods pass their own subset)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in allowed:
        raise ValueError(f"{who}: bits must be one of {tuple(allowed)}, got {bits!r}")


def _check_group_args(shape, axis, group, who: str) -> tuple[int, int]:
    """Validate axis and group against a shape; return (axis as a non-negative index, group)."""
    ndim = len(shape)
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"{who}: axis {axis!r} out of range for an array of shape {tuple(shape)}")
    ax = int(axis) % ndim
    length = shape[ax]
    if group is None:
        group = length
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group <= 0:
        raise ValueError(f"{who}: group must be a positive int, got {group!r}")
    if length % group:
        raise ValueError(f"{who}: group {group} does not divide the length {length} of axis {axis} "
                         f"(shape {tuple(shape)})")
    return ax, int(group)


def _check_last_axis(shape, bits, who: str) -> None:
    cpb = _BLOCK[bits][0]
    if len(shape) == 0 or shape[-1] % cpb:
        raise ValueError(f"{who}: {bits}-bit codes are packed {cpb} per block along the last axis, "
                         f"whose length must be a multiple of {cpb}; got shape {tuple(shape)}")


def _check_float(x, who: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{who}: expected a floating-point array, got dtype {x.dtype}")


# -------------------------------------------------------------------------------------- packing


@functools.partial(jax.jit, static_argnames=("bits",))
def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Pack unsigned codes (< 2^bits) along the last axis into uint8.

    Args:
      codes: integer [..., C], values in [0, 2^bits); higher bits are masked off.
      bits: 2 (4 codes per byte), 3 (8 codes per 3 bytes), 4 (2 per byte) or 8 (identity).
    Returns:
      uint8 [..., C * bits / 8], little-endian blocks (see the module docstring).
    """
    check_bits(bits, PACK_BITS, "pack")
    _check_last_axis(codes.shape, bits, "pack")
    if bits == 8:
        return codes.astype(jnp.uint8)
    cpb, bpb = _BLOCK[bits]
    lead, c = codes.shape[:-1], codes.shape[-1]
    blocks = (codes.astype(jnp.uint32) & (2**bits - 1)).reshape(*lead, c // cpb, cpb)
    shifts = jnp.arange(cpb, dtype=jnp.uint32) * bits
    word = jnp.sum(blocks << shifts, axis=-1, dtype=jnp.uint32)      # disjoint bits: sum == or
    out = (word[..., None] >> (jnp.arange(bpb, dtype=jnp.uint32) * 8)) & 0xFF
    return out.astype(jnp.uint8).reshape(*lead, c // cpb * bpb)


@functools.partial(jax.jit, static_argnames=("bits", "n"))
def unpack(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of `pack`: uint8 [..., n * bits / 8] -> uint8 codes [..., n]."""
    check_bits(bits, PACK_BITS, "unpack")
    _check_last_axis((n,), bits, "unpack")
    cpb, bpb = _BLOCK[bits]
    if packed.shape[-1] != n // cpb * bpb:
        raise ValueError(f"unpack: {n} codes at {bits} bits take {n // cpb * bpb} bytes, "
                         f"got a last axis of {packed.shape[-1]} (shape {packed.shape})")
    if bits == 8:
        return packed.astype(jnp.uint8)
    lead = packed.shape[:-1]
    by = packed.astype(jnp.uint32).reshape(*lead, n // cpb, bpb)
    word = jnp.sum(by << (jnp.arange(bpb, dtype=jnp.uint32) * 8), axis=-1, dtype=jnp.uint32)
    codes = (word[..., None] >> (jnp.arange(cpb, dtype=jnp.uint32) * bits)) & (2**bits - 1)
    return codes.astype(jnp.uint8).reshape(*lead, n)


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes that `n_codes` codes take when packed at `bits` (n_codes a multiple of the block)."""
    check_bits(bits, PACK_BITS, "packed_nbytes")
    cpb, bpb = _BLOCK[bits]
    return n_codes // cpb * bpb


# ---------------------------------------------------------------------------- quantized arrays


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A quantized tensor: codes plus per-group scales (and zero-points), usable as a pytree leaf set.

    Attributes:
      codes: [..., P] — kind "uniform": uint8 bit-packed along the last axis; "int8": int8 [..., C];
        "fp8": float8_e4m3fn [..., C].
      scale: x's shape with the `axis` length L replaced by L / group, in the scale dtype.
      zero: like `scale` (the group minimum, rounded down) for "uniform"/"nuq"; None for int8/fp8.
      outlier_val, outlier_idx: the dense-and-sparse side store (KVQuant), or None. `scale`'s shape
        with a new axis of n outliers right after the group axis (values per token: [..., S, D/n_g, n];
        keys per channel: [..., S/n_g, n, D]); values in the scale dtype, indices uint8 within the group.
      kind: "uniform" (asymmetric min/max, `bits` wide), "nuq" (asymmetric, non-uniform `levels`),
        "int8" (symmetric) or "fp8" (e4m3). Static.
      bits: code width (8 for int8 and fp8). Static.
      axis: the axis the groups run along, as a negative index (stays right under vmap). Static.
      group: elements per group along `axis`. Static.
      levels: "nuq" only: the 2^bits code points in [0, 1] (ascending); x ~ zero + levels[code] * scale.
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    outlier_val: jax.Array | None = None
    outlier_idx: jax.Array | None = None
    kind: str = dataclasses.field(metadata=dict(static=True), default="uniform")
    bits: int = dataclasses.field(metadata=dict(static=True), default=8)
    axis: int = dataclasses.field(metadata=dict(static=True), default=-1)
    group: int = dataclasses.field(metadata=dict(static=True), default=1)
    levels: tuple[float, ...] | None = dataclasses.field(metadata=dict(static=True), default=None)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the original (dequantized) array, derived from the leaves."""
        cpb, bpb = _BLOCK[self.bits]
        return (*self.codes.shape[:-1], self.codes.shape[-1] // bpb * cpb)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held: codes + scales (+ zero-points) (+ outlier values and indices)."""
        return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree.leaves(self))

    @property
    def bits_per_element(self) -> float:
        """Effective storage cost per original element, scales and zero-points included."""
        return 8 * self.nbytes / math.prod(self.shape)


def quantized_nbytes(shape, *, kind: str = "uniform", bits: int = 8, axis: int = -1, group=None,
                     scale_dtype=jnp.float32, outliers: int = 0) -> int:
    """Exact bytes of the `QuantizedArray` that quantizing an array of `shape` gives.

    codes: prod(shape[:-1]) * C * bits / 8 (uniform/nuq; 3 bits: 3/8 byte per code), prod(shape)
    bytes (int8, fp8); scale: prod(shape) / group * itemsize(scale_dtype); zero: the same again
    (uniform/nuq); outliers: prod(shape) / group * outliers * (itemsize(scale_dtype) + 1).
    """
    if kind not in KINDS:
        raise ValueError(f"quantized_nbytes: kind must be one of {KINDS}, got {kind!r}")
    bits = bits if kind in ("uniform", "nuq") else 8
    check_bits(bits, UNIFORM_BITS, "quantized_nbytes")
    _, group = _check_group_args(shape, axis, group, "quantized_nbytes")
    _check_last_axis(shape, bits, "quantized_nbytes")
    size = math.prod(shape)
    codes = packed_nbytes(size, bits)
    n_scales = size // group
    itemsize = jnp.dtype(scale_dtype).itemsize
    per_scale = itemsize * (2 if kind in ("uniform", "nuq") else 1)
    return codes + n_scales * per_scale + n_scales * outliers * (itemsize + 1)


def _groups(x: jax.Array, ax: int, group: int) -> jax.Array:
    """[..., L, ...] -> [..., L/n, n, ...]: split axis `ax` into (groups, group)."""
    return x.reshape(*x.shape[:ax], x.shape[ax] // group, group, *x.shape[ax + 1:])


def _round_down(v: jax.Array, dtype) -> jax.Array:
    """Largest value of `dtype` <= v (v float32); NaN stays NaN."""
    r = v.astype(dtype)
    return jnp.where(r.astype(jnp.float32) > v, jnp.nextafter(r, jnp.array(-jnp.inf, dtype)), r)


def _round_up(v: jax.Array, dtype) -> jax.Array:
    """Smallest value of `dtype` >= v (v float32); NaN stays NaN."""
    r = v.astype(dtype)
    return jnp.where(r.astype(jnp.float32) < v, jnp.nextafter(r, jnp.array(jnp.inf, dtype)), r)


def _step(span: jax.Array, levels: float, dtype) -> jax.Array:
    """Scale covering `span` (float32, >= 0) with `levels` steps: rounded up into `dtype`, >= tiny."""
    return jnp.maximum(_round_up(span / levels, dtype), jnp.finfo(dtype).tiny)


def _prepare(x, axis, group, scale_dtype, who):
    _check_float(x, who)
    ax, group = _check_group_args(x.shape, axis, group, who)
    scale_dtype = jnp.dtype(x.dtype if scale_dtype is None else scale_dtype)
    if not jnp.issubdtype(scale_dtype, jnp.floating) or scale_dtype.itemsize < 2:
        raise ValueError(f"{who}: scale_dtype must be a float type of 16 bits or more, got {scale_dtype}")
    return ax, group, scale_dtype, _groups(x.astype(jnp.float32), ax, group)


def check_levels(levels, bits: int, who: str) -> tuple[float, ...]:
    """Validate a non-uniform codebook: 2^bits ascending floats in [0, 1]; returned as a tuple."""
    lv = tuple(float(v) for v in np.asarray(levels, np.float64).reshape(-1))
    if len(lv) != 2**bits or any(b <= a for a, b in zip(lv, lv[1:])) or lv[0] < 0 or lv[-1] > 1:
        raise ValueError(f"{who}: levels must be {2**bits} strictly ascending values in [0, 1] "
                         f"for {bits} bits, got {lv}")
    return lv


def _split_outliers(xg: jax.Array, gax: int, n: int):
    """The n elements of each group (axis `gax` of grouped x) farthest from the group mean.

    Returns (mask: bool like xg, True at outliers; values f32 and indices int32, both xg's shape
    with the group axis of length n instead of the group size).
    """
    dev = jnp.abs(xg - jnp.mean(xg, axis=gax, keepdims=True))
    _, idx = jax.lax.top_k(jnp.moveaxis(dev, gax, -1), n)
    idx = jnp.moveaxis(idx, -1, gax)
    return _outlier_mask(xg.shape, idx, gax), jnp.take_along_axis(xg, idx, axis=gax), idx


def _outlier_mask(shape, idx: jax.Array, gax: int) -> jax.Array:
    iota = jax.lax.broadcasted_iota(jnp.int32, shape, gax)
    hits = [iota == jax.lax.slice_in_dim(idx, j, j + 1, axis=gax) for j in range(idx.shape[gax])]
    return functools.reduce(jnp.logical_or, hits)


def _range(xg: jax.Array, gax: int, group: int, outliers: int):
    """Min and max of each group of grouped x, outliers left out. Returns (lo, hi, outlier mask,
    outlier values, outlier indices); the last three are None without outliers."""
    if not outliers:
        return jnp.min(xg, axis=gax), jnp.max(xg, axis=gax), None, None, None
    if isinstance(outliers, bool) or not isinstance(outliers, int) or not 0 < outliers < group:
        raise ValueError(f"quantize: outliers must be an int in [0, group={group}), got {outliers!r}")
    if group > MAX_OUTLIER_GROUP:
        raise ValueError(f"quantize: outlier indices are uint8, so group must be <= "
                         f"{MAX_OUTLIER_GROUP} with outliers, got {group}")
    mask, val, idx = _split_outliers(xg, gax, outliers)
    lo = jnp.min(jnp.where(mask, jnp.inf, xg), axis=gax)
    hi = jnp.max(jnp.where(mask, -jnp.inf, xg), axis=gax)
    return lo, hi, mask, val, idx


@functools.partial(jax.jit, static_argnames=("axis", "group", "outliers"))
def unit_range(x: jax.Array, *, axis: int = -1, group: int | None = None, outliers: int = 0):
    """Each element's place in its group's [min, max] (outliers left out), as `quantize` groups them.

    What a non-uniform codebook is fitted to (KVQuant's normalized activations). Returns
    (u float32 [x.shape] in [0, 1] for inliers, inlier bool [x.shape]).
    """
    _check_float(x, "unit_range")
    ax, group = _check_group_args(x.shape, axis, group, "unit_range")
    xg = _groups(x.astype(jnp.float32), ax, group)
    lo, hi, mask, _, _ = _range(xg, ax + 1, group, outliers)
    lo, hi = jnp.expand_dims(lo, ax + 1), jnp.expand_dims(hi, ax + 1)
    u = jnp.clip((xg - lo) / jnp.maximum(hi - lo, jnp.finfo(jnp.float32).tiny), 0, 1)
    inlier = jnp.ones(xg.shape, bool) if mask is None else ~mask
    return u.reshape(x.shape), inlier.reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("bits", "axis", "group", "scale_dtype", "outliers", "levels"))
def quantize(x: jax.Array, bits: int, *, axis: int = -1, group: int | None = None, scale_dtype=None,
             outliers: int = 0, levels: tuple[float, ...] | None = None) -> QuantizedArray:
    """Asymmetric min/max quantization in groups of `group` consecutive elements along `axis`.

    KIVI (arXiv 2402.02750, Sec. 3): zero = min, scale = (max - min) / (2^b - 1),
    codes = clip(round((x - zero) / scale), 0, 2^b - 1), x ~ zero + codes * scale; keys with
    axis=-2 (per channel), values with axis=-1 (per token). Zero is rounded down and scale up into
    `scale_dtype`, scale is floored at finfo(scale_dtype).tiny (see the module docstring), so
    |x - dequantize(quantize(x))| <= scale / 2 elementwise, up to float32 arithmetic.

    KVQuant (Hooper et al. 2024, arXiv 2401.18079) options:
      outliers (Sec. 3.5, dense-and-sparse): the `outliers` elements of each group farthest from the
        group mean are kept exactly in a sparse side store (value + uint8 index) and excluded from
        the group's min/max, so the other elements get a finer step; dequantization writes them back.
      levels (Sec. 3.4, non-uniform "nuq" datatype): 2^bits code points in [0, 1]; scale is the
        whole span max - min (rounded up), codes = the nearest level to (x - zero) / scale, and
        x ~ zero + levels[code] * scale. The error is at most half the widest gap between levels
        (or to the ends of [0, 1]) times the scale.

    Args:
      x: float [..., L, ..., C].
      bits: 2, 3, 4 or 8.
      axis: axis the groups run along (-1: channels of a token; -2: tokens of a channel).
      group: elements per group; None means the whole axis. Must divide x.shape[axis].
      scale_dtype: dtype of scale and zero (default x.dtype, the model dtype).
      outliers: elements per group kept full precision (0: none; < group <= 256).
      levels: non-uniform code points (a tuple, static) or None for uniform codes.
    Returns:
      QuantizedArray(kind="uniform" | "nuq"): codes uint8 [..., C * bits / 8], scale/zero
      [..., L/n, ..., C], outlier values/indices as documented on `QuantizedArray`.
    """
    check_bits(bits, UNIFORM_BITS, "quantize")
    _check_last_axis(x.shape, bits, "quantize")
    ax, group, sdt, xg = _prepare(x, axis, group, scale_dtype, "quantize")
    gax = ax + 1
    lo, hi, _, out_val, out_idx = _range(xg, gax, group, outliers)
    if outliers:
        out_val, out_idx = out_val.astype(sdt), out_idx.astype(jnp.uint8)
    zero = _round_down(lo, sdt)                                                       # [..., L/n, ...]
    span = hi - zero.astype(jnp.float32)
    if levels is None:
        kind, top = "uniform", 2**bits - 1
        scale = _step(span, top, sdt)
        z32, s32 = (jnp.expand_dims(a.astype(jnp.float32), gax) for a in (zero, scale))
        codes = jnp.clip(jnp.round((xg - z32) / s32), 0, top)
    else:
        kind, levels = "nuq", check_levels(levels, bits, "quantize")
        scale = _step(span, 1.0, sdt)
        z32, s32 = (jnp.expand_dims(a.astype(jnp.float32), gax) for a in (zero, scale))
        lv = np.asarray(levels, np.float32)
        codes = jnp.searchsorted(jnp.asarray((lv[1:] + lv[:-1]) / 2), (xg - z32) / s32)
    return QuantizedArray(codes=pack(codes.astype(jnp.uint8).reshape(x.shape), bits), scale=scale,
                          zero=zero, outlier_val=out_val, outlier_idx=out_idx, kind=kind, bits=bits,
                          axis=ax - x.ndim, group=group, levels=levels)


@functools.partial(jax.jit, static_argnames=("axis", "group", "scale_dtype"))
def quantize_int8(x: jax.Array, *, axis: int = -1, group: int | None = None,
                  scale_dtype=None) -> QuantizedArray:
    """Symmetric int8: scale = absmax / 127 per group (rounded up, >= tiny), codes = round(x / scale).

    The default (axis=-1, group=None) is one scale per token per head. |x - deq| <= scale / 2.
    Args/shapes as `quantize`; codes are int8 [..., C] (not packed), zero is None.
    """
    ax, group, sdt, xg = _prepare(x, axis, group, scale_dtype, "quantize_int8")
    scale = _step(jnp.max(jnp.abs(xg), axis=ax + 1), INT8_MAX, sdt)
    s32 = jnp.expand_dims(scale.astype(jnp.float32), ax + 1)
    codes = jnp.clip(jnp.round(xg / s32), -INT8_MAX, INT8_MAX).astype(jnp.int8).reshape(x.shape)
    return QuantizedArray(codes=codes, scale=scale, zero=None, kind="int8", bits=8,
                          axis=ax - x.ndim, group=group)


@functools.partial(jax.jit, static_argnames=("axis", "group", "scale_dtype"))
def quantize_fp8(x: jax.Array, *, axis: int = -1, group: int | None = None,
                 scale_dtype=None) -> QuantizedArray:
    """float8 e4m3: scale = absmax / 448 per group (rounded up, >= tiny), codes = fp8(x / scale).

    e4m3 keeps 3 mantissa bits, so with y = x / scale (|y| <= 448):
      |y - fp8(y)| <= 2^-4 |y|  for |y| >= 2^-6 (normal numbers), <= 2^-10 below (subnormal step 2^-9),
    i.e. |x - deq| <= max(2^-4 |x|, 2^-10 scale) up to float32 arithmetic. Values are clipped to
    +-448 before the cast (e4m3fn has no Inf: an overflowing cast gives NaN).
    Args/shapes as `quantize`; codes are float8_e4m3fn [..., C], zero is None.
    """
    ax, group, sdt, xg = _prepare(x, axis, group, scale_dtype, "quantize_fp8")
    scale = _step(jnp.max(jnp.abs(xg), axis=ax + 1), FP8_MAX, sdt)
    s32 = jnp.expand_dims(scale.astype(jnp.float32), ax + 1)
    codes = jnp.clip(xg / s32, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn).reshape(x.shape)
    return QuantizedArray(codes=codes, scale=scale, zero=None, kind="fp8", bits=8,
                          axis=ax - x.ndim, group=group)


def _fp8_to_f32(codes: jax.Array) -> jax.Array:
    """float8_e4m3fn [...] -> float32, exactly, in integer and float vector ops: XLA:CPU converts
    float8 element by element in software (~6x slower than int8 -> float32). Bits s eeee mmm:
    (8 + m) * 2^(e - 10) for e > 0, m * 2^-9 for e = 0, NaN for eeee mmm = 1111 111."""
    u = jax.lax.bitcast_convert_type(codes, jnp.uint8).astype(jnp.int32)
    e, m = (u >> 3) & 15, (u & 7).astype(jnp.float32)
    two = jax.lax.bitcast_convert_type((e + 117) << 23, jnp.float32)  # 2^(e - 10), a normal float32
    mag = jnp.where(e == 0, m * 2.0**-9, (m + 8.0) * two)
    mag = jnp.where((u & 127) == 127, jnp.nan, mag)
    return jnp.where(u >= 128, -mag, mag)


def as_bytes(qa: QuantizedArray) -> QuantizedArray:
    """`qa` with float8 codes reinterpreted as their uint8 bits (`codes_f32` reads both): XLA:CPU
    widens a float8 array to float16 whole before any slice of it, so a reader slicing blocks of a
    float8 store must slice its bytes."""
    if qa.codes.dtype.itemsize != 1 or not jnp.issubdtype(qa.codes.dtype, jnp.floating):
        return qa
    return dataclasses.replace(qa, codes=jax.lax.bitcast_convert_type(qa.codes, jnp.uint8))


def codes_f32(qa: QuantizedArray) -> jax.Array:
    """The codes of `qa` as float32 [..., C] in the original shape: unpacked integers ("uniform"),
    their code points ("nuq": levels[code]), or the int8 / fp8 numbers; no scale applied."""
    if qa.kind in ("uniform", "nuq"):
        codes = unpack(qa.codes, qa.bits, qa.shape[-1])
        if qa.kind == "nuq":
            return jnp.asarray(qa.levels, jnp.float32)[codes.astype(jnp.int32)]
        return codes.astype(jnp.float32)
    if qa.kind == "int8":
        return qa.codes.astype(jnp.float32)
    if qa.kind == "fp8":
        return _fp8_to_f32(qa.codes)
    raise ValueError(f"dequantize: unknown kind {qa.kind!r}; expected one of {KINDS}")


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(qa: QuantizedArray, dtype=None) -> jax.Array:
    """codes * scale (+ zero) (levels[codes] for "nuq"), outliers written back; computed in float32
    and cast to `dtype` (default: the scale dtype).

    Returns: [..., C], the shape `qa` was quantized from.
    """
    shape = qa.shape
    ax = qa.axis % len(shape)
    c = _groups(codes_f32(qa), ax, qa.group)
    out = c * jnp.expand_dims(qa.scale.astype(jnp.float32), ax + 1)
    if qa.zero is not None:
        out = out + jnp.expand_dims(qa.zero.astype(jnp.float32), ax + 1)
    if qa.outlier_val is not None:  # write the sparse side store back over the dense codes
        iota = jax.lax.broadcasted_iota(jnp.int32, out.shape, ax + 1)
        for j in range(qa.outlier_idx.shape[ax + 1]):
            at = functools.partial(jax.lax.slice_in_dim, start_index=j, limit_index=j + 1, axis=ax + 1)
            out = jnp.where(iota == at(qa.outlier_idx).astype(jnp.int32), at(qa.outlier_val).astype(jnp.float32), out)
    return out.reshape(shape).astype(qa.scale.dtype if dtype is None else dtype)


def _foldable(qa: QuantizedArray) -> bool:
    """Scales fold out of a product with `qa` for token (-2) or channel (-1) groups without outliers."""
    return qa.outlier_val is None and qa.axis in (-1, -2)


def _to_planar(x: jax.Array, n: int, cpb: int) -> jax.Array:
    """x [..., C] with the channels of each group of n reordered as `planar_codes` holds them: the
    code i of every packed block first (block position i * n/cpb + j <- channel j * cpb + i)."""
    c = x.shape[-1]
    return x.reshape(*x.shape[:-1], c // n, n // cpb, cpb).swapaxes(-1, -2).reshape(x.shape)


def _from_planar(x: jax.Array, n: int, cpb: int) -> jax.Array:
    """Inverse of `_to_planar`."""
    c = x.shape[-1]
    return x.reshape(*x.shape[:-1], c // n, cpb, n // cpb).swapaxes(-1, -2).reshape(x.shape)


def planar_codes(qa: QuantizedArray, n: int) -> jax.Array:
    """float32 [..., C] codes of `qa` (as `codes_f32`) with the channels of each group of n in planar
    order (`_to_planar`): plane i holds code i of every packed block, so unpacking is a shift and a
    mask over contiguous bytes, with no interleave of the codes back into channel order."""
    cpb, bpb = _BLOCK[qa.bits]
    if qa.kind not in ("uniform", "nuq") or cpb == 1:
        return codes_f32(qa)
    c = qa.shape[-1]
    by = qa.codes.astype(jnp.uint32).reshape(*qa.codes.shape[:-1], c // n, n // cpb, bpb)
    word = functools.reduce(jnp.bitwise_or, [by[..., j] << (8 * j) for j in range(bpb)])  # [..., C/n, n/cpb]
    shifts = (jnp.arange(cpb, dtype=jnp.uint32) * qa.bits)[:, None]  # one shift per plane (no concatenate)
    codes = ((word[..., None, :] >> shifts) & (2**qa.bits - 1)).reshape(qa.shape)
    if qa.kind == "nuq":
        return jnp.asarray(qa.levels, jnp.float32)[codes.astype(jnp.int32)]
    return codes.astype(jnp.float32)


def scores(q: jax.Array, qa: QuantizedArray) -> jax.Array:
    """q @ dequantize(qa)^T without the dequantized array: float32 [..., M, S].

    q: float [..., M, C]; qa quantizes x [..., S, C] (leading axes alike). Only the code -> float32
    conversion touches every element of x; scales and zeros apply to q or to partial sums:
      per channel (axis -2, groups of n tokens; scale, zero [..., S/n, C]):
        q . (s_g * c + z_g) = (q * s_g) . c + q . z_g;
      per token (axis -1, groups of n channels; scale, zero [..., S, C/n]):
        q . x_s = sum_j s_sj (q_j . c_sj) + z_sj sum(q_j).
    The codes are unpacked in planar order (`planar_codes`) and q and the scales reordered to match.
    Outliers (or other axes) fall back to the dequantized product.
    """
    q = q.astype(jnp.float32)
    if not _foldable(qa):
        return jnp.einsum("...mc,...sc->...ms", q, dequantize(qa, jnp.float32))
    (*lead, s, c), n, cpb = qa.shape, qa.group, _BLOCK[qa.bits][0]
    sc, zero = qa.scale.astype(jnp.float32), qa.zero
    if qa.axis == -2:
        x = planar_codes(qa, c)
        qs = _to_planar(q, c, cpb)[..., :, None, :] * _to_planar(sc, c, cpb)[..., None, :, :]  # [..., M, S/n, C]
        out = jnp.einsum("...mgc,...gtc->...mgt", qs, x.reshape(*lead, s // n, n, c)).reshape(*lead, -1, s)
        if zero is not None:
            out = out + jnp.repeat(jnp.einsum("...mc,...gc->...mg", q, zero.astype(jnp.float32)), n, axis=-1)
        return out
    x = planar_codes(qa, n)
    qg = _to_planar(q, n, cpb).reshape(*q.shape[:-1], c // n, n)                       # [..., M, C/n, n]
    if c == n:  # one group per token: a plain product, scaled per token
        out = jnp.einsum("...mc,...sc->...ms", qg[..., 0, :], x) * jnp.swapaxes(sc, -1, -2)
    else:
        part = jnp.einsum("...mjc,...sjc->...msj", qg, x.reshape(*lead, s, c // n, n))  # [..., M, S, C/n]
        out = jnp.sum(part * sc[..., None, :, :], axis=-1)
    if zero is not None:
        out = out + jnp.einsum("...mj,...sj->...ms", qg.sum(-1), zero.astype(jnp.float32))
    return out


def mix(p: jax.Array, qa: QuantizedArray) -> jax.Array:
    """p @ dequantize(qa) without the dequantized array: float32 [..., M, C].

    p: float [..., M, S]; qa quantizes x [..., S, C]. Scales and zeros apply to p or to partial sums:
      per token (axis -1, groups of n channels; scale, zero [..., S, C/n]):
        sum_s p_s (s_sj c_s + z_sj) = (p * s_j) @ c + p @ z_j;
      per channel (axis -2, groups of n tokens; scale, zero [..., S/n, C]):
        sum_g s_g * (p_g @ c_g) + sum(p_g) z_g.
    The codes are unpacked in planar order (`planar_codes`) and the product put back in channel order.
    Outliers (or other axes) fall back to the dequantized product.
    """
    p = p.astype(jnp.float32)
    if not _foldable(qa):
        return jnp.einsum("...ms,...sc->...mc", p, dequantize(qa, jnp.float32))
    (*lead, s, c), n, cpb = qa.shape, qa.group, _BLOCK[qa.bits][0]
    sc, zero = qa.scale.astype(jnp.float32), qa.zero
    if qa.axis == -1:
        x = planar_codes(qa, n)
        if c == n:  # one group per token
            out = jnp.einsum("...ms,...sc->...mc", p * jnp.swapaxes(sc, -1, -2), x)
        else:
            ps = p[..., :, :, None] * sc[..., None, :, :]                              # [..., M, S, C/n]
            out = jnp.einsum("...msj,...sjc->...mjc", ps, x.reshape(*lead, s, c // n, n)).reshape(*p.shape[:-1], c)
        out = _from_planar(out, n, cpb)
        if zero is not None:
            out = out + jnp.repeat(jnp.einsum("...ms,...sj->...mj", p, zero.astype(jnp.float32)), n, axis=-1)
        return out
    pg = p.reshape(*p.shape[:-1], s // n, n)                                          # [..., M, S/n, n]
    part = jnp.einsum("...mgt,...gtc->...mgc", pg, planar_codes(qa, c).reshape(*lead, s // n, n, c))
    out = _from_planar(jnp.einsum("...mgc,...gc->...mc", part, _to_planar(sc, c, cpb)), c, cpb)
    if zero is not None:
        out = out + jnp.einsum("...mg,...gc->...mc", pg.sum(-1), zero.astype(jnp.float32))
    return out


# ------------------------------------------------------------------------------------ debugging


def check_finite(x, name: str) -> None:
    """Debug-mode check: raise ValueError naming `name` if `x` holds NaN or Inf.

    Host-side (it reads the values back), so call it outside jit, e.g. on K/V before they enter a
    quantized cache. Without it, non-finite inputs propagate into scales and dequantized values;
    finite inputs never produce NaN (scales are floored, see the module docstring).
    """
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"check_finite({name!r}) reads values on the host; call it outside jit")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return
    n_nan = int(jnp.sum(jnp.isnan(x)))
    n_inf = int(jnp.sum(jnp.isinf(x)))
    if n_nan or n_inf:
        first = np.argwhere(~np.asarray(jnp.isfinite(x)))[0]
        raise ValueError(f"{name} has non-finite values: {n_nan} NaN and {n_inf} Inf of {x.size} "
                         f"(shape {x.shape}, first at index {tuple(int(i) for i in first)})")
