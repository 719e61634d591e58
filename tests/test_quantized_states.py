"""Quantization as storage (`kvjax.states.quantized.QuantStore`): `LayerState.quantize` on every layout
that takes it, the same numbers as the former `QuantKV.from_dense`, and the compositions it enables:
rolling (decode-time eviction) + quantization and latent (MatryoshkaKV) + quantization.

Rolling + quant re-quantizes the victim's group (`kvjax.states.rolling`); the reference here does what
that shortcut must equal: dequantize the whole store, evict and write on the dense arrays with the same
rule, quantize the store again.

Legend: B batch, K KV heads, D head dim, C rolling capacity, N sink, S store, R residual slots.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import generation, quant, quantizers
from kvjax.states import EMPTY_POS, DenseKV, KVCache, LatentKV, LocretKV, QuantKV, QuantRaggedKV, RaggedKV, \
    RollingKV, cache_nbytes, memory_report, tree_nbytes
from kvjax.states.ragged import ragged_from_selection
from kvjax.testing import tiny_lm

B, K, D = 2, 2, 8
F32 = jnp.float32


def bound(spec):
    """KVQuant rotates keys back by their positions: bind it to the tiny model's RoPE."""
    return spec.for_model(tiny_lm(seed=0).cfg)


# ------------------------------------------------------------------ DenseKV.quantize == from_dense before
def _slots(x, start, n, fill):
    short = max(start + n - x.shape[2], 0)
    x = jnp.pad(x, [(0, 0), (0, 0), (0, short)] + [(0, 0)] * (x.ndim - 3), constant_values=fill)
    return x[:, :, start:start + n]


