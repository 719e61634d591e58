"""`PagedKV` (a page pool, page tables per row and KV head, free-page accounting) and its Pallas kernel.

Hand-computable cases on tiny shapes: which pages each head takes and gives back, that a freed page
goes to another row, compaction past the fragmentation threshold, score-method / Ada-KV / rolling
eviction against an independent float64 reference over exactly the tokens kept, the kernel against
its jnp reference (GPU and TPU variants in the interpreter, compiled on a GPU/TPU), the GPU/TPU
lowering, and the page-size errors.

Legend: B batch, K KV heads, G = H/K, D head dim, N tokens, P page size.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import KernelCase, close, normal
from kvjax.kernels import lowering, paged_decode_attention, paged_decode_attention_reference
from kvjax.methods.adakv import AdaKV
from kvjax.methods.knorm import Knorm
from kvjax.models.family import model_for
from kvjax.states import EMPTY_POS, DenseKV, KVCache, PagedKV, RollingKV, init_cache
from kvjax.states.paged import check_paged
from kvjax.testing import random_ids, tiny_lm

F32, I32 = jnp.float32, jnp.int32
D, G = 16, 2


def tokens(b, n_kv, n, seed=0):
    rng = np.random.default_rng(seed)
    k, v = (jnp.asarray(rng.normal(size=(b, n_kv, n, D)), F32) for _ in range(2))
    q = jnp.asarray(rng.normal(size=(b, 1, n_kv * G, D)), F32)
    return k, v, q


def reference(q, q_pos, k, v, held):
    """float64 attention of q [B, 1, H, D] over the tokens `held` bool [B, K, N] of k, v [B, K, N, D]
    (token i has position i)."""
    q, k, v, held = (np.asarray(x, np.float64) for x in (q, k, v, held))
    b, _, h, d = q.shape
    out = np.zeros((b, 1, h, d))
    for r in range(b):
        for hh in range(h):
            kh = hh // G
            seen = (held[r, kh] > 0) & (np.arange(k.shape[2]) <= np.asarray(q_pos)[r, 0])
            s = k[r, kh][seen] @ q[r, 0, hh] / np.sqrt(d)
            if seen.any():
                p = np.exp(s - s.max())
                out[r, 0, hh] = p @ v[r, kh][seen] / p.sum()
    return out


append = jax.jit(PagedKV.append)
evict = jax.jit(PagedKV.evict)


@functools.partial(jax.jit, static_argnames="impl")
def attend(state, q, q_pos, impl):
    return state.attend(q, q_pos, block=8, impl=impl)


def filled(k, v, n_valid, chunk=None, **kw):
    """A PagedKV with the first n_valid[b] of k, v's tokens appended (in chunks of `chunk` tokens)."""
    b, n_kv, n, _ = k.shape
    state = PagedKV.init(b, n_kv, kw.pop("capacity", n), D, F32, **kw)
    chunk = chunk or n
    for c in range(0, n, chunk):
        pos = jnp.broadcast_to(jnp.arange(c, c + chunk, dtype=I32), (b, chunk))
        state = append(state, k[:, :, c:c + chunk], v[:, :, c:c + chunk], pos,
                       jnp.asarray(np.clip(np.asarray(n_valid) - c, 0, chunk), I32))
    return state


def check_attention(state, q, k, v, held, q_pos=None, impls=("xla",)):
    """Both attentions (`impls`: "pallas" runs the kernel in the interpreter on CPU) equal `reference`."""
    q_pos = jnp.full((q.shape[0], 1), k.shape[2], I32) if q_pos is None else q_pos
    want = reference(q, q_pos, k, v, held)
    for impl in impls:
        out = attend(state, q, q_pos, impl)
        np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5, err_msg=impl)


def held_positions(state, b, kh):
    pos = np.asarray(state.positions())[b, kh]
    return pos[pos != EMPTY_POS].tolist()


