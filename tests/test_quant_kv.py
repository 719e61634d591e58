"""QuantKV: the quantized layer state (KIVI streaming residual), its use through LM, and bad input.

Tiny states check the bookkeeping (every token stored exactly once, store/residual split, bytes);
the real model checks that int8 keeps the golden greedy continuations and that eviction composes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import calibrate, quant, quantizers
from kvjax.states import EMPTY_POS, DenseKV, tree_nbytes
from kvjax.states import QuantKV, memory_report
from kvjax.testing import tiny_lm

GOLDEN = Path(__file__).parent / "golden" / "smollm2-135m"
B, K, D = 2, 2, 8


def dense_state(lengths, capacity, seed=0) -> DenseKV:
    st = DenseKV.init(B, K, capacity, D, jnp.float32)
    k, v = jax.random.normal(jax.random.key(seed), (2, B, K, capacity, D))
    pos = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (B, capacity))
    return st.append(k, v, pos, jnp.asarray(lengths, jnp.int32))


@pytest.mark.parametrize("spec", [quantizers.KIVI(bits=4, group=8, residual=16),
                                  quantizers.KIVI(bits=2, group=4, residual=8),
                                  quantizers.PerToken(bits=4, group=8, residual=16),
                                  quantizers.Int8(residual=4), quantizers.FP8(residual=4)])
def test_from_dense_splits_store_and_residual(spec):
    lengths = [37, 20]
    st = dense_state(lengths, 48)
    q = QuantKV.from_dense(st, spec, tokens=48)
    r = spec.residual
    np.testing.assert_array_equal(q.n_q, [(n // r) * r for n in lengths])
    np.testing.assert_array_equal(q.n_r, [n % r for n in lengths])
    held = np.asarray(q.positions())
    for b, n in enumerate(lengths):  # every prompt position held exactly once
        np.testing.assert_array_equal(held[b, :, :n], np.broadcast_to(np.arange(n), (K, n)))
        assert np.all(held[b, :, n:] == EMPTY_POS)
    # the residual is exact; the store is within half a step of the original keys
    for b, n in enumerate(lengths):
        nq = int(q.n_q[b])
        np.testing.assert_array_equal(q.k_res[b, :, : n - nq], st.k[b, :, nq:n])
        deq = np.asarray(quant.dequantize(q.kq, jnp.float32))[b, :, :nq]
        step = np.abs(np.asarray(st.k[b, :, :nq])).max() * (2 if isinstance(spec, quantizers.Int8) else 1)
        assert np.abs(deq - np.asarray(st.k[b, :, :nq])).max() <= step / (2 ** getattr(spec, "bits", 4) - 1) + 1e-6 \
            or isinstance(spec, quantizers.FP8)


def bound(spec):
    """A quantizer bound to the tiny model's RoPE (KVQuant rotates keys back before quantizing)."""
    return spec.for_model(tiny_lm(seed=0).cfg)


@pytest.mark.parametrize("spec", [quantizers.KIVI(bits=4, group=4, residual=8),
                                  quantizers.KVQuant(bits=4, group=4, residual=8, sink=2)])
def test_streaming_append_flushes_each_token_exactly_once(spec):
    spec = bound(spec)
    q = QuantKV.from_dense(dense_state([5, 11], 16), spec, tokens=64)
    keys = jax.random.normal(jax.random.key(1), (30, B, K, 1, D))
    step = jax.jit(lambda st, k, p, nv: st.append(k, k * 2, p, nv))
    n_valid = np.ones(B, np.int32)
    for i in range(30):
        pos = jnp.asarray([[5 + i], [11 + i]], jnp.int32)
        live = jnp.asarray(n_valid if i < 25 else [1, 0], jnp.int32)  # row 1 stops after 25 tokens
        q = step(q, keys[i], pos, live)
    totals = [5 + 30, 11 + 25]
    np.testing.assert_array_equal(q.length, totals)
    assert all(int(n) % spec.residual == 0 for n in q.n_q)
    held = np.asarray(q.positions())
    for b, n in enumerate(totals):
        np.testing.assert_array_equal(held[b, 0, :n], np.arange(n))
    # a token flushed into the store dequantizes close to what was appended (row 0, position 5 + 3)
    slot = int(np.nonzero(np.asarray(q.pos[0, 0]) == 8)[0][0])
    deq = np.asarray(spec.dequantize_keys(q.kq, q.pos, jnp.float32))[0, :, slot]
    assert np.abs(deq - np.asarray(keys[3][0, :, 0])).max() < 0.5
    np.testing.assert_array_equal(q.pos_sink[:, 0], [[0, 1]] * B if spec.sink else np.zeros((B, 0)))


