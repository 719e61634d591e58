"""DenseKV, KVCache and `blockwise_attention` against naive float32 references written out here.

Legend: B batch, T queries, S cache slots, H query heads, K KV heads, G = H/K, D head dim.
Slots past a row's `length` are scratch. The contract (docs/DESIGN.md, "KV state") is that they hold
finite values and get exactly zero weight. The tests fill them with large finite garbage (|x| ~ 1e4,
so any weight on them swamps the output) and give them positions that a causal mask alone would let
through, so any read of padding shows up.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.attention import blockwise_attention
from kvjax.states import EMPTY_POS, DenseKV, KVCache, cache_nbytes, init_cache, \
    kept_positions, tree_nbytes


attention = jax.jit(blockwise_attention, static_argnames="block")  # one compile per shape, not per op


# ------------------------------------------------------------------------------------ reference
def naive_attention(q, q_pos, k, v, kv_pos, length):
    """Causal GQA softmax attention, one (row, query, head) at a time, in float64 numpy.

    Slot s of row b is visible to query t iff s < length[b] and kv_pos[b, kh, s] <= q_pos[b, t]; query
    head h reads KV head h // G (HF `repeat_kv` order). A query that sees no key gets 0.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    q_pos, kv_pos, length = np.asarray(q_pos), np.asarray(kv_pos), np.asarray(length)
    b_, t_, h_, d_ = q.shape
    g = h_ // k.shape[1]
    out = np.zeros((b_, t_, h_, d_))
    for b in range(b_):
        for t in range(t_):
            for h in range(h_):
                kh = h // g
                visible = (np.arange(k.shape[2]) < length[b]) & (kv_pos[b, kh] <= q_pos[b, t])
                if not visible.any():
                    continue
                scores = k[b, kh, visible] @ q[b, t, h] / np.sqrt(d_)
                p = np.exp(scores - scores.max())
                out[b, t, h] = (p / p.sum()) @ v[b, kh, visible]
    return out


GARBAGE = 1e4  # scale of the finite values put in unused slots


def garbage(rng, shape):
    return (GARBAGE * rng.choice([-1.0, 1.0], size=shape) * (1 + rng.random(size=shape))).astype(np.float32)