def test_rows_of_different_lengths_hold_only_the_pages_they_need():
    k, v, q = tokens(3, 2, 32)
    n_valid = np.array([32, 3, 17])
    state = filled(k, v, n_valid, chunk=8, page_size=4)  # prefill in 4 chunks, padding not written
    assert np.asarray(state.used_pages()).tolist() == [[8, 8], [1, 1], [5, 5]]
    assert int(state.pages_held()) == 2 * (8 + 1 + 5) and int(state.n_free) == state.n_pages - 28
    assert int(state.held_bytes()) == 28 * 4 * (2 * D * 4 + 4) and state.nbytes() > int(state.held_bytes())
    held = np.arange(32)[None, None, :] < n_valid[:, None, None]
    check_attention(state, q, k, v, np.broadcast_to(held, (3, 2, 32)), jnp.asarray([[32], [3], [17]], I32))
    pages = np.asarray(state.table)
    assert len(set(pages[pages >= 0].tolist())) == 28  # no page given twice


def test_eviction_frees_the_emptied_page_and_another_row_reuses_it():
    k, v, q = tokens(2, 1, 16, seed=1)
    state = filled(k, v, [12, 4], capacity=16, page_size=4, n_pages=5, threshold=1.0)
    # pages are popped in order: row 0 takes 0, 1, 2, row 1 takes 3
    assert np.asarray(state.table)[:, 0].tolist() == [[0, 1, 2, -1], [3, -1, -1, -1]]
    keep = np.ones((2, 1, 16), bool)
    keep[0, 0, 4:8] = False  # every token of row 0's page 1
    keep[0, 0, 9] = False  # one token of page 2: the page stays
    state = evict(state, jnp.asarray(keep))
    assert np.asarray(state.table)[0, 0].tolist() == [0, -1, 2, -1]
    assert int(state.n_free) == 2 and int(state.free[1]) == 1  # page 1 on top of the stack
    assert held_positions(state, 0, 0) == [0, 1, 2, 3, 8, 10, 11]
    # row 1 appends 4 more tokens: its next page is the freed page 1
    state = append(state, k[:, :, 12:16], v[:, :, 12:16], jnp.asarray([[12, 13, 14, 15]] * 2, I32),
                         jnp.asarray([0, 4], I32))
    assert np.asarray(state.table)[1, 0].tolist() == [3, 1, -1, -1] and int(state.n_free) == 1
    held = np.zeros((2, 1, 16), bool)
    held[0, 0, [0, 1, 2, 3, 8, 10, 11]] = True
    held[1, 0, [0, 1, 2, 3, 12, 13, 14, 15]] = True
    check_attention(state, q, k, v, held, jnp.asarray([[16], [16]], I32), impls=("xla", "pallas"))


@pytest.mark.parametrize("threshold,table,n_free", [(0.25, [0, 1, -1, -1], 2), (1.0, [0, 1, 2, -1], 1)])
def test_compaction_past_the_fragmentation_threshold(threshold, table, n_free):
    k, v, q = tokens(1, 1, 16, seed=2)
    state = filled(k, v, [12], page_size=4, n_pages=4, threshold=threshold)
    keep = jnp.asarray((np.arange(16) % 2 == 0)[None, None])  # every other token: 6 left in 3 pages
    state = evict(state, keep)
    # fragmentation 1 - 6 / 12 = 0.5: above 0.25 the 6 tokens pack into pages 0 and 1, page 2 is freed
    assert np.asarray(state.table)[0, 0].tolist() == table and int(state.n_free) == n_free
    assert held_positions(state, 0, 0) == [0, 2, 4, 6, 8, 10]
    assert int(state.fill[0, 0]) == (6 if threshold < 0.5 else 11) and int(state.length[0, 0]) == 6
    check_attention(state, q, k, v, np.asarray(keep) & (np.arange(16) < 12))
    state = append(state, k[:, :, 12:13], v[:, :, 12:13], jnp.asarray([[12]], I32),
                                       jnp.asarray([1], I32))
    check_attention(state, q, k, v, np.asarray(keep) & (np.arange(16) < 13), jnp.asarray([[13]], I32))


