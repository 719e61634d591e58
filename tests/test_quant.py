"""Tests for kvjax.quant: packing, group-wise uniform / int8 / fp8 quantization, nbytes, errors.

Legend: S tokens, D channels (the last axis), n elements per quantization group.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from kvjax import quant as q

EPS32 = float(np.finfo(np.float32).eps)
PROPS = settings(max_examples=40, deadline=None)

# A few small shapes [A, S, D] (D a multiple of 8 so every bit width packs): few distinct compiles.
SHAPES = [(1, 8, 8), (2, 4, 16), (3, 16, 8)]
DTYPES = [(jnp.float32, jnp.float32), (jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16)]


def _values(shape):
    """float32 arrays: moderate magnitudes, no subnormals (flushed to zero by XLA on CPU)."""
    elements = st.floats(-1e3, 1e3, width=32, allow_subnormal=False, allow_nan=False)
    return hnp.arrays(np.float32, shape, elements=elements)


@st.composite
def quant_case(draw):
    """(x, axis, group, scale dtype): x [A, S, D] in its input dtype, group dividing x.shape[axis]."""
    shape = draw(st.sampled_from(SHAPES))
    axis = draw(st.sampled_from([-1, -2]))
    group = draw(st.sampled_from([g for g in (2, 4, 8, 16) if shape[axis] % g == 0]))
    x_dtype, s_dtype = draw(st.sampled_from(DTYPES))
    if draw(st.booleans()):
        x = draw(_values(shape))
    else:  # smooth random data at a random magnitude: realistic K/V-like tensors
        seed, mag = draw(st.integers(0, 2**31)), draw(st.sampled_from([1e-3, 1.0, 30.0]))
        x = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * mag
    return jnp.asarray(x, x_dtype), axis, group, s_dtype


def _per_element(a, qa):
    """Broadcast per-group `scale`/`zero` [..., L/n, ...] back to x's shape [..., L, ...]."""
    return np.repeat(np.asarray(a, np.float32), qa.group, axis=qa.axis)