def test_kvquant_quantizes_keys_before_rope():
    # Keys whose pre-RoPE channels are constant along tokens: every per-channel group is constant
    # before RoPE, so KVQuant stores them exactly (up to float32 rotation), while per-channel
    # quantization of the rotated keys (KIVI) sees them spin with position and loses precision.
    spec = bound(quantizers.KVQuant(bits=2, group=8, residual=16, sink=0, outliers=0.0))
    n = 32
    pre = jnp.broadcast_to(jax.random.normal(jax.random.key(3), (B, K, 1, D)), (B, K, n, D))
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, K, n))
    k = spec.rotate(pre, pos, 1)
    kq = spec.quantize_keys(k, pos)
    np.testing.assert_allclose(spec.dequantize_keys(kq, pos, jnp.float32), k, atol=1e-5)
    kivi = quantizers.KIVI(bits=2, group=8, residual=16)
    assert float(jnp.abs(quant.dequantize(kivi.quantize_keys(k, pos), jnp.float32) - k).max()) > 0.05


def test_kvquant_sink_and_outliers_are_exact():
    spec = bound(quantizers.KVQuant(bits=2, group=8, residual=8, sink=3, outliers=0.1))
    st = dense_state([27, 13], 32)
    spiky = st.k.at[0, 1, 10, 2].set(50.0)  # one huge key element (row 0, head 1, slot 10, channel 2)
    st = dataclasses.replace(st, k=spiky, v=st.v.at[1, 0, 5, 7].set(-40.0))
    q = QuantKV.from_dense(st, spec, tokens=32)
    np.testing.assert_array_equal(q.k_sink, st.k[:, :, :3])  # the first 3 tokens stay exact
    np.testing.assert_array_equal(q.pos_sink[:, 0], [[0, 1, 2]] * B)
    np.testing.assert_array_equal(q.length, [27, 13])
    keys = spec.dequantize_keys(q.kq, q.pos, jnp.float32)  # store slot s holds token s + 3
    values = spec.dequantize_values(q.vq, jnp.float32)
    assert abs(float(keys[0, 1, 7, 2]) - 50.0) < 1e-4
    assert float(values[1, 0, 2, 7]) == -40.0
    # with the spikes stored aside, the other elements keep a fine step: small errors everywhere
    n_q = [int(x) for x in q.n_q]
    for b in range(B):
        assert float(jnp.abs(keys[b, :, :n_q[b]] - st.k[b, :, 3:3 + n_q[b]]).max()) < 1.5
    rep = memory_report(kvjax.KVCache(layers=(q,), next_pos=jnp.zeros(B, jnp.int32)))
    assert rep["outliers"] == tree_nbytes((q.kq.outlier_val, q.kq.outlier_idx, q.vq.outlier_val, q.vq.outlier_idx)) > 0
    assert rep["sink"] == 2 * B * K * 3 * D * 4


def test_calibrated_codebook_fits_better_than_uniform_and_generates():
    lm = tiny_lm(seed=0)
    ids = [int(t) for t in np.random.default_rng(1).integers(3, 200, 70)]
    q = kvjax.calibrate_kvquant(lm, ids, bits=2, group=8, residual=16)
    assert len(q.codebooks) == lm.cfg.n_layers
    # k-means from the uniform grid: the calibration values' squared error is at most the grid's
    u = np.random.default_rng(0).beta(2, 2, 5000)
    lv = np.asarray(calibrate.kmeans_1d(u, 4))
    err = lambda c: np.mean(np.min((u[:, None] - c) ** 2, axis=1))  # noqa: E731
    assert err(lv) < err(np.linspace(0, 1, 4)) and np.all(np.diff(lv) > 0)
    out = lm.generate([ids], max_new_tokens=20, stop_at_eos=False, quant=q)
    assert len(out.ids[0]) == 20 and out.cache.layers[1].kq.kind == "nuq"
    assert out.cache.layers[1].kq.levels == q.codebooks[1][0]
    with pytest.raises(ValueError, match="calibration tokens"):
        kvjax.calibrate_kvquant(lm, ids[:5], bits=2, group=8, residual=16)


def test_nbytes_is_codes_scales_zeros_residual_and_positions():
    spec = quantizers.KIVI(bits=2, group=4, residual=8)
    q = QuantKV.from_dense(dense_state([10, 6], 16), spec, tokens=24)
    shape = (B, K, 24, D)
    expected = (quant.quantized_nbytes(shape, bits=2, axis=-2, group=4, scale_dtype=jnp.float32)
                + quant.quantized_nbytes(shape, bits=2, axis=-1, group=4, scale_dtype=jnp.float32)
                + 2 * B * K * 8 * D * 4  # residual K and V, float32
                + B * K * (24 + 8) * 4 + 2 * B * 4)  # positions, n_q, n_r
    assert q.nbytes() == expected
    cache = kvjax.KVCache(layers=(q,), next_pos=jnp.zeros(B, jnp.int32))
    assert kvjax.cache_nbytes(cache) == expected + B * 4  # + next_pos