def test_a_score_method_and_adakv_evict_to_pages():
    """Knorm's scores on the logical view; per-head top-k (one budget) and Ada-KV's pairs (per-head
    budgets, the same kept sets as `AdaKV.select` on a dense state)."""
    b, n_kv, n = 2, 2, 24
    k, v, q = tokens(b, n_kv, n, seed=3)
    state = filled(k, v, [n, n], page_size=4, threshold=0.0)
    lk, lv, lpos = state.logical()
    used = (lpos != EMPTY_POS).any(1)
    scores = Knorm().score(DenseKV(k=lk, v=lv, pos=lpos, length=used.sum(-1)))
    top = jax.jit(lambda s, sc: s.keep_top(sc, jnp.asarray([12, 6], I32)))(state, scores)
    kept = evict(state, top)
    assert np.asarray(kept.length).tolist() == [[12, 12], [6, 6]]
    assert int(kept.pages_held()) == 2 * 3 + 2 * 2  # threshold 0: every head packed into ceil(n / P) pages
    check_attention(kept, q, k, v, np.asarray(top)[..., :n])
    pairs = jax.jit(lambda s, sc: s.keep_top_pairs(sc, jnp.asarray([12, 6], I32)))(state, scores)
    ada = evict(state, pairs)
    dense = DenseKV(k=k, v=v, pos=jnp.broadcast_to(jnp.arange(n, dtype=I32), (b, n_kv, n)), length=jnp.full((b,), n, I32))
    ragged = AdaKV(press=Knorm()).select(None, dense, scores[..., :n], jnp.asarray([12, 6], I32), n)
    for r in range(b):
        for kh in range(n_kv):
            s, ln = int(ragged.start[r, kh]), int(ragged.length[r, kh])
            assert held_positions(ada, r, kh) == sorted(np.asarray(ragged.pos)[r, s:s + ln].tolist())
    length = np.asarray(ada.length)
    assert int(ada.pages_held()) == int(np.sum(-(-length // 4))) and length[0, 0] != length[0, 1]
    check_attention(ada, q, k, v, np.asarray(pairs)[..., :n])


def test_decode_time_rolling_frees_the_window_pages():
    """Streaming with 2 sinks and a capacity of 8 over 40 one-token steps: the held pages stay bounded
    and every freed page is reused; the held tokens are the sinks and the 6 newest."""
    n, cap = 40, 8
    k, v, q = tokens(2, 1, n, seed=4)
    state = PagedKV.init(2, 1, n, D, F32, page_size=4, n_pages=8, threshold=0.5)

    def step(i, carry):  # 9 tokens after an append: the sink page and 7 in a row span at most 4 pages
        st, room = carry
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i, 1, axis=2)  # noqa: E731
        room = room & st.has_room(1)
        st = st.append(sl(k), sl(v), jnp.full((2, 1), i, I32), jnp.ones((2,), I32))
        return st.roll(cap, n_sink=2), room

    state, room = jax.jit(lambda s: jax.lax.fori_loop(0, n, step, (s, jnp.asarray(True))))(state)
    assert bool(room)
    want = [0, 1] + list(range(n - 6, n))
    assert held_positions(state, 0, 0) == want and held_positions(state, 1, 0) == want
    assert int(state.pages_held()) <= 2 * 4  # 8 tokens in at most 4 pages per row, 40 tokens appended
    held = np.isin(np.arange(n), want)[None, None].repeat(2, 0)
    check_attention(state, q, k, v, held, jnp.full((2, 1), n, I32))


@pytest.mark.slow
def test_generate_on_a_paged_cache_gives_the_dense_tokens():
    """`LM.generate` on an empty paged cache (prompts of 20 and 7 tokens, chunked prefill, the decode
    loop) gives the dense cache's greedy tokens, with the plain-jnp attention and the Pallas kernel
    (interpreted), each row holding only its pages. Slow (~17 s of CPU, three generate compiles): the
    fast tests check append and attention state by state."""
    lm = tiny_lm(head_dim=16)  # the kernels take head dims of 16 and up
    cfg = lm.cfg
    ids = [random_ids(20, seed=3).tolist(), random_ids(7, seed=4).tolist()]
    want = lm.generate(ids, max_new_tokens=8, stop_at_eos=False).ids
    for impl in ("xla", "pallas"):
        cache = KVCache(layers=tuple(PagedKV.init(2, cfg.n_kv_heads, 64, cfg.head_dim, F32, page_size=4)
                                     for _ in range(cfg.n_layers)), next_pos=jnp.zeros((2,), I32))
        out = lm.generate(ids, max_new_tokens=8, stop_at_eos=False, cache=cache, attention_impl=impl)
        assert out.ids == want, impl
        # 27 and 14 tokens held (the last new token is not fed back): 7 + 4 pages per KV head
        assert [int(layer.pages_held()) for layer in out.cache.layers] == [2 * (7 + 4)] * cfg.n_layers


@pytest.mark.slow
def test_the_model_on_a_paged_cache_equals_the_dense_cache_through_eviction():
    """The tiny model prefills two rows of different lengths into pages, decodes, evicts each layer by
    Knorm (the same scores and kept sets as `DenseKV.keep_top`) and decodes on: the logits equal the
    dense cache's at every step. Slow (~10 s of CPU, four model compiles): the fast tests above check
    the same append, attend and eviction against the float64 reference state by state."""
    lm = tiny_lm()
    cfg, b, n, cap = lm.cfg, 2, 12, 24
    model = model_for(cfg)(cfg)
    n_valid = jnp.asarray([12, 5], I32)
    ids = jnp.asarray(random_ids(b * n, seed=5).reshape(b, n), I32)
    dense = init_cache(cfg.n_layers, b, cfg.n_kv_heads, cap, cfg.head_dim, F32)
    paged = KVCache(layers=tuple(PagedKV.init(b, cfg.n_kv_heads, cap, cfg.head_dim, F32, page_size=4)
                                 for _ in range(cfg.n_layers)), next_pos=jnp.zeros((b,), I32))
    run = jax.jit(lambda c, t, p, nv: model.apply({"params": lm.params}, t, p, c, nv, logits_at=nv - 1))

    def step(caches, tok):
        pos = caches[0].next_pos[:, None]
        outs = [run(c, tok, pos, jnp.ones((b,), I32)) for c in caches]
        np.testing.assert_allclose(np.asarray(outs[1][0]), np.asarray(outs[0][0]), atol=1e-5, rtol=1e-5)
        return [o[1] for o in outs], jnp.argmax(outs[0][0], -1)[:, None].astype(I32)

    pos = jnp.broadcast_to(jnp.arange(n, dtype=I32), (b, n))
    (ld, dense), (lp, paged) = (run(c, ids, pos, n_valid) for c in (dense, paged))
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ld), atol=1e-5, rtol=1e-5)
    caches, tok = step([dense, paged], jnp.argmax(ld, -1)[:, None].astype(I32))
    keep = jnp.asarray([6, 3], I32)
    layers_d, layers_p = [], []

    @jax.jit
    def evict_both(ds, ps):
        scores = Knorm().score(ds)  # slots in the same order in both: no holes yet
        used = jnp.arange(cap) < ds.length[:, None, None]
        return ds.keep_top(scores, keep, cap), ps.evict(ps.keep_top(jnp.where(used, scores, -jnp.inf), keep))

    for ds, ps in zip(caches[0].layers, caches[1].layers):
        kept_d, kept_p = evict_both(ds, ps)
        layers_d.append(kept_d)
        layers_p.append(kept_p)
        assert int(layers_p[-1].pages_held()) == 2 * (2 + 1)  # 6 and 3 tokens per head in pages of 4
    caches = [dataclasses.replace(c, layers=tuple(ls)) for c, ls in zip(caches, (layers_d, layers_p))]
    for _ in range(2):
        caches, tok = step(caches, tok)