def _group_reduce(x, qa, fn):
    ax = qa.axis % x.ndim
    g = x.reshape(*x.shape[:ax], x.shape[ax] // qa.group, qa.group, *x.shape[ax + 1:])
    return fn(g, axis=ax + 1)


# ------------------------------------------------------------------------------ hand-computed


def test_pack_2bit_hand_example():
    # x = [0, 1, 2, 3] at 2 bits, one group: zero = min = 0, scale = (3 - 0) / (2^2 - 1) = 1,
    # codes = round((x - 0) / 1) = [0, 1, 2, 3]. First code in the low bits of the byte:
    # 0 | 1 << 2 | 2 << 4 | 3 << 6 = 0 + 4 + 32 + 192 = 228 = 0b11100100.
    qa = q.quantize(jnp.array([0.0, 1.0, 2.0, 3.0]), 2)
    assert qa.codes.tolist() == [228]
    assert qa.scale.tolist() == [1.0] and qa.zero.tolist() == [0.0]
    assert q.dequantize(qa).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_pack_4bit_and_3bit_hand_examples():
    # 4 bits, two codes per byte, low nibble first: [1, 15] -> 1 | 15 << 4 = 241 = 0xF1.
    assert q.pack(jnp.array([1, 15, 0, 7]), 4).tolist() == [241, 7 << 4]
    # 3 bits, 8 codes in a 24-bit little-endian word: codes 0..7 -> sum(i << 3i)
    # = 0 + 8 + 128 + 1536 + 16384 + 163840 + 1572864 + 14680064 = 16434824 = 0xFAC688,
    # bytes low first: 0x88 = 136, 0xC6 = 198, 0xFA = 250.
    packed = q.pack(jnp.arange(8), 3)
    assert packed.tolist() == [136, 198, 250]
    assert q.unpack(packed, 3, 8).tolist() == list(range(8))


def test_keys_per_channel_hand_example():
    # KIVI keys: x [S=4 tokens, D=4 channels], 2 bits, axis=-2 (groups of 4 tokens per channel).
    x = jnp.array([[0.0, 10.0, -1.0, 3.0],
                   [2.0, 10.0, 0.0, 2.0],
                   [4.0, 10.0, 0.5, 1.0],
                   [6.0, 10.0, 2.0, 0.0]])
    qa = q.quantize(x, 2, axis=-2, group=4)
    # ch0: zero 0, scale (6-0)/3 = 2, codes [0, 1, 2, 3].
    # ch1: constant 10: scale floored at finfo(float32).tiny, codes 0, dequantizes to exactly 10.
    # ch2: zero -1, scale (2+1)/3 = 1, codes round([0, 1, 1.5, 3]) = [0, 1, 2, 3] (half to even):
    #      0.5 dequantizes to 1.0, an error of exactly scale/2, the bound.
    # ch3: zero 0, scale 1, codes [3, 2, 1, 0].
    assert qa.scale.shape == (1, 4) and qa.zero.shape == (1, 4)
    np.testing.assert_array_equal(qa.scale, [[2.0, np.finfo(np.float32).tiny, 1.0, 1.0]])
    np.testing.assert_array_equal(qa.zero, [[0.0, 10.0, -1.0, 0.0]])
    # Codes are packed along the last axis (channels), per token: token 0 has codes [0, 0, 0, 3]
    # -> 3 << 6 = 192; token 1 [1, 0, 1, 2] -> 1 + 16 + 128 = 145.
    assert qa.codes[:, 0].tolist() == [192, 145, 98, 51]
    np.testing.assert_array_equal(q.dequantize(qa), [[0, 10, -1, 3], [2, 10, 0, 2],
                                                     [4, 10, 1, 1], [6, 10, 2, 0]])


def test_int8_and_fp8_hand_examples():
    # int8: absmax 127 -> scale 127/127 = 1; codes round([127, -3.4, 0.5, 0]) = [127, -3, 0, 0].
    qa = q.quantize_int8(jnp.array([127.0, -3.4, 0.5, 0.0]))
    assert qa.codes.dtype == jnp.int8 and qa.codes.tolist() == [127, -3, 0, 0]
    assert qa.scale.tolist() == [1.0] and qa.zero is None
    # fp8 e4m3: absmax 448 -> scale 1. 0.3 lies in [0.25, 0.5) where the e4m3 step is
    # 0.25 / 8 = 0.03125; 0.3 / 0.03125 = 9.6 -> 10 steps = 0.3125 (error 0.0125 <= 2^-4 * 0.3).
    qa = q.quantize_fp8(jnp.array([448.0, 1.0, -0.3, 0.0]))
    assert qa.codes.dtype == jnp.float8_e4m3fn
    assert q.dequantize(qa).tolist() == [448.0, 1.0, -0.3125, 0.0]


def test_nbytes_hand_example():
    # [B=2, K=4, S=32, D=64] values at 2 bits, groups of 32 channels, bf16 scales:
    # codes 2*4*32*64 / 4 = 4096 bytes; 2*4*32*(64/32) = 512 groups * (scale + zero) * 2 bytes = 2048.
    shape = (2, 4, 32, 64)
    assert q.quantized_nbytes(shape, bits=2, axis=-1, group=32, scale_dtype=jnp.bfloat16) == 6144
    # 3 bits: 3/8 byte per code -> 16384 * 3 / 8 = 6144 bytes of codes.
    assert q.quantized_nbytes(shape, bits=3, axis=-1, group=32, scale_dtype=jnp.bfloat16) == 8192
    # int8 per token per head: 16384 codes + 2*4*32 scales * 2 bytes = 16896.
    assert q.quantized_nbytes(shape, kind="int8", scale_dtype=jnp.bfloat16) == 16896


# --------------------------------------------------------------------------------- properties


@PROPS
@given(bits=st.sampled_from(q.PACK_BITS), shape=st.sampled_from([(8,), (3, 8), (2, 2, 16)]),
       seed=st.integers(0, 2**31))
def test_pack_unpack_identity(bits, shape, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=shape, dtype=np.uint8)
    packed = q.pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (*shape[:-1], q.packed_nbytes(shape[-1], bits))
    np.testing.assert_array_equal(q.unpack(packed, bits, shape[-1]), codes)


@PROPS
@given(case=quant_case(), bits=st.sampled_from(q.UNIFORM_BITS))
def test_uniform_error_at_most_half_step(case, bits):
    x, axis, group, sdt = case
    qa = q.quantize(x, bits, axis=axis, group=group, scale_dtype=sdt)
    assert qa.scale.dtype == sdt and qa.zero.dtype == sdt and qa.codes.dtype == jnp.uint8
    assert qa.shape == x.shape
    x32 = np.asarray(x, np.float32)
    deq = np.asarray(q.dequantize(qa, jnp.float32))
    s, z = _per_element(qa.scale, qa), _per_element(qa.zero, qa)
    levels = 2**bits - 1
    # Half a step of the *stored* scale (zero rounded down, scale up), plus float32 arithmetic.
    tol = s / 2 + 4 * EPS32 * (np.abs(x32) + np.abs(z) + levels * s)
    assert np.all(np.isfinite(deq))
    assert np.all(np.abs(x32 - deq) <= tol)
    # The scale is not degenerate: at most the rounded-up step over a range widened by one ulp.
    mn, mx = _group_reduce(x32, qa, np.min), _group_reduce(x32, qa, np.max)
    rel = 2 * float(jnp.finfo(sdt).eps)
    zero, scale = np.asarray(qa.zero, np.float32), np.asarray(qa.scale, np.float32)
    assert np.all(zero <= mn) and np.all(zero >= mn - rel * np.abs(mn))
    bound = ((mx - mn) + rel * np.abs(mn)) * (1 + rel) / levels * (1 + 4 * EPS32)
    assert np.all(scale <= np.maximum(bound, float(jnp.finfo(sdt).tiny)))


def _levels(bits, power=2.0):
    """A non-uniform codebook: 2^bits points in [0, 1], denser near 0.5 (like k-means on bell data)."""
    u = np.linspace(-1, 1, 2**bits)
    return tuple(float(v) for v in (np.sign(u) * np.abs(u) ** power + 1) / 2)


@PROPS
@given(case=quant_case(), bits=st.sampled_from(q.UNIFORM_BITS), n_out=st.integers(1, 2))
def test_outliers_exact_and_the_rest_within_half_their_step(case, bits, n_out):
    # KVQuant dense-and-sparse: the n elements farthest from each group's mean are stored exactly
    # and excluded from the group's range; every other element is within half the (finer) step.
    x, axis, group, sdt = case
    if n_out >= group:
        return
    qa = q.quantize(x, bits, axis=axis, group=group, scale_dtype=sdt, outliers=n_out)
    x32 = np.asarray(x, np.float32)
    deq = np.asarray(q.dequantize(qa, jnp.float32))
    ax = qa.axis % x.ndim
    grouped = lambda a: np.moveaxis(a.reshape(*a.shape[:ax], a.shape[ax] // group, group, *a.shape[ax + 1:]),
                                    ax + 1, -1)  # noqa: E731  [..., groups, ..., n]
    xg, dg = grouped(x32), grouped(deq)
    dev = np.abs(xg - xg.mean(-1, keepdims=True))
    idx = np.moveaxis(np.asarray(qa.outlier_idx, np.int64), ax + 1, -1)
    assert qa.outlier_idx.shape[ax + 1] == n_out and qa.outlier_val.dtype == sdt
    # the chosen elements are the farthest from the mean (up to float32 ties)
    kth = np.sort(dev, -1)[..., -n_out][..., None]
    assert np.all(np.take_along_axis(dev, idx, -1) >= kth - 1e-5 * (1 + kth))
    is_out = np.zeros(xg.shape, bool)
    np.put_along_axis(is_out, idx, True, -1)
    np.testing.assert_array_equal(dg[is_out], np.asarray(jnp.asarray(xg[is_out]).astype(sdt), np.float32))
    s = grouped(_per_element(qa.scale, qa))
    z = grouped(_per_element(qa.zero, qa))
    tol = s / 2 + 4 * EPS32 * (np.abs(xg) + np.abs(z) + (2**bits - 1) * s)
    assert np.all(np.abs(xg - dg)[~is_out] <= tol[~is_out])


@PROPS
@given(case=quant_case(), bits=st.sampled_from((2, 3, 4)), power=st.sampled_from([1.0, 2.0, 3.0]))
def test_nuq_maps_to_the_nearest_level(case, bits, power):
    # KVQuant "nuq": x ~ zero + levels[code] * scale with the nearest level; error at most half the
    # widest gap (or the distance to the ends of [0, 1]) times the scale.
    x, axis, group, sdt = case
    lv = _levels(bits, power)
    qa = q.quantize(x, bits, axis=axis, group=group, scale_dtype=sdt, levels=lv)
    assert qa.kind == "nuq" and qa.levels == lv
    x32 = np.asarray(x, np.float32)
    deq = np.asarray(q.dequantize(qa, jnp.float32))
    s, z = _per_element(qa.scale, qa), _per_element(qa.zero, qa)
    u = (x32 - z) / s
    best = np.min(np.abs(u[..., None] - np.asarray(lv)), axis=-1)  # distance to the nearest level
    assert np.all(np.abs(x32 - deq) <= (best + 1e-5) * s + 4 * EPS32 * (np.abs(x32) + np.abs(z) + s))
    widest = max(lv[0], 1 - lv[-1], *(np.diff(lv) / 2))
    assert np.all(np.abs(x32 - deq) <= widest * s * (1 + 1e-5) + 4 * EPS32 * (np.abs(x32) + np.abs(z) + s))


def test_quantize_rejects_bad_outliers_and_levels():
    x = jnp.ones((2, 8, 8))
    with pytest.raises(ValueError, match="outliers"):
        q.quantize(x, 4, group=4, outliers=4)
    with pytest.raises(ValueError, match="levels"):
        q.quantize(x, 2, levels=(0.0, 0.5, 0.4, 1.0))
    with pytest.raises(ValueError, match="levels"):
        q.quantize(x, 2, levels=(0.0, 1.0))


@PROPS
@given(shape=st.sampled_from(SHAPES), axis=st.sampled_from([-1, -2]), bits=st.sampled_from(q.UNIFORM_BITS),
       dtypes=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_constant_groups_exact_and_finite(shape, axis, bits, dtypes, seed):
    # Every group constant (zeros included): scale = tiny, codes 0, dequantized exactly, never NaN.
    # (Exact because the constants are representable in the scale dtype; otherwise zero is the value
    # rounded down and the error is within half a step like any group.)
    x_dtype, sdt = dtypes
    group = shape[axis] // 2 if shape[axis] % 2 == 0 else shape[axis]
    n_groups = shape[axis] // group
    rng = np.random.default_rng(seed)
    vals_shape = list(shape)
    vals_shape[axis] = n_groups
    vals = rng.choice([0.0, -0.0, 1.0, -3.5, 2.0**-10, 250.0], size=vals_shape).astype(np.float32)
    x = jnp.asarray(np.repeat(vals, group, axis=axis), x_dtype)
    qa = q.quantize(x, bits, axis=axis, group=group, scale_dtype=sdt)
    assert np.all(q.unpack(qa.codes, bits, shape[-1]) == 0)
    assert np.all(np.asarray(qa.scale, np.float32) == float(jnp.finfo(sdt).tiny))
    np.testing.assert_array_equal(q.dequantize(qa, jnp.float32), np.asarray(x, np.float32))


def test_tiny_ranges_finite():
    # A range of one float32 ulp: finite, within half a (bf16: rounded-up) step.
    for sdt in (jnp.float32, jnp.bfloat16):
        x = jnp.array([1.0, np.nextafter(np.float32(1), np.float32(2)), 1.0, 1.0] * 2, jnp.float32)
        qa = q.quantize(x, 4, scale_dtype=sdt)
        deq = q.dequantize(qa, jnp.float32)
        assert np.all(np.isfinite(deq)) and np.all(np.abs(deq - x) <= float(qa.scale[0]) / 2 + 2 * EPS32)


@PROPS
@given(case=quant_case())
def test_int8_error_at_most_half_step(case):
    x, axis, group, sdt = case
    qa = q.quantize_int8(x, axis=axis, group=group, scale_dtype=sdt)
    assert qa.codes.dtype == jnp.int8 and qa.zero is None and qa.scale.dtype == sdt
    x32 = np.asarray(x, np.float32)
    s = _per_element(qa.scale, qa)
    deq = np.asarray(q.dequantize(qa, jnp.float32))
    assert np.all(np.abs(x32 - deq) <= s / 2 + 4 * EPS32 * (np.abs(x32) + 127 * s))
    assert np.all(np.abs(np.asarray(qa.codes, np.int32)) <= 127)


@PROPS
@given(case=quant_case())
def test_fp8_error_bound(case):
    # e4m3: 3 mantissa bits. For y = x / scale with 2^e <= |y| < 2^(e+1), e >= -6, the step is
    # 2^(e-3), so rounding is off by <= 2^(e-4) <= 2^-4 |y|. Below 2^-6 (subnormals) the step is
    # 2^-9, so the error is <= 2^-10. Times the scale: |x - deq| <= max(2^-4 |x|, 2^-10 scale),
    # plus float32 rounding of x / scale and of codes * scale (a few eps of |x|).
    x, axis, group, sdt = case
    qa = q.quantize_fp8(x, axis=axis, group=group, scale_dtype=sdt)
    assert qa.codes.dtype == jnp.float8_e4m3fn and qa.zero is None
    x32 = np.asarray(x, np.float32)
    s = _per_element(qa.scale, qa)
    deq = np.asarray(q.dequantize(qa, jnp.float32))
    bound = np.maximum(2.0**-4 * np.abs(x32), 2.0**-10 * s) * (1 + 4 * EPS32) + 4 * EPS32 * np.abs(x32)
    assert np.all(np.isfinite(deq))
    assert np.all(np.abs(x32 - deq) <= bound)
    # absmax maps to at most 448 (no overflow to NaN) and the scale is the rounded-up absmax / 448.
    assert np.all(np.abs(np.asarray(qa.codes, np.float32)) <= q.FP8_MAX)


@PROPS
@given(case=quant_case(), kind=st.sampled_from(q.KINDS), bits=st.sampled_from(q.UNIFORM_BITS),
       outliers=st.integers(0, 1))
def test_nbytes_matches_formula(case, kind, bits, outliers):
    x, axis, group, sdt = case
    outliers = outliers if kind in ("uniform", "nuq") else 0
    fn = {"uniform": lambda x, **kw: q.quantize(x, bits, outliers=outliers, **kw),
          "nuq": lambda x, **kw: q.quantize(x, bits, outliers=outliers, levels=_levels(bits), **kw),
          "int8": q.quantize_int8, "fp8": q.quantize_fp8}[kind]
    kwargs = dict(axis=axis, group=group, scale_dtype=sdt)
    qa = fn(x, **kwargs)
    expected = q.quantized_nbytes(x.shape, kind=kind, bits=bits, outliers=outliers, **kwargs)
    leaves = sum(leaf.nbytes for leaf in jax.tree.leaves(qa))
    abstract = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(jax.eval_shape(
        lambda x: fn(x, **kwargs), x)))
    assert qa.nbytes == leaves == abstract == expected
    n_bits = bits if kind in ("uniform", "nuq") else 8
    assert qa.bits_per_element == 8 * expected / math.prod(x.shape)
    assert qa.bits_per_element > n_bits  # scales are never free


# ------------------------------------------------------------------------------- pytree / jit


def test_pytree_jit_and_vmap():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 16)), jnp.float32)
    qa = q.quantize(x, 4, axis=-2, group=4)
    leaves, treedef = jax.tree.flatten(qa)
    assert len(leaves) == 3 and isinstance(jax.tree.unflatten(treedef, leaves), q.QuantizedArray)
    # Statics live in the treedef: through jit, and vmapped over the leading axis (negative axis).
    same = jax.jit(lambda a: a)(qa)
    assert (same.kind, same.bits, same.axis, same.group) == ("uniform", 4, -2, 4)
    per_row = jax.vmap(lambda a: q.dequantize(a))(qa)
    np.testing.assert_array_equal(per_row, q.dequantize(qa))
    # int8/fp8: zero is None, an empty subtree.
    assert len(jax.tree.leaves(q.quantize_fp8(x))) == 2