def test_kvquant_nbytes_is_codes_scales_zeros_outliers_residual_sink_and_positions():
    spec = bound(quantizers.KVQuant(bits=3, group=8, residual=16, sink=2, outliers=0.1))
    q = QuantKV.from_dense(dense_state([30, 12], 40), spec, tokens=40)
    shape = (B, K, 48, D)  # store: 40 - 2 sink tokens rounded up to the residual (16)
    expected = (quant.quantized_nbytes(shape, bits=3, axis=-2, group=8, scale_dtype=jnp.float32, outliers=1)
                + quant.quantized_nbytes(shape, bits=3, axis=-1, group=D, scale_dtype=jnp.float32, outliers=1)
                + 2 * B * K * 16 * D * 4 + 2 * B * K * 2 * D * 4  # residual and sink K and V, float32
                + B * K * (48 + 16 + 2) * 4 + 2 * B * 4)  # positions, n_q, n_r
    assert q.nbytes() == expected


def test_tiny_generate_with_quantized_cache_runs_and_decodes_through_flushes():
    lm = tiny_lm(seed=0)
    ids = [[int(t) for t in np.random.default_rng(0).integers(3, 200, n)] for n in (21, 9)]
    out = lm.generate(ids, max_new_tokens=20, stop_at_eos=False, quant=quantizers.KIVI(bits=4, group=4, residual=8))
    full = lm.generate(ids, max_new_tokens=20, stop_at_eos=False)
    assert [len(r) for r in out.ids] == [20, 20]
    assert all(isinstance(layer, QuantKV) for layer in out.cache.layers)
    np.testing.assert_array_equal(out.cache.layers[0].length, [21 + 20, 9 + 20])
    assert out.ids[0][0] == full.ids[0][0]  # the first token comes from the full-precision prefill


@pytest.mark.parametrize("name", ["short", "chat", "long2000"])
def test_int8_keeps_golden_greedy_continuation(smollm2, name):
    # long500 is left out on purpose: its second greedy step is a near tie (logit gap 0.007) that
    # int8, fp8 and kivi all flip, as any perturbation of that size would
    golden = np.load(GOLDEN / f"{name}.npz")
    out = smollm2.generate(golden["ids"], max_new_tokens=16, stop_at_eos=False, quant="int8")
    assert out.ids == golden["greedy16"].tolist()


def test_eviction_then_quantization_composes(smollm2):
    ids = np.load(GOLDEN / "long500.npz")["ids"].tolist()
    evicted = smollm2.prefill(ids, method="snapkv", ratio=0.5)
    both = smollm2.prefill(ids, method="snapkv", ratio=0.5, quant="kivi-2")
    for a, b in zip(kvjax.kept_positions(evicted), kvjax.kept_positions(both)):
        np.testing.assert_array_equal(a, b)
    rep = memory_report(both)
    assert rep["kv"] == 0 and rep["codes"] > 0 and rep["total"] == kvjax.cache_nbytes(both)
    assert rep["total"] < 0.7 * kvjax.cache_nbytes(evicted)  # 250 kept: the 128-token float residual weighs in


@pytest.mark.parametrize("kwargs, message", [
    (dict(quant="kivi-3"), "bits must be one of"),
    (dict(quant="nope-2"), "unknown quantization"),
    (dict(quant="int8-4"), "fixed width"),
    (dict(quant=quantizers.PerToken(group=3)), "does not divide the head dim"),
    (dict(quant="kvquant-8"), "bits must be one of"),
    (dict(quant=quantizers.KVQuant(bits=2, codebooks=(((0, .3, .6, 1),) * 2,) * 9)), "codebooks for 9 layers"),
])
def test_bad_quant_input(kwargs, message):
    lm = tiny_lm(seed=0)
    with pytest.raises(ValueError, match=message):
        lm.generate(list(range(3, 20)), max_new_tokens=2, **kwargs)


def test_quantizer_argument_checks():
    with pytest.raises(ValueError, match="multiple of group"):
        quantizers.KIVI(group=32, residual=48)
    with pytest.raises(ValueError, match="positive"):
        quantizers.Int8(residual=0)
    with pytest.raises(ValueError, match="fraction"):
        quantizers.KVQuant(outliers=0.7)
    with pytest.raises(ValueError, match="strictly ascending"):
        quantizers.KVQuant(bits=2, codebooks=(((0, .5, .4, 1), (0, .3, .6, 1)),))
    with pytest.raises(ValueError, match="for_model"):
        quantizers.KVQuant().quantize_keys(jnp.zeros((1, 1, 128, 8)), jnp.zeros((1, 1, 128), jnp.int32))


def test_check_finite_debug_mode_names_the_layer():
    lm = tiny_lm(seed=0)
    bad = jax.tree_util.tree_map(lambda x: x, lm.params)
    bad["layers_1"]["attn"]["k_proj"]["kernel"] = bad["layers_1"]["attn"]["k_proj"]["kernel"].at[0, 0].set(jnp.nan)
    broken = kvjax.LM(lm.cfg, bad, lm.tokenizer)
    ids = list(range(3, 40))
    with pytest.raises(ValueError, match="layer 1 keys has non-finite values"):
        broken.prefill(ids, quant="int8", check_finite=True)
    assert np.isfinite(np.asarray(lm.prefill(ids, quant="int8", check_finite=True).layers[0].k_res)).all()
