"""One registry-driven table over every layer state (`kvjax.states.STATES`): append, attend, positions,
`nbytes == abstract().nbytes()`, and quantized storage where a state takes it.

A new state type adds one row to `ROWS` (the coverage test fails until it does). Each row builds an
empty state with `init` and appends the same tokens; attention is compared with a naive float64
reference over exactly the tokens appended (`test_kv_state.naive_attention`), exact for full-precision
states, within the quantizer's error for quantized ones.

Legend: B batch, T tokens, H query heads, K KV heads, D head dim, S slots.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import quantizers
from kvjax.models.rope import apply_rope
from kvjax.states import STATES, DenseKV, KVCache, LatentKV, LocretKV, RaggedKV, RollingKV, cache_nbytes, \
    memory_report
from test_kv_state import naive_attention

B, K, H, D, S, T = 2, 2, 4, 8, 32, 6
N_VALID = np.array([6, 4])  # row 1 holds padding past its 4th token
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Row:
    init_args: tuple  # cls.init(*init_args)
    one_at_a_time: bool = False  # decode-only states take one token per append
    atol: float = 2e-5  # attention vs the exact reference
    # (k, v, q) -> what the state appends and is queried with, for states whose k/v/q are not plain K/V
    adapt: object = None
    # (q, q_pos, k, v, kv_pos, length) -> expected attention of the adapted tokens (default: plain K/V)
    reference: object = None


def _mla_adapt(k, v, q):
    """MLA: the RoPE key k^R is the first P = D/2 dims of k, the latent c is v (rank D), and the absorbed
    query q~ = [q; q[..., :P]] has width D + P."""
    p = D // 2
    return k[..., :p], v, jnp.concatenate([q, q[..., :p]], axis=-1)


def _mla_reference(q, q_pos, k, v, kv_pos, length):
    """Absorbed MLA attention = plain attention with key [c; k^R] and value c (padded to q's width)."""
    key = np.concatenate([np.asarray(v), np.asarray(k)], axis=-1)
    value = np.pad(np.asarray(v), [(0, 0)] * 3 + [(0, key.shape[-1] - v.shape[-1])])
    return naive_attention(q, q_pos, key, value, kv_pos, length)[..., : v.shape[-1]]


# ThinK: each row and head keeps 5 of its D key channels (a different set each)
CHANNELS = np.sort(np.random.default_rng(3).permuted(np.broadcast_to(np.arange(D), (B, K, D)), axis=-1)[..., :5], -1)


def _pruned_reference(q, q_pos, k, v, kv_pos, length):
    """Attention over keys whose unkept channels are zero, scale 1/sqrt(D) (ThinK's masked keys)."""
    keep = np.zeros((B, K, 1, D), bool)
    np.put_along_axis(keep, CHANNELS[:, :, None, :], True, axis=-1)
    return naive_attention(q, q_pos, np.where(keep, np.asarray(k), 0.0), v, kv_pos, length)


PALU_FREQ = 1.0 / (10000.0 ** (np.arange(0, D, 2) / D))


def _palu_reference(q, q_pos, k, v, kv_pos, length):
    """Palu stores the pre-RoPE keys of the tokens' features (full rank: exactly), RoPE re-applied."""
    features = tokens()[3]
    k_pre = np.asarray(features)[..., H * D:(H + K) * D].reshape(B, T, K, D).transpose(0, 2, 1, 3)
    keys = apply_rope(jnp.asarray(k_pre), jnp.asarray(kv_pos), jnp.asarray(PALU_FREQ, F32))
    return naive_attention(q, q_pos, np.asarray(keys), v, kv_pos, length)


def _head():
    rng = np.random.default_rng(7)
    return dict(fc1=dict(kernel=jnp.asarray(rng.normal(size=((H + 2 * K) * D, 4)), F32)),
                fc2=dict(kernel=jnp.asarray(rng.normal(size=(4, K)), F32)))


ROWS = {
    "DenseKV": Row((B, K, S, D, F32)),
    "RaggedKV": Row((B, K, S, D, F32)),
    "RollingKV": Row((B, K, S, D, F32, "h2o", 1, 2), one_at_a_time=True),
    # full rank, orthonormal bases: attention in the projected space is exact
    "LatentKV": Row((B, S, jnp.asarray(np.linalg.qr(np.random.default_rng(1).normal(size=(K, D, D)))[0], F32),
                     jnp.asarray(np.linalg.qr(np.random.default_rng(2).normal(size=(K, D, D)))[0], F32), F32),
                    atol=1e-4),
    # a budget above what is appended: nothing is evicted
    "LocretKV": Row((B, K, S, D, F32, [S, S], [0, 0], [0, 0], _head())),
    "QuantKV": Row((B, K, S, D, F32, quantizers.get("int8")), atol=0.05),
    "QuantRaggedKV": Row((B, K, S, D, F32, quantizers.get("int8")), atol=0.05),
    # K latent heads of rank D with RoPE keys of D/2 dims (DeepSeek has one latent head)
    "MLAKV": Row((B, S, D, D // 2, F32, K), adapt=_mla_adapt, reference=_mla_reference),
    "ChannelKV": Row((B, K, S, D, F32, CHANNELS), reference=_pruned_reference),
    # a window of S slots: every appended token is within it (the ring past W: tests/test_gemma3.py)
    "WindowKV": Row((B, K, S, D, F32)),
    # KV head 1 streams with 2 sinks and 8 recent slots: every appended token is within them
    "DuoKV": Row((B, K, S, D, F32, (1,), 2, 8)),
    # full-rank orthonormal bases of each KV head's pre-RoPE keys and values
    "PaluKV": Row((B, S, jnp.asarray(np.linalg.qr(np.random.default_rng(4).normal(size=(K, D, D)))[0], F32),
                   jnp.asarray(np.linalg.qr(np.random.default_rng(5).normal(size=(K, D, D)))[0], F32), PALU_FREQ, F32),
                  atol=1e-4, reference=_palu_reference),
    # merged layer groups (MiniCache, xKV) holding no prompt: appended tokens go to the reading member's own tail
    # (the merged prompt: tests/test_layermerge.py)
    "SlerpKV": Row((B, K, 0, D, F32, 0, 2, S)),
    "SharedBasisKV": Row((B, K, 0, D, F32, 8, 8, 2, S)),
    # pages of 4 slots: the 6 tokens of row 0 span two pages per head (eviction: tests/test_paged.py)
    "PagedKV": Row((B, K, S, D, F32, 4)),
}


def test_every_state_has_a_row():
    assert set(ROWS) == {cls.__name__ for cls in STATES}


def tokens(seed=0, row: Row | None = None):
    rng = np.random.default_rng(seed)
    k, v = (jnp.asarray(rng.normal(size=(B, K, T, D)), F32) for _ in range(2))
    pos = jnp.asarray(np.broadcast_to(np.arange(T), (B, T)), jnp.int32)
    features = jnp.asarray(rng.normal(size=(B, T, (H + 2 * K) * D)), F32)
    q = jnp.asarray(rng.normal(size=(B, 1, H, D)), F32)
    if row is not None and row.adapt is not None:
        k, v, q = row.adapt(k, v, q)
    return k, v, pos, features, q


def expected(row: Row, q, q_pos, k, v, kv_pos, length):
    return (row.reference or naive_attention)(q, q_pos, k, v, kv_pos, length)


def filled(cls, row: Row, n_valid=N_VALID):
    state = cls.init(*row.init_args)
    k, v, pos, features, _ = tokens(row=row)
    n_valid = jnp.asarray(n_valid, jnp.int32)
    if not row.one_at_a_time:
        return state.append(k, v, pos, n_valid, features)
    for t in range(T):
        state = state.append(k[:, :, t:t + 1], v[:, :, t:t + 1], pos[:, t:t + 1], (n_valid > t).astype(jnp.int32),
                             features[:, t:t + 1])
    return state


@pytest.mark.parametrize("cls", STATES, ids=lambda c: c.__name__)
def test_append_then_attend_equals_the_reference(cls):
    row = ROWS[cls.__name__]
    state = jax.jit(lambda: filled(cls, row))()
    k, v, _, _, q = tokens(row=row)
    q_pos = jnp.asarray([[T], [N_VALID[1]]], jnp.int32)  # each row's next position
    out = jax.jit(lambda s, q, p: s.attend(q, p))(state, q, q_pos)
    kv_pos = np.broadcast_to(np.arange(T), (B, K, T))
    want = expected(row, q, q_pos, k, v, kv_pos, N_VALID)
    np.testing.assert_allclose(np.asarray(out), want, atol=row.atol, rtol=row.atol)


@pytest.mark.parametrize("cls", STATES, ids=lambda c: c.__name__)
def test_positions_hold_exactly_the_appended_tokens(cls):
    # rows of equal length (per-head states list positions per head, for rows holding equal counts)
    state = filled(cls, ROWS[cls.__name__], n_valid=[T, T])
    pos = state.positions()
    for b in range(B):
        for kh in range(K):
            held = np.asarray(pos[kh][b]) if isinstance(pos, list) else np.asarray(pos)[b, kh]
            held = np.sort(held[held < np.iinfo(np.int32).max])
            assert held.tolist() == list(range(T)), (cls.__name__, b, kh)


@pytest.mark.parametrize("cls", STATES, ids=lambda c: c.__name__)
def test_nbytes_equals_the_abstract_state(cls):
    row = ROWS[cls.__name__]
    state = cls.init(*row.init_args)
    abstract = cls.abstract(*row.init_args)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(abstract))
    assert abstract.nbytes() == state.nbytes() == filled(cls, row).nbytes()
    assert state.nbytes() == sum(x.nbytes for x in jax.tree_util.tree_leaves(state))


@pytest.mark.parametrize("cls", STATES, ids=lambda c: c.__name__)
def test_memory_report_adds_up_to_nbytes(cls):
    state = filled(cls, ROWS[cls.__name__])
    cache = KVCache(layers=(state,), next_pos=jnp.zeros((B,), jnp.int32))
    report = memory_report(cache)
    parts = ("codes", "scales", "zeros", "outliers", "residual", "sink", "kv", "metadata")
    assert sum(report[p] for p in parts) == report["total"] == cache_nbytes(cache)


@pytest.mark.parametrize("cls", [DenseKV, RaggedKV], ids=lambda c: c.__name__)
def test_room_grows_on_the_host(cls):
    state = filled(cls, ROWS[cls.__name__])
    assert bool(state.has_room(1))
    grown = state.with_room(S, lambda c: c)
    assert bool(grown.has_room(S)) and grown.nbytes() > state.nbytes()


def test_decode_only_and_scoring_states_refuse_what_they_cannot_take():
    rolling = RollingKV.init(*ROWS["RollingKV"].init_args)
    k, v, pos, features, _ = tokens()
    with pytest.raises(ValueError, match="one token per step"):
        rolling.append(k, v, pos, jnp.asarray(N_VALID, jnp.int32))
    locret = LocretKV.init(*ROWS["LocretKV"].init_args)
    with pytest.raises(ValueError, match="pass features="):
        locret.append(k, v, pos, jnp.asarray(N_VALID, jnp.int32))
    assert isinstance(LatentKV.init(*ROWS["LatentKV"].init_args).store, DenseKV)


# state -> (tokens, room) of `quantize`: what a dense layout will hold, what a per-head pool may add
QUANTIZABLE = {"DenseKV": (T, 0), "RaggedKV": (T, 2), "RollingKV": (S, 0), "LatentKV": (T, 0), "MLAKV": (T, 0),
               "ChannelKV": (T, 0), "DuoKV": (T, 0), "SlerpKV": (T, 0), "SharedBasisKV": (T, 0)}


@pytest.mark.parametrize("name", sorted(QUANTIZABLE))
def test_quantized_storage_attends_like_the_reference(name):
    cls = next(c for c in STATES if c.__name__ == name)
    row = ROWS[name]
    state = filled(cls, row)
    quantized = state.quantize(quantizers.get("int8(residual=2)"), *QUANTIZABLE[name])
    assert quantized.nbytes() < state.nbytes()
    k, v, _, _, q = tokens(row=row)
    q_pos = jnp.asarray([[T], [N_VALID[1]]], jnp.int32)
    out = jax.jit(lambda s, q, p: s.attend(q, p))(quantized, q, q_pos)
    want = expected(row, q, q_pos, k, v, np.broadcast_to(np.arange(T), (B, K, T)), N_VALID)
    np.testing.assert_allclose(np.asarray(out), want, atol=0.05, rtol=0.05)