def random_case(seed, b=2, t=5, h=4, n_kv=2, s=32, d=8, lengths=(29, 7), shuffle_pos=False):
    """q/k/v with the slots past each row's length set to garbage and their positions set to 0."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, n_kv, s, d)).astype(np.float32)
    v = rng.normal(size=(b, n_kv, s, d)).astype(np.float32)
    length = np.asarray(lengths, np.int32)
    kv_pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, n_kv, s)).copy()
    if shuffle_pos:  # slots out of position order, as after eviction
        for i in range(b):
            for j in range(n_kv):
                kv_pos[i, j] = rng.permutation(s)
    # queries: the last t positions of each row (a prefill chunk), in order
    q_pos = np.stack([np.arange(L - t, L) for L in lengths]).astype(np.int32)
    for i, L in enumerate(lengths):
        k[i, :, L:] = garbage(rng, k[i, :, L:].shape)
        v[i, :, L:] = garbage(rng, v[i, :, L:].shape)
        kv_pos[i, :, L:] = 0  # a causal mask alone would let these through
    return q, q_pos, k, v, kv_pos, length


# ------------------------------------------------------------------------------ hand-computed
def test_tiny_hand_computed():
    # 1 row, 1 head, D = 2, two keys at positions 0 and 1; scale 1/sqrt(2).
    #   q = [sqrt(2) ln 3, 0];  k0 = [1, 0] -> q.k0 / sqrt(2) = ln 3;  k1 = [0, 1] -> 0
    #   softmax([ln 3, 0]) = [3/4, 1/4];  v0 = [4, 0], v1 = [0, 8]
    #   query at position 1 sees both:  3/4 * [4, 0] + 1/4 * [0, 8] = [3, 2]
    #   query at position 0 sees k0 only (k1 is in its future): [4, 0]
    q = np.array([[[[np.sqrt(2) * np.log(3), 0.0]], [[np.sqrt(2) * np.log(3), 0.0]]]], np.float32)  # [1,2,1,2]
    k = np.array([[[[1.0, 0.0], [0.0, 1.0]]]], np.float32)  # [1, 1, 2, 2]
    v = np.array([[[[4.0, 0.0], [0.0, 8.0]]]], np.float32)
    out = attention(jnp.asarray(q), jnp.array([[1, 0]]), jnp.asarray(k), jnp.asarray(v),
                              jnp.array([[[0, 1]]]), jnp.array([2]))
    np.testing.assert_allclose(np.asarray(out)[0, :, 0], [[3.0, 2.0], [4.0, 0.0]], rtol=1e-6)


def test_query_that_sees_nothing_gives_zero():
    q, _, k, v, kv_pos, length = random_case(0, lengths=(29, 7))
    kv_pos = kv_pos + 100  # every stored key lies in the future of every query
    out = np.asarray(attention(jnp.asarray(q), jnp.zeros((2, 5), jnp.int32), jnp.asarray(k),
                                         jnp.asarray(v), jnp.asarray(kv_pos), jnp.asarray(length)))
    assert np.all(out == 0)


# ----------------------------------------------------------------------------- vs the reference
@pytest.mark.parametrize("n_kv", [4, 2, 1])  # group sizes G = 1, 2, 4
@pytest.mark.parametrize("block", [None, 8, 32, 64])  # one pass; 4 blocks; block == S; block > S
def test_blockwise_matches_naive(n_kv, block):
    q, q_pos, k, v, kv_pos, length = random_case(n_kv, n_kv=n_kv, lengths=(29, 7))
    out = attention(jnp.asarray(q), jnp.asarray(q_pos), jnp.asarray(k), jnp.asarray(v),
                    jnp.asarray(kv_pos), jnp.asarray(length), block=block)
    out = np.asarray(out)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, naive_attention(q, q_pos, k, v, kv_pos, length), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("block", [None, 4])
def test_blockwise_slots_out_of_position_order(block):
    # after eviction a slot's position need not equal its index; visibility follows kv_pos only
    q, _, k, v, kv_pos, length = random_case(7, t=6, lengths=(32, 13), shuffle_pos=True)
    q_pos = np.array([[0, 3, 9, 17, 30, 31], [2, 2, 5, 8, 11, 40]], np.int32)
    out = np.asarray(attention(jnp.asarray(q), jnp.asarray(q_pos), jnp.asarray(k), jnp.asarray(v),
                               jnp.asarray(kv_pos), jnp.asarray(length), block=block))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, naive_attention(q, q_pos, k, v, kv_pos, length), atol=2e-6, rtol=1e-5)


def test_blockwise_under_jit_and_bfloat16():
    q, q_pos, k, v, kv_pos, length = random_case(3, lengths=(20, 32))
    args = [jnp.asarray(q, jnp.bfloat16), jnp.asarray(q_pos), jnp.asarray(k, jnp.bfloat16),
            jnp.asarray(v, jnp.bfloat16), jnp.asarray(kv_pos), jnp.asarray(length)]
    out = attention(*args, block=8)
    assert out.dtype == jnp.bfloat16
    ref = naive_attention(*(np.asarray(a.astype(jnp.float32)) if a.dtype == jnp.bfloat16 else a for a in args))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("block", [12, 20])  # 32 slots: the last block overlaps the one before it
def test_block_that_does_not_divide_capacity(block):
    q, q_pos, k, v, kv_pos, length = random_case(0, lengths=(29, 31))
    out = np.asarray(attention(jnp.asarray(q), jnp.asarray(q_pos), jnp.asarray(k), jnp.asarray(v),
                               jnp.asarray(kv_pos), jnp.asarray(length), block=block))
    np.testing.assert_allclose(out, naive_attention(q, q_pos, k, v, kv_pos, length), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("block", [None, 8, 12])
def test_column_sums_match_full_softmax(block):
    from kvjax.attention import attention_column_sums
    from kvjax.kernels import attention_column_sums_reference
    q, q_pos, k, v, kv_pos, length = (jnp.asarray(x) for x in random_case(5, lengths=(29, 31)))
    valid = jnp.array([[True] * 5, [True, True, False, True, True]])
    _, lse = blockwise_attention(q, q_pos, k, v, kv_pos, length, block, return_lse=True)
    col = attention_column_sums(q, q_pos, valid, k, kv_pos, length, lse, block)
    ref = attention_column_sums_reference(q, q_pos, valid, k, kv_pos, length)
    np.testing.assert_allclose(np.asarray(col), np.asarray(ref), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- DenseKV
def test_append_writes_at_each_rows_length():
    b, n_kv, s, d = 2, 2, 12, 4
    state = DenseKV.init(b, n_kv, s, d, jnp.float32)
    k0 = jnp.arange(b * n_kv * 5 * d, dtype=jnp.float32).reshape(b, n_kv, 5, d) + 1
    state = state.append(k0, -k0, jnp.tile(jnp.arange(5), (b, 1)), jnp.array([2, 5]))
    np.testing.assert_array_equal(state.length, [2, 5])

    new = 1000 + jnp.arange(b * n_kv * 3 * d, dtype=jnp.float32).reshape(b, n_kv, 3, d)
    pos = jnp.array([[2, 3, 4], [5, 6, 7]], jnp.int32)
    out = jax.jit(DenseKV.append)(state, new, 2 * new, pos, jnp.array([3, 1]))
    np.testing.assert_array_equal(out.length, [5, 6])  # += n_valid, not += T
    k, v, p = np.asarray(out.k), np.asarray(out.v), np.asarray(out.pos)
    # row 0: slots [0, 2) kept, new tokens in [2, 5); row 1: slots [0, 5) kept, new tokens in [5, 8)
    np.testing.assert_array_equal(k[0, :, :2], np.asarray(k0)[0, :, :2])
    np.testing.assert_array_equal(k[0, :, 2:5], np.asarray(new)[0])
    np.testing.assert_array_equal(v[0, :, 2:5], 2 * np.asarray(new)[0])
    np.testing.assert_array_equal(k[1, :, :5], np.asarray(k0)[1])
    np.testing.assert_array_equal(k[1, :, 5:8], np.asarray(new)[1])
    np.testing.assert_array_equal(p[0, :, 2:5], [[2, 3, 4]] * n_kv)  # positions broadcast over K
    np.testing.assert_array_equal(p[1, :, 5:8], [[5, 6, 7]] * n_kv)
    # untouched slots keep their old contents
    np.testing.assert_array_equal(k[0, :, 5:], np.asarray(state.k)[0, :, 5:])
    np.testing.assert_array_equal(p[1, :, 8:], EMPTY_POS)


def test_padding_slots_never_affect_attention():
    # Prefill-like append with right padding: row 1 has 2 real tokens out of T = 4. Afterwards the
    # padding slots (and every slot past `length`) get garbage with position 0: output must not change.
    rng = np.random.default_rng(0)
    b, n_kv, h, s, d, t = 2, 2, 4, 16, 8, 4
    state = DenseKV.init(b, n_kv, s, d, jnp.float32)
    k_new = jnp.asarray(rng.normal(size=(b, n_kv, t, d)), jnp.float32)
    v_new = jnp.asarray(rng.normal(size=(b, n_kv, t, d)), jnp.float32)
    state = state.append(k_new, v_new, jnp.tile(jnp.arange(t), (b, 1)), jnp.array([4, 2]))
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    q_pos = jnp.tile(jnp.arange(t), (b, 1))
    clean = np.asarray(state.attend(q, q_pos))

    used = np.arange(s)[None, None, :] < np.asarray(state.length)[:, None, None]  # [B, 1, S]
    junk = jnp.asarray(garbage(rng, state.k.shape))
    poisoned = DenseKV(k=jnp.where(used[..., None], state.k, junk), v=jnp.where(used[..., None], state.v, -junk),
                       pos=jnp.where(used, state.pos, 0), length=state.length)
    for block in (None, 4):
        out = np.asarray(jax.jit(DenseKV.attend, static_argnames="block")(poisoned, q, q_pos, block=block))
        np.testing.assert_allclose(out, clean, rtol=1e-6, atol=1e-6, err_msg=f"padding read (block={block})")
    ref = naive_attention(q, q_pos, state.k, state.v, state.pos, state.length)
    np.testing.assert_allclose(clean, ref, atol=2e-6, rtol=1e-5)


def test_nbytes_formula_and_abstract():
    b, n_kv, s, d, n_layers = 3, 2, 40, 8, 4
    for dtype, item in ((jnp.float32, 4), (jnp.bfloat16, 2)):
        state = DenseKV.init(b, n_kv, s, d, dtype)
        per_layer = 2 * b * n_kv * s * d * item + b * n_kv * s * 4 + b * 4  # k, v, pos int32, length int32
        assert state.nbytes() == tree_nbytes(state) == per_layer
        assert tree_nbytes(DenseKV.abstract(b, n_kv, s, d, dtype)) == per_layer
        assert isinstance(DenseKV.abstract(b, n_kv, s, d, dtype).k, jax.ShapeDtypeStruct)
        cache = init_cache(n_layers, b, n_kv, s, d, dtype)
        abstract = jax.eval_shape(lambda: init_cache(n_layers, b, n_kv, s, d, dtype))  # noqa: B023
        assert cache_nbytes(cache) == tree_nbytes(abstract) == n_layers * per_layer + b * 4  # + next_pos
        assert kvjax.cache_nbytes(cache) == sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))


def test_with_capacity_pads_and_refuses_shrinking():
    state = DenseKV.init(2, 2, 8, 4, jnp.float32)
    state = state.append(jnp.ones((2, 2, 8, 4)), 2 * jnp.ones((2, 2, 8, 4)), jnp.tile(jnp.arange(8), (2, 1)),
                         jnp.array([8, 5]))
    grown = state.with_capacity(24)
    assert grown.capacity == 24 and grown.k.shape == (2, 2, 24, 4) and grown.pos.shape == (2, 2, 24)
    np.testing.assert_array_equal(grown.k[:, :, :8], state.k)
    np.testing.assert_array_equal(grown.v[:, :, :8], state.v)
    np.testing.assert_array_equal(grown.pos[:, :, :8], state.pos)
    assert np.all(np.asarray(grown.k[:, :, 8:]) == 0) and np.all(np.asarray(grown.v[:, :, 8:]) == 0)
    assert np.all(np.asarray(grown.pos[:, :, 8:]) == EMPTY_POS)
    np.testing.assert_array_equal(grown.length, [8, 5])
    assert state.with_capacity(8) is state
    with pytest.raises(ValueError, match="shrink"):
        state.with_capacity(7)

    cache = KVCache(layers=(state, state.with_capacity(16)), next_pos=jnp.array([8, 5]))
    assert cache.capacity == 8 and cache.batch == 2
    # with_room: each layer gets n free slots past its longest row (lengths [8, 5]), rounded up
    assert [l.capacity for l in cache.with_room(3).layers] == [11, 16]
    assert [l.capacity for l in cache.with_room(3, lambda c: 32).layers] == [32, 32]
    assert [l.capacity for l in cache.with_room(0).layers] == [8, 16]


def test_kept_positions():
    cache = init_cache(2, 2, 2, 8, 4, jnp.float32)
    state = cache.layers[0].append(jnp.ones((2, 2, 3, 4)), jnp.ones((2, 2, 3, 4)),
                                   jnp.array([[7, 2, 5], [0, 1, 2]]), jnp.array([3, 3]))
    kept = kept_positions(KVCache(layers=(state, state), next_pos=jnp.array([3, 3])))
    assert len(kept) == 2
    np.testing.assert_array_equal(kept[0], [[[2, 5, 7]] * 2, [[0, 1, 2]] * 2])  # sorted, per row and head
    assert kept[0].shape == (2, 2, 3)
    ragged = cache.layers[0].append(jnp.ones((2, 2, 3, 4)), jnp.ones((2, 2, 3, 4)),
                                    jnp.array([[0, 1, 2], [0, 1, 2]]), jnp.array([3, 2]))
    with pytest.raises(ValueError, match="different numbers"):
        kept_positions(KVCache(layers=(ragged,), next_pos=jnp.array([3, 2])))
