"""`kvjax.native`: the fused CPU decode attention over a quantized store against the jnp path it replaces.

Each case builds a quantized layer state from random keys and values and attends with the kernel and
with `native.disabled()` (the jnp reference: `QuantStore.attention_parts`' blocks, scales folded):
batch 2 with rows of different lengths and queries that see only part of the store, inside jit, and
over decode steps in a `fori_loop` (appends and residual flushes between attends).

Legend: B batch, K KV heads, H query heads, D head dim, n tokens per row.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import native, quantizers
from kvjax.states import DenseKV, RaggedKV

B, K, H, D = 2, 2, 6, 64
N = (300, 200)  # tokens of each row
SPECS = ["int8", "fp8", "kivi(bits=2, residual=32)", "kivi(bits=4, residual=32)", "kivi(bits=4, group=64, residual=64)",
         "per_token(bits=4, residual=32)", "per_token(bits=2, group=32, residual=32)", "per_token(bits=8, residual=32)"]

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler: the kernel is not built")


def _kv(seed, n=max(N)):
    k = jax.random.normal(jax.random.key(seed), (B, K, n, D), jnp.float32) * 2.0
    v = jax.random.normal(jax.random.key(seed + 1), (B, K, n, D), jnp.float32)
    return k, v, jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))


def _state(spec, ragged=False):
    k, v, pos = _kv(0)
    q = quantizers.get(spec)
    if ragged:
        st = RaggedKV.init(B, K, K * (max(N) + 64), D, jnp.float32).append(k, v, pos, jnp.array(N))
        return st.quantize(q, max(N), room=64)
    return DenseKV.init(B, K, max(N) + 64, D, jnp.float32).append(k, v, pos, jnp.array(N)).quantize(q, max(N) + 64)


def _both(fn, *args):
    """fn jitted with the kernel (which must be in the program), and with the jnp path (its own trace)."""
    lowered = jax.jit(fn).lower(*args)
    assert native.TARGET in lowered.as_text()  # the kernel is what runs
    out = lowered.compile()(*args)
    with native.disabled():
        ref = jax.jit(fn).lower(*args).compile()(*args)
    return out, ref


@pytest.mark.parametrize("spec, t", [(s, 1) for s in SPECS] + [(SPECS[3], 3)])
def test_attend_matches_jnp(spec, t):
    st = _state(spec)
    q = jax.random.normal(jax.random.key(7), (B, t, H, D), jnp.float32)
    q_pos = jnp.array([[N[0] - 1], [N[1] - 90]]) + jnp.arange(t) - t + 1  # row 1 sees part of its store
    out, ref = _both(lambda s, q, p: s.attend_jnp(q, p, block=128, return_lse=True), st, q, q_pos)
    np.testing.assert_allclose(out[0], ref[0], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(out[1], ref[1], rtol=2e-5, atol=2e-5)


def test_ragged_pool_matches_jnp():
    st = _state("kivi(bits=2, residual=32)", ragged=True)
    q = jax.random.normal(jax.random.key(3), (B, 1, H, D), jnp.float32)
    out, ref = _both(lambda s, q, p: s.attend_jnp(q, p, block=64), st, q, jnp.array([[N[0]], [N[1]]]))
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("spec", ["kivi(bits=2, residual=32)"])
def test_decode_loop_matches_jnp(spec):
    """Decode steps in a `fori_loop`: append a token, attend; residuals flush into the store in between."""
    st = _state(spec)
    k, v, _ = _kv(5, n=40)

    def decode(st, k, v):
        def step(i, carry):
            st, out = carry
            pos = jnp.array(N)[:, None] + i
            ki, vi = (jax.lax.dynamic_slice_in_dim(x, i, 1, axis=2) for x in (k, v))
            st = st.append(ki, vi, pos, jnp.ones((B,), jnp.int32))
            q = jnp.moveaxis(jnp.repeat(ki, H // K, axis=1), 1, 2)  # [B, 1, H, D]
            return st, out + st.attend_jnp(q, pos, block=128)
        return jax.lax.fori_loop(0, k.shape[2], step, (st, jnp.zeros((B, 1, H, D))))[1]

    out, ref = _both(decode, st, k, v)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


class _Cfg:  # what `KVQuant.for_model` reads of a model config
    head_dim, n_layers = D, 1

    @staticmethod
    def rope_for(layer):
        return 10000.0, None


def test_kvquant_stays_on_jnp():
    """KVQuant rotates its pre-RoPE keys after dequantization and keeps outliers: its store part has no
    kernel, and attention is the jnp path's."""
    q = quantizers.get("kvquant-4").for_model(_Cfg).for_layer(0)
    k, v, pos = _kv(0)
    st = DenseKV.init(B, K, max(N) + 64, D, jnp.float32).append(k, v, pos, jnp.array(N)).quantize(q, max(N) + 64)
    assert not q.plain_codes and all(quantizers.get(s).plain_codes for s in SPECS)
    assert all(len(part) == 2 for part in st.store.attention_parts(128))
    qs = jax.random.normal(jax.random.key(1), (B, 1, H, D), jnp.float32)
    hlo = jax.jit(lambda s, q: s.attend_jnp(q, jnp.array([[N[0]], [N[1]]]), block=128)).lower(st, qs).as_text()
    assert native.TARGET not in hlo


def test_no_compiler_falls_back(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert not native.available() and not native.enabled()
    st = _state("int8")
    q = jax.random.normal(jax.random.key(1), (B, 1, H, D), jnp.float32)
    hlo = jax.jit(lambda s, q: s.attend_jnp(q, jnp.array([[N[0]], [N[1]]]), block=128)).lower(st, q).as_text()
    assert native.TARGET not in hlo
