"""Quantized attention without the dequantized store (issue 21): the scale-folded products
`quant.scores` / `quant.mix`, the exact float8 decode, KVQuant's per-block RoPE and the ragged
region reads, each against the plain (dequantize, then multiply) form."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import quant, quantizers
from kvjax.states import RaggedKV
from kvjax.states.base import EMPTY_POS
from kvjax.models.rope import apply_rope

K = jax.random.normal(jax.random.key(0), (2, 3, 64, 16), jnp.float32) * 3
Q = jax.random.normal(jax.random.key(1), (2, 3, 4, 16), jnp.float32)
P = jax.random.uniform(jax.random.key(2), (2, 3, 4, 64), jnp.float32)

LAYOUTS = {
    "kivi keys (per channel, 2-bit)": lambda x: quant.quantize(x, 2, axis=-2, group=32),
    "per channel, 3-bit": lambda x: quant.quantize(x, 3, axis=-2, group=16),
    "kivi values (per token, groups of 8 channels, 4-bit)": lambda x: quant.quantize(x, 4, axis=-1, group=8),
    "per token, one group (4-bit)": lambda x: quant.quantize(x, 4, axis=-1),
    "per token, 3-bit": lambda x: quant.quantize(x, 3, axis=-1, group=8),
    "int8": quant.quantize_int8,
    "fp8": quant.quantize_fp8,
    "nuq": lambda x: quant.quantize(x, 2, axis=-2, group=32, levels=(0.0, 0.3, 0.6, 1.0)),
    "outliers (fallback)": lambda x: quant.quantize(x, 3, axis=-1, outliers=1),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_folded_products_equal_the_dequantized_ones(name):
    qa = LAYOUTS[name](K)
    x = np.asarray(quant.dequantize(qa, jnp.float32), np.float64)
    want_s = np.einsum("bkmc,bksc->bkms", np.asarray(Q, np.float64), x)
    want_m = np.einsum("bkms,bksc->bkmc", np.asarray(P, np.float64), x)
    np.testing.assert_allclose(quant.scores(Q, qa), want_s, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(quant.mix(P, qa), want_m, rtol=1e-5, atol=1e-4)


def test_folded_scores_by_hand():
    """Two tokens, two channels (each stored twice: 2-bit codes pack 4 to a byte), one per-channel
    group: codes [[0, 3], [3, 1]], scales (1, 2), zeros (-1, 0.5): keys [[-1, 6.5], [2, 2.5]];
    q = (1, 2) scores -1 + 13 = 12 and 2 + 5 = 7; p = (0.25, 0.75) mixes to (1.25, 3.5)."""
    qa = quant.QuantizedArray(codes=quant.pack(jnp.array([[0, 3], [3, 1]], jnp.uint8).repeat(2, -1), 2),
                              scale=jnp.array([[1.0, 1.0, 2.0, 2.0]]), zero=jnp.array([[-1.0, -1.0, 0.5, 0.5]]),
                              kind="uniform", bits=2, axis=-2, group=2)
    np.testing.assert_allclose(quant.dequantize(qa, jnp.float32), [[-1, -1, 6.5, 6.5], [2, 2, 2.5, 2.5]])
    q = jnp.array([[0.5, 0.5, 1.0, 1.0]])
    np.testing.assert_allclose(quant.scores(q, qa), [[12.0, 7.0]])
    np.testing.assert_allclose(quant.mix(jnp.array([[0.25, 0.75]]), qa), [[1.25, 1.25, 3.5, 3.5]])


def test_fp8_decode_is_the_cast_for_every_code():
    codes = jax.lax.bitcast_convert_type(jnp.arange(256, dtype=jnp.uint8), jnp.float8_e4m3fn)
    want = np.asarray(codes.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(quant.codes_f32(quant.QuantizedArray(
        codes=codes, scale=jnp.ones(()), zero=None, kind="fp8"))), want)
    raw = quant.as_bytes(quant.QuantizedArray(codes=codes, scale=jnp.ones(()), zero=None, kind="fp8"))
    assert raw.codes.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(quant.codes_f32(raw)), want)


class _Cfg:
    head_dim, n_layers = 16, 1

    @staticmethod
    def rope_for(layer):
        return 10000.0, None


@pytest.mark.parametrize("consecutive", [True, False])
def test_kvquant_block_rope_equals_the_per_key_rope(consecutive):
    """A block of consecutive positions (the table form) and one refilled out of order (per key)."""
    q = quantizers.get("kvquant-4").for_model(_Cfg).for_layer(0)
    pos = jnp.broadcast_to(jnp.arange(500, 564, dtype=jnp.int32), K.shape[:3])
    if not consecutive:
        pos = pos.at[:, :, 7].set(3)
    pos = pos.at[1, :, 60:].set(EMPTY_POS)  # unused slots do not break a run
    want = apply_rope(K, jnp.where(pos == EMPTY_POS, 0, pos), np.asarray(q.inv_freq, np.float32))
    got = q.rotate_block(K, pos)
    used = np.asarray(pos != EMPTY_POS)
    np.testing.assert_allclose(np.asarray(got)[used], np.asarray(want)[used], rtol=1e-4, atol=2e-4)


def test_ragged_region_reads_only_each_heads_region():
    """Regions of 5, 9 and 2 tokens in a pool of 16, read 4 slots at a time (decode blocks are not
    widened for pools): attention over each head's own tokens, computed densely."""
    lengths = np.array([5, 9, 2])
    start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    d = 16
    k = jax.random.normal(jax.random.key(3), (1, 16, d))
    v = jax.random.normal(jax.random.key(4), (1, 16, d))
    pos = np.zeros((1, 16), np.int32)
    for h in range(3):
        pos[0, start[h]:start[h] + lengths[h]] = np.arange(lengths[h])
    st = RaggedKV(k=k, v=v, pos=jnp.asarray(pos), start=jnp.asarray(start[None], jnp.int32),
                  end=jnp.asarray((start + lengths)[None], jnp.int32), length=jnp.asarray(lengths[None], jnp.int32))
    q = jax.random.normal(jax.random.key(5), (1, 1, 6, d))
    out = np.asarray(st.attend_jnp(q, jnp.full((1, 1), 100, jnp.int32), block=4))
    for h in range(3):
        kk, vv = np.asarray(k[0, start[h]:start[h] + lengths[h]]), np.asarray(v[0, start[h]:start[h] + lengths[h]])
        for g in range(2):
            s = kk @ np.asarray(q[0, 0, 2 * h + g]) / np.sqrt(d)
            w = np.exp(s - s.max())
            np.testing.assert_allclose(out[0, 0, 2 * h + g], (w / w.sum()) @ vv, rtol=1e-5, atol=1e-5)