@pytest.mark.parametrize("rule,recent", [("h2o", 2), ("tova", 0)])
def test_scored_rolling_evicts_as_rolling_kv(rule, recent):
    """H2O and TOVA over 24 one-token steps with a capacity of 8: after every step the pages hold the
    same tokens as `RollingKV` with the same rule, queries and scores, and attention agrees."""
    b, n_kv, n, cap = 2, 2, 24, 8
    k, v, _ = tokens(b, n_kv, n, seed=6)
    qs = jnp.asarray(np.random.default_rng(7).normal(size=(n, b, 1, n_kv * G, D)), F32)
    # 9 tokens per head after an append, in at most 9 / (4 x (1 - 0.5)) -> 5 pages below the threshold
    paged = PagedKV.init(b, n_kv, n, D, F32, page_size=4, n_pages=20, threshold=0.5, rule=rule)
    rolling = RollingKV.init(b, n_kv, cap, D, F32, rule, 0, recent)

    @jax.jit
    def run(paged, rolling):
        def step(i, carry):
            pg, rl, _ = carry
            sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i, 1, axis=2)  # noqa: E731
            pos, one = jnp.full((b, 1), i, I32), jnp.ones((b,), I32)
            room = pg.has_room(1)
            pg = pg.append(sl(k), sl(v), pos, one).roll(cap, recent=recent)
            rl = rl.append(sl(k), sl(v), pos, one)
            same = jnp.array_equal(jnp.sort(pg.positions(), -1)[..., :cap], jnp.sort(rl.pos, -1))
            q = qs[i]
            return pg.observe_query(q, pos), rl.observe_query(q, pos), carry[2] & same & room
        return jax.lax.fori_loop(0, n, step, (paged, rolling, jnp.asarray(True)))

    paged, rolling, same = run(paged, rolling)
    assert bool(same)
    assert int(paged.pages_held()) <= 20 and np.asarray(paged.length).tolist() == [[cap] * n_kv] * b
    q, q_pos = qs[-1], jnp.full((b, 1), n, I32)
    np.testing.assert_allclose(np.asarray(attend(paged, q, q_pos, "xla")), np.asarray(rolling.attend(q, q_pos)),
                               atol=2e-5, rtol=2e-5)