def former_from_dense(state: DenseKV, quantizer, tokens: int) -> dict:
    """`QuantKV.from_dense` as it was before the store was shared (kvjax/states/quant_dense.py)."""
    r, n_sink_slots = quantizer.residual, quantizer.sink
    cap = -(-max(tokens - n_sink_slots, 1) // r) * r
    n_sink = jnp.minimum(state.length, n_sink_slots)
    in_sink = jnp.arange(n_sink_slots)[None, None, :] < n_sink[:, None, None]
    k, v = _slots(state.k, n_sink_slots, cap, 0), _slots(state.v, n_sink_slots, cap, 0)
    pos = _slots(state.pos, n_sink_slots, cap, EMPTY_POS)
    length = state.length - n_sink
    n_q = (length // r) * r
    slots = jnp.arange(cap)[None, None, :]
    res_idx = n_q[:, None, None] + jnp.arange(r)[None, None, :]
    in_res = res_idx < length[:, None, None]
    idx = jnp.minimum(res_idx, cap - 1)
    take_kv = lambda x: jnp.where(in_res[..., None], jnp.take_along_axis(x, idx[..., None], axis=2), 0)  # noqa: E731
    sink = lambda x: jnp.where(in_sink[..., None], _slots(x, 0, n_sink_slots, 0), 0)  # noqa: E731
    return dict(kq=quantizer.quantize_keys(k, pos), vq=quantizer.quantize_values(v),
                pos=jnp.where(slots < n_q[:, None, None], pos, EMPTY_POS), k_res=take_kv(k), v_res=take_kv(v),
                pos_res=jnp.where(in_res, jnp.take_along_axis(pos, idx, axis=2), EMPTY_POS),
                n_q=n_q.astype(jnp.int32), n_r=(length - n_q).astype(jnp.int32),
                k_sink=sink(state.k), v_sink=sink(state.v),
                pos_sink=jnp.where(in_sink, _slots(state.pos, 0, n_sink_slots, EMPTY_POS), EMPTY_POS))


def dense_state(lengths, capacity, seed=0) -> DenseKV:
    st = DenseKV.init(B, K, capacity, D, F32)
    k, v = jax.random.normal(jax.random.key(seed), (2, B, K, capacity, D))
    pos = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (B, capacity))
    return st.append(k, v, pos, jnp.asarray(lengths, jnp.int32))


@pytest.mark.parametrize("spec", [quantizers.KIVI(bits=2, group=4, residual=8),
                                  quantizers.KIVI(bits=4, group=8, residual=16),
                                  quantizers.PerToken(bits=4, group=8, residual=16),
                                  quantizers.Int8(residual=4), quantizers.FP8(residual=4),
                                  quantizers.KVQuant(bits=3, group=8, residual=16, sink=2, outliers=0.1)],
                         ids=lambda s: s.name)
def test_dense_quantize_equals_the_former_from_dense(spec):
    spec = bound(spec) if spec.name == "kvquant" else spec
    st = dense_state([37, 20], 48)
    got = jax.jit(lambda s: s.quantize(spec, 48, 0))(st)
    want = jax.jit(lambda s: former_from_dense(s, spec, 48))(st)
    assert isinstance(got, QuantKV)
    for name in ("pos", "k_res", "v_res", "pos_res", "n_q", "n_r", "k_sink", "v_sink", "pos_sink"):
        np.testing.assert_array_equal(getattr(got, name), want[name], err_msg=name)
    assert got.nbytes() == tree_nbytes(want)
    # the stored tokens dequantize to the same numbers (slots past n_q are unused: zeros now)
    keys = lambda qa, pos: np.asarray(spec.dequantize_keys(qa, pos, F32))  # noqa: E731
    values = lambda qa: np.asarray(spec.dequantize_values(qa, F32))  # noqa: E731
    for b, n_q in enumerate(np.asarray(want["n_q"])):
        np.testing.assert_array_equal(keys(got.kq, got.pos)[b, :, :n_q], keys(want["kq"], want["pos"])[b, :, :n_q])
        np.testing.assert_array_equal(values(got.vq)[b, :, :n_q], values(want["vq"])[b, :, :n_q])
    for a, w in zip(jax.tree_util.tree_leaves(got.kq), jax.tree_util.tree_leaves(want["kq"])):
        assert a.shape == w.shape and a.dtype == w.dtype


def dequantized_reference(store, q, q_pos):
    """Attention over the whole store dequantized at once (the former jnp path)."""
    from kvjax.attention import blockwise_attention
    k, v, pos = store.dense()  # sink | store | residual side by side, unused slots at EMPTY_POS
    return blockwise_attention(q, q_pos, k, v, pos, jnp.full((q.shape[0],), pos.shape[2], jnp.int32))


@pytest.mark.parametrize("spec", [quantizers.KIVI(bits=2, group=4, residual=8), quantizers.Int8(residual=4),
                                  quantizers.KVQuant(bits=3, group=8, residual=16, sink=2, outliers=0.1)],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("block", [None, 16, 24])  # one block; blocks that divide S; the last block overlapping
def test_store_is_read_a_block_at_a_time(spec, block):
    spec = bound(spec) if spec.name == "kvquant" else spec
    st = dense_state([61, 35], 64).quantize(spec, 64, 0)
    q = jax.random.normal(jax.random.key(3), (B, 3, 2 * K, D))
    q_pos = jnp.array([[60, 40, 12], [34, 30, 3]], jnp.int32)
    got = jax.jit(lambda s, q: s.attend_jnp(q, q_pos, block))(st, q)
    want = dequantized_reference(st.store, q, q_pos)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [5, 8, 24])
def test_ragged_pools_are_read_a_region_block_at_a_time(block):
    rng = np.random.default_rng(0)
    keep = rng.random((B, K, 40)) < np.array([0.9, 0.3])[None, :, None]  # heads keep very different counts
    st = dense_state([40, 40], 40)
    rag = ragged_from_selection(st.k, st.v, st.pos, jnp.asarray(keep), int(keep.sum(axis=(1, 2)).max()))
    q = jax.random.normal(jax.random.key(4), (B, 2, 2 * K, D))
    q_pos = jnp.array([[39, 20], [39, 7]], jnp.int32)
    for state in (rag, rag.quantize(quantizers.KIVI(bits=2, group=4, residual=8), 0, 8)):  # block None: tested
        got = jax.jit(lambda s, q: s.attend_jnp(q, q_pos, block))(state, q)             # against references
        want = jax.jit(lambda s, q: s.attend_jnp(q, q_pos, None))(state, q)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_quantize_is_a_state_method():
    spec = quantizers.Int8(residual=4)
    dense = dense_state([9, 9], 16)
    assert isinstance(dense.quantize(spec, 16, 0), QuantKV)
    ragged = RaggedKV(k=dense.k[:, 0], v=dense.v[:, 0], pos=dense.pos[:, 0], start=jnp.array([[0, 8]] * B),
                      end=jnp.array([[8, 16]] * B), length=jnp.array([[5, 8]] * B))
    assert isinstance(ragged.quantize(spec, 16, 4), QuantRaggedKV)
    rolling = RollingKV(k=dense.k, v=dense.v, pos=dense.pos, length=dense.length, score=jnp.zeros(dense.pos.shape))
    assert isinstance(rolling.quantize(spec, 16, 0).quant, QuantKV)
    eye = jnp.broadcast_to(jnp.eye(D), (K, D, D))
    assert isinstance(LatentKV.init(B, 16, eye, eye, F32).quantize(spec, 16, 0).store, QuantKV)
    with pytest.raises(ValueError, match="cannot quantize a QuantKV"):
        dense.quantize(spec, 16, 0).quantize(spec, 16, 0)
    rng = np.random.default_rng(7)
    head = dict(fc1=dict(kernel=jnp.asarray(rng.normal(size=(4 * K * D, 4)), F32)),
                fc2=dict(kernel=jnp.asarray(rng.normal(size=(4, K)), F32)))
    with pytest.raises(ValueError, match="cannot quantize a LocretKV"):
        LocretKV.init(B, K, 16, D, F32, [16, 16], [0, 0], [0, 0], head).quantize(spec, 16, 0)
    with pytest.raises(ValueError, match="pre-RoPE"):
        LatentKV.init(B, 16, eye, eye, F32).quantize(bound(quantizers.KVQuant(group=8, residual=8)), 16, 0)


# --------------------------------------------------------------------------------- rolling + quant
def rolling(rule="streaming", n_sink=2, recent=0, c=14, b=1, seed=0, n=None):
    """A full-precision RollingKV of capacity c holding tokens 0..n-1 (default c) with random K/V."""
    rng = np.random.default_rng(seed)
    st = RollingKV.init(b, K, c, D, F32, rule, n_sink, recent)
    kv = rng.normal(size=(2, 200, b, K, 1, D)).astype(np.float32)
    for t in range(c if n is None else n):
        st = st.append(jnp.asarray(kv[0, t]), jnp.asarray(kv[1, t]), jnp.full((b, 1), t, jnp.int32),
                       jnp.ones(b, jnp.int32))
    return st, kv


def test_rolling_quant_full_row_evicts_by_the_rule_hand_checked():
    # C = 14, KIVI R = 8, group 4: a full row keeps its newest 14 - 8 = 6 tokens (positions 8..13) in
    # the residual, positions 0..7 quantized (two key groups: slots 0-3 and 4-7), no quantizer sink.
    st, kv = rolling("streaming", n_sink=2)
    spec = quantizers.KIVI(bits=4, group=4, residual=8)
    q = st.quantize(spec, 14, 0)
    store = q.quant.store
    E = EMPTY_POS
    np.testing.assert_array_equal(store.slot_positions()[0, 0], list(range(8)) + [E] * 8 + list(range(8, 14)) + [E] * 2)
    before = q
    step = jax.jit(lambda s, t: s.append(jnp.asarray(kv[0, t]), jnp.asarray(kv[1, t]), jnp.full((1, 1), t, jnp.int32),
                                         jnp.ones(1, jnp.int32)), static_argnums=1)
    q = step(q, 14)
    # StreamingLLM evicts the oldest non-sink token, position 2 (store slot 2, key group 0-3); the
    # residual's oldest token (8) takes its slot, re-quantized with its group; 14 enters the residual
    store = q.quant.store
    for h in range(K):
        np.testing.assert_array_equal(store.slot_positions()[0, h],
                                      [0, 1, 8, 3, 4, 5, 6, 7] + [E] * 8 + [14, 9, 10, 11, 12, 13, E, E])
    np.testing.assert_array_equal(store.k_res[0, :, 0], kv[0, 14][0, :, 0])  # the new token: full precision
    keys = np.asarray(quant.dequantize(store.kq, F32))[0]
    old_keys = np.asarray(quant.dequantize(before.quant.store.kq, F32))[0]
    step_k = (kv[0, [0, 1, 3, 8]].max(0) - kv[0, [0, 1, 3, 8]].min(0))[0, :, 0] / 15  # group 0's step per channel
    assert np.all(np.abs(keys[:, 2] - kv[0, 8][0, :, 0]) <= step_k / 2 + 1e-6)
    np.testing.assert_array_equal(keys[:, 4:8], old_keys[:, 4:8])  # the other group is untouched
    np.testing.assert_array_equal(q.length, [14])
    np.testing.assert_array_equal(store.n_q, [8])
    np.testing.assert_array_equal(store.n_r, [6])
    q = step(q, 15)  # next: position 3 (slot 3) out, 9 (residual slot 1) into the store, 15 into the residual
    np.testing.assert_array_equal(q.quant.store.slot_positions()[0, 1],
                                  [0, 1, 8, 9, 4, 5, 6, 7] + [E] * 8 + [14, 15, 10, 11, 12, 13, E, E])


def _rule_victim(pos, score, rule, n_sink, recent, newest):
    """The rolling rules of `kvjax.states.rolling`, in numpy, over one head's slots."""
    if rule == "streaming":
        key = np.where(pos < n_sink, np.inf, pos.astype(np.float64))
    else:
        key = np.where(pos > newest - recent, np.inf, score)
    return int(np.argmin(key))


def reference_step(state: RollingKV, k, v, pos, live, query):
    """Dequantize the whole store, evict and write on the dense arrays with the rule, requantize the
    store, then fold the query's attention into the scores (`observe_query`). Returns the dequantized
    (K, V) [B, K, N+S+R, D], positions and scores it should hold.

    Only the groups written to take the requantized numbers: quantizing a dequantized group again
    need not give it back exactly (KVQuant's outliers, rounding ties), and an untouched group holds
    what it held."""
    st = state.quant.store
    qz = st.quantizer
    n, s = st.k_sink.shape[2], st.slots
    kd, vd, pd = (np.array(x) for x in st.dense())
    score = np.array(state.score)
    written = np.zeros(pd.shape, bool)
    for b in range(kd.shape[0]):
        if not live[b]:
            continue
        assert int(state.length[b]) == state.capacity  # the reference covers full rows
        for h in range(kd.shape[1]):
            victim = _rule_victim(pd[b, h], score[b, h], state.rule, state.n_sink, state.recent, pos[b] - 1)
            res = pd[b, h, n + s:]
            if n <= victim < n + s and (res != EMPTY_POS).any():  # the residual's oldest enters the store
                o = n + s + int(np.argmin(res))
                for x in (kd, vd, pd, score):
                    x[b, h, victim] = x[b, h, o]
                written[b, h, victim] = True
                victim = o
            kd[b, h, victim], vd[b, h, victim], pd[b, h, victim], score[b, h, victim] = k[b, h], v[b, h], pos[b], 0
            written[b, h, victim] = True
    sl = slice(n, n + s)
    kq = qz.quantize_keys(jnp.asarray(kd[:, :, sl]), jnp.asarray(pd[:, :, sl]))
    for x, deq in ((kd, qz.dequantize_keys(kq, jnp.asarray(pd[:, :, sl]), F32)),
                   (vd, qz.dequantize_values(qz.quantize_values(jnp.asarray(vd[:, :, sl])), F32))):
        qa = kq if x is kd else st.vq
        g = s // min(leaf.shape[2] for leaf in jax.tree_util.tree_leaves(qa))  # tokens per group
        touched = np.repeat(written[:, :, sl].reshape(*written.shape[:2], s // g, g).any(-1), g, axis=-1)
        x[:, :, sl] = np.where(touched[..., None], np.asarray(deq), x[:, :, sl])
    if state.rule != "streaming":  # softmax of the query over the stored keys, per query head
        g = query.shape[1] // kd.shape[1]
        sc = np.einsum("bkgd,bksd->bkgs", query.reshape(kd.shape[0], kd.shape[1], g, -1), kd) / np.sqrt(kd.shape[-1])
        sc = np.where((pd != EMPTY_POS)[:, :, None], sc, -np.inf)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
        score = score + p.mean(2) if state.rule == "h2o" else np.broadcast_to(p.mean((1, 2))[:, None], score.shape)
    return kd, vd, pd, score


@pytest.mark.parametrize("rule, n_sink, recent", [("streaming", 2, 0), ("h2o", 1, 3), ("tova", 0, 0)])
# KVQuant at 4 bits: at 2-3 bits, a group re-quantized after its extreme token left puts old
# (pre-RoPE grid) values exactly halfway between codes, and the rotation's float rounding breaks such
# ties one way here and the other way in the reference (both are exact quantizations)
@pytest.mark.parametrize("spec", [quantizers.KIVI(bits=2, group=4, residual=8), quantizers.Int8(residual=4),
                                  quantizers.KVQuant(bits=4, group=4, residual=8, sink=1, outliers=0.25)],
                         ids=lambda s: s.name)
def test_rolling_quant_matches_the_dequantize_evict_requantize_reference(rule, n_sink, recent, spec):
    spec = bound(spec) if spec.name == "kvquant" else spec
    st, kv = rolling(rule, n_sink, recent, c=21, b=2)
    q = st.quantize(spec, 21, 0)
    rng = np.random.default_rng(1)
    step = jax.jit(lambda s, k, v, p, nv, qq: s.append(k, v, p, nv).observe_query(qq, p))
    for t in range(21, 33):
        live = np.array([1, int(t < 27)], np.int32)  # row 1 is done after 6 steps: it must not change
        k, v = kv[0, t][:, :, 0], kv[1, t][:, :, 0]
        query = rng.normal(size=(2, 1, 2 * K, D)).astype(np.float32)
        kd, vd, pd, score = reference_step(q, k, v, np.full(2, t), live, query[:, 0])
        prev_keys = np.asarray(q.quant.store.dense()[0])
        q = step(q, jnp.asarray(kv[0, t]), jnp.asarray(kv[1, t]), jnp.full((2, 1), t, jnp.int32), jnp.asarray(live),
                 jnp.asarray(query))
        got_k, got_v, got_p = (np.asarray(x) for x in q.quant.store.dense())
        np.testing.assert_array_equal(got_p, pd)
        used = pd != EMPTY_POS
        np.testing.assert_allclose(got_k[used], kd[used], atol=1e-5)
        np.testing.assert_allclose(got_v[used], vd[used], atol=1e-5)
        np.testing.assert_allclose(np.asarray(q.score), score, atol=1e-5)
        # only the victim's key group changed in the store (g tokens; a residual write changes none)
        changed = np.abs(got_k - prev_keys).max(-1) > 0
        n, s = q.quant.store.k_sink.shape[2], q.quant.store.slots
        g = max(s // x.shape[2] for x in jax.tree_util.tree_leaves(q.quant.store.kq))
        for b in range(2):
            for h in range(K):
                hit = np.nonzero(changed[b, h, n:n + s])[0] // g
                assert len(set(hit.tolist())) <= live[b], (t, b, h, hit)
    np.testing.assert_array_equal(q.length, [21, 21])


def test_rolling_quant_streams_flushes_then_keeps_a_full_residual_and_scores_follow():
    # a 5-token prompt, C = 16, R = 4: tokens flush in blocks of 4 until the row holds 16, whose
    # 4th residual token does not flush: the row keeps R tokens in full precision from then on.
    # Scores are set to position + 1 and must stay with their tokens (flushes and evictions).
    st, kv = rolling("h2o", n_sink=1, recent=2, c=16, n=5)
    spec = quantizers.KIVI(bits=4, group=4, residual=4)
    q = st.quantize(spec, 16, 0)
    np.testing.assert_array_equal([q.quant.n_q[0], q.quant.n_r[0]], [4, 1])
    ref = st
    step = jax.jit(lambda s, t: s.append(jnp.asarray(kv[0, t]), jnp.asarray(kv[1, t]), jnp.full((1, 1), t, jnp.int32),
                                         jnp.ones(1, jnp.int32)), static_argnums=1)
    for t in range(5, 30):
        pos = np.asarray(q.quant.store.slot_positions())
        q = dataclasses.replace(q, score=jnp.where(pos != EMPTY_POS, pos + 1.0, 0.0))
        ref = dataclasses.replace(ref, score=ref.pos + 1.0)
        q, ref = step(q, t), step(ref, t)
        store = q.quant.store
        n_held = min(t + 1, 16)
        assert int(q.length[0]) == n_held == int(store.n_q[0] + store.n_r[0])
        assert int(store.n_q[0]) % 4 == 0
        assert int(store.n_r[0]) == (4 if t + 1 >= 16 else (t + 1) % 4)
        pos = np.asarray(store.slot_positions())
        np.testing.assert_array_equal(np.sort(pos, -1)[..., :n_held], np.sort(np.asarray(ref.pos), -1)[..., :n_held])
        score = np.asarray(q.score)
        expect = np.where((pos != EMPTY_POS) & (pos != t), pos + 1.0, 0.0)  # the new token starts at 0
        np.testing.assert_array_equal(score, expect)
    np.testing.assert_array_equal(kvjax.kept_positions(KVCache(layers=(q,), next_pos=jnp.array([30])))[0],
                                  np.sort(np.asarray(ref.pos), -1))


def test_rolling_quant_nbytes_and_memory_report():
    c = 512  # kivi-2 keeps 128 tokens in full precision: about 0.39 of the float32 rolling state
    st = RollingKV.init(1, K, c, 64, F32, "h2o", 4, 32)
    k, v = jax.random.normal(jax.random.key(0), (2, 1, K, c, 64))
    st = dataclasses.replace(st, k=k, v=v, pos=jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (1, K, c)),
                             length=jnp.array([c], jnp.int32))
    q = st.quantize(quantizers.get("kivi-2"), c, 0)
    assert q.nbytes() < 0.45 * st.nbytes()
    rep = memory_report(KVCache(layers=(q,), next_pos=jnp.array([c], jnp.int32)))
    parts = ("codes", "scales", "zeros", "outliers", "residual", "sink", "kv", "metadata")
    assert sum(rep[p] for p in parts) == rep["total"] == q.nbytes() + 4
    assert rep["kv"] == 0 and rep["residual"] == tree_nbytes((q.quant.k_res, q.quant.v_res)) > 0
    assert rep["metadata"] == tree_nbytes((q.quant.store.pos, q.quant.store.pos_res, q.quant.store.pos_sink,
                                           q.quant.n_q, q.quant.n_r, q.score, q.length)) + 4
    # the same bytes as the state quantize would build from the abstract shapes
    assert jax.eval_shape(lambda s: s.quantize(quantizers.get("kivi-2"), c, 0), st).nbytes() == q.nbytes()


@pytest.mark.parametrize("rule, n_sink, recent", [("streaming", 4, 0), ("h2o", 0, 12)])
def test_rolling_quant_decodes_inside_the_jitted_while_loop(rule, n_sink, recent):
    lm = tiny_lm(seed=0)
    ids = [int(t) for t in np.random.default_rng(0).integers(3, 200, 40)]
    c, spec = 24, quantizers.KIVI(bits=4, group=4, residual=8)
    full = lm.prefill([ids, ids[:30]])

    def rolling_layer(layer):  # StreamingLLM's prefill selection: sinks, then the most recent
        keep = jnp.where(layer.pos < n_sink, jnp.inf, layer.pos.astype(F32))
        kept = layer.keep_top(keep, jnp.minimum(layer.length, c), c)
        return RollingKV(k=kept.k, v=kept.v, pos=kept.pos, length=kept.length, score=jnp.zeros(kept.pos.shape, F32),
                         rule=rule, n_sink=n_sink, recent=recent)

    cache = dataclasses.replace(full, layers=tuple(rolling_layer(layer) for layer in full.layers))
    quantized = dataclasses.replace(cache, layers=tuple(layer.quantize(spec.for_layer(i), c, 0)
                                                        for i, layer in enumerate(cache.layers)))
    run = lambda ch: generation.decode(  # noqa: E731  (it donates the cache: run on a copy)
        lm.params, jax.tree_util.tree_map(jnp.copy, ch), jnp.zeros((2, lm.cfg.vocab_size), F32), jnp.zeros(2, bool),
        jax.random.key(0), jnp.int32(40), cfg=lm.cfg, sampler=generation.Sampler(), eos_ids=(), n_buffer=64)
    out_q, final_q = run(quantized)
    out, final = run(cache)
    assert (np.asarray(out_q) >= 0).sum() == 80 and int(final_q.step) == 40
    for layer, ref in zip(final_q.cache.layers, final.cache.layers):
        assert isinstance(layer, RollingKV) and layer.quant is not None
        np.testing.assert_array_equal(layer.length, [c, c])
        if rule == "streaming":  # positions do not depend on the values: the same tokens kept
            np.testing.assert_array_equal(np.sort(np.asarray(layer.positions()), -1)[..., :c],
                                          np.sort(np.asarray(ref.pos), -1))
    assert cache_nbytes(final_q.cache) == cache_nbytes(quantized)


def test_generate_with_capacity_and_quant_end_to_end():
    """`lm.generate(method=..., capacity=C, quant=...)` (the pipeline calls `layer.quantize` on the
    rolling layers): a bounded, quantized cache for the whole generation."""
    lm = tiny_lm(seed=0)
    ids = [int(t) for t in np.random.default_rng(0).integers(3, 200, 40)]
    full = lm.generate(ids, max_new_tokens=30, stop_at_eos=False, method="streaming_llm", capacity=24)
    out = lm.generate(ids, max_new_tokens=30, stop_at_eos=False, method="streaming_llm", capacity=24,
                      quant=quantizers.Int8(residual=8))
    assert out.ids == full.ids  # int8 of these K/V moves no greedy choice
    for a, b in zip(kvjax.kept_positions(out.cache), kvjax.kept_positions(full.cache)):
        np.testing.assert_array_equal(a, b)
    assert all(isinstance(layer, RollingKV) and layer.quant is not None for layer in out.cache.layers)


# ---------------------------------------------------------------------------------- latent + quant
def test_latent_quant_attends_close_to_the_latent_state_and_is_smaller():
    n_kv, d, rk, rv, s = 2, 64, 32, 32, 256
    rng = np.random.default_rng(0)
    uk = jnp.asarray(np.linalg.qr(rng.normal(size=(n_kv, d, d)))[0][..., :rk], F32)
    uv = jnp.asarray(np.linalg.qr(rng.normal(size=(n_kv, d, d)))[0][..., :rv], F32)
    latent = LatentKV.init(1, s, uk, uv, F32)
    k, v = (jnp.asarray(rng.normal(size=(1, n_kv, 150, d)), F32) for _ in range(2))
    pos = jnp.arange(150, dtype=jnp.int32)[None]
    latent = latent.append(k, v, pos, jnp.array([150], jnp.int32))
    q = jax.jit(lambda st: st.quantize(quantizers.KIVI(bits=4, group=32, residual=32), s, 0))(latent)
    assert isinstance(q.store, QuantKV) and q.store.k_res.shape[-1] == rk
    assert q.nbytes() < 0.5 * latent.nbytes()
    np.testing.assert_array_equal(q.positions()[0, :, :150], latent.positions()[0, :, :150])
    query = jnp.asarray(rng.normal(size=(1, 1, 2 * n_kv, d)), F32)
    attend = jax.jit(lambda st, p: st.attend(query, p))
    want = np.asarray(attend(latent, jnp.array([[150]])))
    got = np.asarray(attend(q, jnp.array([[150]])))
    assert np.abs(got - want).max() < 0.05  # values of unit scale: 4-bit steps of about 0.4, averaged
    # decoding on top: tokens go through the residual and flush (150 + 40 crosses a 32-token block)
    k2, v2 = (jnp.asarray(rng.normal(size=(1, n_kv, 40, d)), F32) for _ in range(2))
    pos2 = jnp.arange(150, 190, dtype=jnp.int32)[None]
    latent2 = latent.append(k2, v2, pos2, jnp.array([40], jnp.int32))
    q2 = jax.jit(lambda st: st.append(k2, v2, pos2, jnp.array([40], jnp.int32)))(q)
    np.testing.assert_array_equal(q2.length, [190])
    assert int(q2.store.n_q[0]) == 160 and int(q2.store.n_r[0]) == 30
    want = np.asarray(attend(latent2, jnp.array([[190]])))
    got = np.asarray(attend(q2, jnp.array([[190]])))
    assert np.abs(got - want).max() < 0.05
    rep = memory_report(KVCache(layers=(q2,), next_pos=jnp.array([190], jnp.int32)))
    assert rep["total"] == q2.nbytes() + 4 and rep["metadata"] >= tree_nbytes((uk, uv)) and rep["codes"] > 0
