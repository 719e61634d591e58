"""QuantRaggedKV: per-head budgets stored quantized (bookkeeping, exact attention, growth, LM use)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import quantizers
from kvjax.states import EMPTY_POS
from kvjax.states import QuantRaggedKV
from kvjax.states.ragged import RaggedKV, ragged_from_selection
from kvjax.testing import tiny_lm

B, K, S, D = 2, 3, 40, 8
COUNTS = np.array([[37, 5, 18], [9, 40, 1]])  # tokens kept per row and head


def ragged_state(values=None, seed=0) -> RaggedKV:
    """Head k of row b keeps COUNTS[b, k] tokens of S, at scattered positions."""
    rng = np.random.default_rng(seed)
    k, v = (values if values is not None else rng.normal(size=(2, B, K, S, D)).astype(np.float32))
    keep = np.zeros((B, K, S), bool)
    for b in range(B):
        for h in range(K):
            keep[b, h, np.sort(rng.choice(S, COUNTS[b, h], replace=False))] = True
    pos = np.broadcast_to(np.arange(S, dtype=np.int32), (B, K, S))
    return ragged_from_selection(jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos), jnp.asarray(keep),
                                 int(COUNTS.sum(1).max()))


def int8_exact_values(seed=0):
    """K/V of integers in [-127, 127] with 127 in every token: int8 per-token quantization is exact."""
    x = np.random.default_rng(seed).integers(-127, 128, (2, B, K, S, D)).astype(np.float32)
    x[..., 0] = 127
    return x


@pytest.mark.parametrize("spec", [quantizers.KIVI(bits=2, group=4, residual=8),
                                  quantizers.KVQuant(bits=3, group=4, residual=8, sink=2)])
def test_from_ragged_holds_every_kept_token_once(spec):
    spec = spec.for_model(tiny_lm(seed=0).cfg)
    rag = ragged_state()
    q = QuantRaggedKV.from_ragged(rag, spec, room=10)
    np.testing.assert_array_equal(q.length, COUNTS)
    for a, b in zip(_per_head(rag), _per_head(q)):
        np.testing.assert_array_equal(a, b)
    r = spec.residual
    n_sink = np.minimum(COUNTS, spec.sink)
    np.testing.assert_array_equal(q.n_q, (COUNTS - n_sink) // r * r)
    start, end = np.asarray(q.start), np.asarray(q.end)
    assert np.all(start % r == 0) and np.all(end % r == 0) and np.all(end[:, :-1] == start[:, 1:])
    np.testing.assert_array_equal(end - start, (COUNTS - n_sink + 10) // r * r)
    assert bool(q.has_room(10)) and not bool(q.has_room(10 + r))


def _per_head(state):
    """Per row and head, the sorted positions held (rows may differ)."""
    if isinstance(state, RaggedKV):
        pos, start, n = (np.asarray(x) for x in (state.pos, state.start, state.length))
        return [np.sort(pos[b, start[b, h]: start[b, h] + n[b, h]]) for b in range(B) for h in range(K)]
    pos, start, n_q = (np.asarray(x) for x in (state.pos, state.start, state.n_q))
    side = np.concatenate([np.asarray(state.pos_sink), np.asarray(state.pos_res)], axis=2)
    return [np.sort(np.concatenate([pos[b, start[b, h]: start[b, h] + n_q[b, h]], side[b, h][side[b, h] != EMPTY_POS]]))
            for b in range(B) for h in range(K)]


def test_attention_equals_the_ragged_state_when_quantization_is_exact():
    rag = ragged_state(int8_exact_values())
    q = QuantRaggedKV.from_ragged(rag, quantizers.Int8(residual=8), room=8)
    query = jax.random.normal(jax.random.key(0), (B, 2, 6, D))  # T=2, H=6 (G=2)
    q_pos = jnp.array([[40, 41], [40, 41]], jnp.int32)
    np.testing.assert_allclose(q.attend(query, q_pos), rag.attend(query, q_pos), rtol=1e-5, atol=1e-4)
    # and after appending the same tokens to both (flushes included), and growing past the room
    new = jnp.asarray(int8_exact_values(1)[:, :, :, :12])
    pos = jnp.broadcast_to(jnp.arange(40, 52, dtype=jnp.int32), (B, 12))
    rows = jnp.array([12, 7], jnp.int32)
    q2 = q.with_room(12).append(new[0], new[1], pos, rows)
    r2 = rag.with_room(12).append(new[0], new[1], pos, rows)
    np.testing.assert_array_equal(q2.length, COUNTS + np.array([[12], [7]]))
    for a, b in zip(_per_head(r2), _per_head(q2)):
        np.testing.assert_array_equal(a, b)
    q_pos = jnp.array([[52, 53], [52, 53]], jnp.int32)
    np.testing.assert_allclose(q2.attend(query, q_pos), r2.attend(query, q_pos), rtol=1e-5, atol=1e-4)


def test_adakv_with_quantization_through_the_lm():
    lm = tiny_lm(seed=0)
    ids = [int(t) for t in np.random.default_rng(0).integers(3, 200, 200)]
    ragged = lm.prefill(ids, method="adakv:snapkv", ratio=0.5)
    both = lm.prefill(ids, method="adakv:snapkv", ratio=0.5, quant=quantizers.KIVI(bits=2, group=8, residual=16))
    assert all(isinstance(layer, QuantRaggedKV) for layer in both.layers)
    for a, b in zip(ragged.layers, both.layers):  # the same tokens kept per head
        for x, y in zip(a.positions(), b.positions()):
            np.testing.assert_array_equal(x, y)
    rep = kvjax.memory_report(both)
    assert rep["total"] == kvjax.cache_nbytes(both) and rep["codes"] > 0 and rep["kv"] == 0
    out = lm.generate(ids, max_new_tokens=24, stop_at_eos=False, method="adakv:snapkv", ratio=0.5, quant="int8")
    assert len(out.ids) == 24  # a single prompt gives a flat list
    np.testing.assert_array_equal(out.cache.layers[0].length.sum(), ragged.layers[0].length.sum() + 24 * lm.cfg.n_kv_heads)