def test_append_without_room_writes_nothing_and_with_room_grows_the_pool():
    """A head with no free page (or no table entry) left: `has_room` is false and `append` writes
    nothing (before, the stack underflowed and a page in use was handed out again); `with_room` grows the
    pool and the tables host-side, and the append then lands in a new page. `shrunk` cuts the pool back
    to the pages held plus the room."""
    k, v, q = tokens(2, 1, 16, seed=8)
    state = filled(k, v, [4, 4], capacity=8, page_size=4, n_pages=2)  # both pages taken
    assert int(state.n_free) == 0 and not bool(state.has_room(1))
    one = lambda s, i, n_valid: append(s, k[:, :, i:i + 1], v[:, :, i:i + 1], jnp.full((2, 1), i, I32),  # noqa: E731
                                       jnp.asarray(n_valid, I32))
    same = one(state, 4, [1, 0])
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert bool(state.has_room(jnp.asarray([0, 0], I32)))  # per-row counts: nothing needs no page
    grown = state.with_room(6)
    assert grown.n_pages == 2 + 2 * 2 and grown.table.shape[2] == 3  # 10 tokens: 3 pages of 4 per row
    assert bool(grown.has_room(6)) and grown.with_room(6) is grown
    grown = one(one(grown, 4, [1, 1]), 5, [1, 0])
    held = np.zeros((2, 1, 16), bool)
    held[0, 0, :6] = held[1, 0, :5] = True
    check_attention(grown, q, k, v, held, jnp.asarray([[16], [16]], I32))
    # no table entry left (a full table, free pages in the pool): nothing written either
    full = filled(k, v, [8, 8], capacity=8, page_size=4, n_pages=6)
    assert int(full.n_free) == 2 and not bool(full.has_room(1))
    assert np.asarray(one(full, 8, [1, 1]).fill).tolist() == [[8], [8]]
    # after an eviction, `shrunk` keeps the pages held and the pages 5 more tokens per head open: row 0
    # keeps slots 4, 5 (its first page freed, fill 6 -> 11: one page more), row 1 fills 5 -> 10: one more
    keep = np.ones((2, 1, 12), bool)
    keep[0, 0, :4] = False
    cut = evict(grown, jnp.asarray(keep)).shrunk(0, 5)
    assert int(cut.pages_held()) == 1 + 2 and cut.n_pages == 3 + 1 + 1 and cut.table.shape[2] == 3
    held[0, 0, :4] = False
    check_attention(cut, q, k, v, held, jnp.asarray([[16], [16]], I32))