def test_nan_inputs_propagate_not_hidden():
    # Normal mode does not check: a NaN makes its group's scale NaN, so it shows up when dequantized.
    x = jnp.array([[1.0, np.nan, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    for qa in (q.quantize(x, 4), q.quantize_int8(x), q.quantize_fp8(x)):
        deq = q.dequantize(qa)
        assert np.isnan(deq[0]).any() and np.all(np.isfinite(deq[1]))


# ---------------------------------------------------------------------------------- bad input

X = jnp.zeros((2, 8, 16), jnp.float32)

BAD = [
    (lambda: q.quantize(X, 1), "bits must be one of"),
    (lambda: q.quantize(X, 5), "bits must be one of"),
    (lambda: q.quantize(X, 16), "bits must be one of"),
    (lambda: q.quantize(X, 4.0), "bits must be one of"),
    (lambda: q.quantize(X, 4, group=0), "group must be a positive int"),
    (lambda: q.quantize(X, 4, group=-4), "group must be a positive int"),
    (lambda: q.quantize(X, 4, group=3), "does not divide the length 16"),
    (lambda: q.quantize(X, 4, axis=-2, group=16), "does not divide the length 8"),
    (lambda: q.quantize(X, 4, axis=3), "axis 3 out of range"),
    (lambda: q.quantize(jnp.zeros((4, 4)), 3), "multiple of 8"),
    (lambda: q.quantize(jnp.zeros((4, 6)), 2, group=2), "multiple of 4"),
    (lambda: q.quantize(jnp.zeros((4, 8), jnp.int32), 4), "floating-point"),
    (lambda: q.quantize(X, 4, scale_dtype=jnp.int8), "scale_dtype"),
    (lambda: q.quantize_int8(X, group=5), "does not divide"),
    (lambda: q.quantize_fp8(X, group=0), "positive int"),
    (lambda: q.pack(jnp.zeros((3, 5), jnp.uint8), 4), "multiple of 2"),
    (lambda: q.pack(jnp.zeros((8,), jnp.uint8), 6), "bits must be one of"),
    (lambda: q.unpack(jnp.zeros((4,), jnp.uint8), 4, 6), "take 3 bytes"),
    (lambda: q.unpack(jnp.zeros((4,), jnp.uint8), 2, 6), "multiple of 4"),
    (lambda: q.quantized_nbytes((8, 16), kind="int4"), "kind must be one of"),
    (lambda: q.check_bits(3, (2, 4), "kivi"), r"kivi: bits must be one of \(2, 4\), got 3"),
]


@pytest.mark.parametrize("call,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------ debug mode


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_check_finite_names_tensor(bad, dtype):
    x = np.ones((2, 3, 4), np.float32)
    x[1, 2, 0] = bad
    with pytest.raises(ValueError, match=r"layer 3 keys has non-finite values.*index \(1, 2, 0\)"):
        q.check_finite(jnp.asarray(x, dtype), "layer 3 keys")


def test_check_finite_passes_and_refuses_tracers():
    q.check_finite(jnp.ones((2, 4)), "values")
    q.check_finite(jnp.arange(4), "positions")  # integers are always finite
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(lambda x: q.check_finite(x, "keys"))(jnp.ones(3))