@pytest.mark.parametrize("method", ["knorm", "adakv:knorm"])
def test_generate_on_the_paged_layout_gives_the_padded_layout_tokens(method):
    """`LM.generate(layout="paged")`: prompts of 40 and 9 tokens prefilled onto pages, evicted by a score
    method (per-head top-k, or Ada-KV's per-head budgets) at ratio 0.5, the emptied pages leaving the
    pool, then decoded: the same greedy tokens as the padded dense / ragged cache. Each head holds the
    pages its tokens fill (at least ceil(tokens / P); more only below the compaction threshold), the
    short row fewer than the long one, and the pool only the pages held after eviction and the decode room."""
    lm = tiny_lm()
    ids = [random_ids(40, seed=3).tolist(), random_ids(9, seed=4).tolist()]
    kw = dict(method=method, ratio=0.5, max_new_tokens=6, stop_at_eos=False)
    want = lm.generate(ids, **kw)
    out = lm.generate(ids, layout="paged", page_size=4, **kw)
    assert out.ids == want.ids
    for layer in out.cache.layers:
        length, table = np.asarray(layer.length), np.asarray(layer.table)
        pages = (table >= 0).sum(-1)  # [B, K] pages each head holds, each page once
        assert isinstance(layer, PagedKV) and int(layer.pages_held()) == pages.sum() == len(set(table[table >= 0]))
        assert np.all(pages >= -(-length // 4)) and pages[1].sum() < pages[0].sum()  # 20 + 5 tokens against 4 + 5
        assert layer.n_pages < 2 * lm.cfg.n_kv_heads * layer.table.shape[2]  # less than a padded pool
    assert out.cache_bytes < want.cache_bytes or method.startswith("adakv")


def test_paged_layout_requests_that_do_not_apply_are_refused_before_compiling():
    lm = tiny_lm()
    ids = random_ids(40, seed=3).tolist()
    cases = [
        (dict(layout="pages"), "layout must be None (the model's own) or 'paged'"),
        (dict(layout="paged", page_size=24), "page size 24 does not tile the kernel's block"),
        (dict(layout="paged", method="knorm", ratio=0.5, quant="int8"), "quantization does not apply to a paged"),
        (dict(layout="paged", method="streaming_llm", capacity=16), "capacity= (decode-time eviction) does not"),
        (dict(layout="paged", method="chunkkv:knorm", ratio=0.5),
         "method 'chunkkv:knorm' (it selects or builds its own layout)"),
        (dict(layout="paged", method="knorm", ratio=0.5, chunked_compression=16), "chunked compression does not"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            lm.generate(ids, max_new_tokens=2, **kw)
    with pytest.raises(ValueError, match="this model has sliding-window layers"):
        check_paged(types.SimpleNamespace(kv_layout="dense", windows=(4, None)), 16)
    with pytest.raises(ValueError, match="this model has a mla cache"):
        check_paged(types.SimpleNamespace(kv_layout="mla"), 16)
    with pytest.raises(ValueError, match="the given cache's layout is used"):
        lm.generate(ids, cache=init_cache(2, 1, 2, 64, 8, F32), layout="paged")


def test_page_sizes_that_do_not_tile_the_block_are_refused():
    with pytest.raises(ValueError, match="page size 24 does not tile the kernel's block"):
        PagedKV.init(1, 1, 64, D, F32, page_size=24)
    with pytest.raises(ValueError, match="decode-time rule must be one of"):
        PagedKV.init(1, 1, 64, D, F32, rule="lru")
    with pytest.raises(ValueError, match="threshold must be in"):
        PagedKV.init(1, 1, 64, D, F32, page_size=16, threshold=2.0)
    q, k, pos = jnp.zeros((1, 1, 2, 64)), jnp.zeros((4, 16, 64)), jnp.zeros((4, 16), I32)
    args = (q, k, k, pos, jnp.zeros((1, 1, 4), I32), jnp.ones((1, 1), I32), jnp.zeros((1, 1), I32))
    with pytest.raises(ValueError, match=r"page size 16 does not tile the kernel's block of 40 slots.*xla"):
        paged_decode_attention(*args, block_k=40, interpret=True)
    small = (q, k[:, :8], k[:, :8], pos[:, :8]) + args[4:]
    with lowering.target("gpu"), pytest.raises(ValueError, match=r"page size 8 does not tile.*>= 16 on gpu"):
        lowering.lower(paged_decode_attention, *small)


class PagedCases(KernelCase):
    @pytest.mark.parametrize("group,block_k,dtype", [(1, 16, jnp.float32), (8, 64, jnp.bfloat16)])
    def test_matches_reference(self, group, block_k, dtype):
        rng = np.random.default_rng(group)
        n_pages, page, d = 12, 16, 32
        k, v = (normal(rng, (n_pages, page, d), dtype) for _ in range(2))
        pos = jnp.asarray(rng.integers(0, 100, size=(n_pages, page)), I32)
        pos = pos.at[5, 7:].set(EMPTY_POS)  # holes inside a page
        # freed entries (-1) among used ones, an empty head, entries past `used` not read
        table = jnp.asarray([[[3, -1, 5, 0], [1, 2, -1, -1]], [[4, 6, 7, 8], [9, 10, 11, -1]]], I32)
        used = jnp.asarray([[3, 2], [4, 0]], I32)
        q = normal(rng, (2, 2, 2 * group, d), dtype)
        q_pos = jnp.asarray([[60, 99], [30, 90]], I32)
        out = paged_decode_attention(q, k, v, pos, table, used, q_pos, block_k=block_k, n_splits=2,
                                     interpret=self.INTERPRET)
        close(out, paged_decode_attention_reference(q, k, v, pos, table, used, q_pos), dtype)
        assert not np.any(np.asarray(out[1, :, group:], np.float32))  # the empty head gives zeros


class TestPaged(PagedCases):
    INTERPRET = False


class TestPagedInterpret(PagedCases):
    INTERPRET = True


class TestPagedTpuInterpret(PagedCases):
    INTERPRET = True
    TARGET = "tpu"


@pytest.mark.parametrize("platform,kind,dtype,page", [("gpu", None, jnp.float32, 16), ("gpu", None, jnp.bfloat16, 64),
                                                     ("tpu", None, jnp.bfloat16, 16), ("tpu", "TPU v6 lite", jnp.float32, 64)])
def test_lowers_for_gpu_and_tpu(platform, kind, dtype, page):
    """The kernel lowers for GPU (Triton, MLIR-verified) and TPU (Mosaic), pages of 16 and 64 slots."""
    S = jax.ShapeDtypeStruct
    pool = S((300, page, 64), dtype)
    args = (S((2, 1, 6, 64), dtype), pool, pool, S((300, page), I32), S((2, 2, 40), I32), S((2, 2), I32),
            S((2, 1), I32))
    with lowering.target(platform, kind):
        text = lowering.lower(paged_decode_attention, *args).mlir_module()
    assert {"gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[platform] in text
    assert "kvjax_paged_decode_attention" in text
