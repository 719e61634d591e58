"""kvpress 0.5.5 breadth, second part: SimLayerKV and FINCH on hand-computed cases (the arithmetic in comments),
their bad input, and each end to end on the tiny model. Parity on the real model: `test_kvpress_parity.py`.

Legend: B batch, K KV heads, G query heads per KV head, H = K*G, S slots, D head dim, T tokens.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import methods
from kvjax.methods import Budget
from kvjax.methods.finch import Finch
from kvjax.methods.simlayerkv import SimLayerKV
from kvjax.states import DenseKV
from kvjax.testing import random_ids, tiny_lm
from kvjax.timing import compile_seconds
from test_methods import make_ctx, make_obs


def weighted_case(w, g=1, length=None):
    """1 row, K = 1, D = 2: key j = [ln w_j, 0] and one window query [sqrt(2), 0] at the last position, so
    (scores q.k / sqrt(2)) the query's attention is w_j / sum(w) over the keys it sees."""
    t = len(w)
    s = t + 2
    k = np.zeros((1, 1, s, 2))
    k[0, 0, :t, 0] = np.log(w)
    q = np.zeros((1, 1, g, 2))
    q[..., 0] = math.sqrt(2)
    obs = make_obs(1, g, 2, q_win=q, win_pos=[[t - 1]])
    return make_ctx(k, [length or t], g=g, obs=obs)


def kept(state) -> list[int]:
    return np.asarray(state.pos[0, 0, :int(state.length[0])]).tolist()


def run_select(method, ctx, n_keep):
    state = DenseKV(k=ctx.k, v=ctx.v, pos=ctx.pos, length=ctx.length)
    return method.select(ctx, state, method.score(ctx), jnp.asarray([n_keep], jnp.int32), ctx.k.shape[2])


# ------------------------------------------------------------------------------------------ SimLayerKV
# T = 8, w = [4, 1, 1, 1, 1, 2, 2, 4] (sum 16); n_initial 1, n_recent 3, n_last 1: kvpress drops the window
# column (slot 7), so the recent keys are slots 4, 5, 6: mass = (4 + 1 + 2 + 2) / 16 = 0.5625. A lazy layer
# keeps slot 0 and the last n_recent - n_last = 2 slots (6, 7).
W8 = [4, 1, 1, 1, 1, 2, 2, 4]


@pytest.mark.parametrize("threshold,expect", [(0.5, [0, 6, 7]), (0.6, list(range(8))), (1.0, list(range(8)))])
def test_simlayerkv_hand_computed(threshold, expect):
    m = SimLayerKV(lazy_threshold=threshold, n_recent=3, n_initial=1)
    ctx = weighted_case(W8, g=2)
    np.testing.assert_allclose(float(m.mass(ctx)[0]), 9 / 16, rtol=1e-6)
    assert bool(m.lazy(ctx)[0]) == (expect != list(range(8)))
    assert kept(run_select(m, ctx, 8)) == expect


def test_simlayerkv_short_prompt_not_compressed():
    # T = 5 <= n_initial + n_recent + n_last = 5: nothing compressed, even at threshold 0
    m = SimLayerKV(lazy_threshold=0.0, n_recent=3, n_initial=1)
    assert kept(run_select(m, weighted_case([4, 1, 1, 1, 1]), 5)) == [0, 1, 2, 3, 4]


def test_simlayerkv_end_to_end_and_bad_input():
    lm = tiny_lm()
    rows = [random_ids(21, 2).tolist()]
    full = lm.prefill(rows)
    lazy = lm.prefill(rows, method=SimLayerKV(lazy_threshold=0.0, n_recent=5, n_initial=2))  # every layer lazy
    for state, ref in zip(lazy.layers, full.layers):
        n = int(state.length[0])
        assert n == 2 + 4
        pos = np.asarray(state.pos[0, :, :n])
        np.testing.assert_array_equal(pos, np.broadcast_to([0, 1, 17, 18, 19, 20], pos.shape))
        np.testing.assert_allclose(state.k[0, :, :n], ref.k[0][:, pos[0]], rtol=1e-5, atol=1e-6)
    keep_all = lm.prefill(rows, method="simlayerkv")  # lazy_threshold 1.0: kvpress compresses nothing
    assert all(int(s.length[0]) == 21 for s in keep_all.layers)
    gen = lm.generate(rows, max_new_tokens=3, method="simlayerkv(lazy_threshold=0.0, n_recent=5)",
                      stop_at_eos=False)
    assert len(gen.ids[0]) == 3
    c0 = compile_seconds()
    for bad, match in [(lambda: SimLayerKV(lazy_threshold=1.5), "lazy_threshold"),
                       (lambda: SimLayerKV(n_recent=1, n_last=1), "exceed n_last"),
                       (lambda: SimLayerKV(n_initial=-1), "n_initial"),
                       (lambda: lm.prefill(rows, method="simlayerkv", ratio=0.5), "own compression")]:
        with pytest.raises(ValueError, match=match):
            bad()
    assert compile_seconds() == c0


# --------------------------------------------------------------------------------------------- FINCH
# T = 6, window 1 (the query at position 5), w = [1, 2, 3, 4, 2, 4] (sum 16): attention over slots 0..4 is
# [1, 2, 3, 4, 2] / 16; normalize_scores multiplies by the query's position 5: [5, 10, 15, 20, 10] / 16; the
# window slot 5 gets max + 1 = 36/16.
def test_finch_scores_hand_computed():
    ctx = weighted_case([1, 2, 3, 4, 2, 4], g=2)
    sc = np.asarray(Finch(window=1).score(ctx))[0, 0, :6]
    np.testing.assert_allclose(sc, np.array([5, 10, 15, 20, 10, 36]) / 16, rtol=1e-6)
    sc = np.asarray(Finch(window=1, normalize_scores=False).score(ctx))[0, 0, :6]
    np.testing.assert_allclose(sc, np.array([1, 2, 3, 4, 2, 20]) / 16, rtol=1e-6)


def test_finch_chunked_and_rerotated():
    # chunks of 4 at ratio 0.5: [0..3] keeps int(4 / 2) = 2 of scores [5, 10, 15, 20] -> 2, 3; [4, 5] keeps 1:
    # the window slot 5. Unchunked: the top 3 of the six -> 2, 3, 5.
    ctx = weighted_case([1, 2, 3, 4, 2, 4], g=2)
    m = Finch(window=1, chunk_length=4, rerotate=False).bind(None, ratio=0.5)
    assert m.layer_keep(Budget(ratio=0.5), 6, 0, 1) == 3
    assert kept(run_select(m, ctx, 3)) == [2, 3, 5]
    # chunks of 3: [0..2] keeps 1 (slot 2), [3..5] keeps 1 (the window, 5); T = 6 -> 2 tokens
    m3 = Finch(window=1, chunk_length=3, rerotate=False).bind(None, ratio=0.5)
    assert m3.layer_keep(Budget(ratio=0.5), 6, 0, 1) == 2
    assert kept(run_select(m3, ctx, 2)) == [2, 5]
    # with rerotate (default) the kept keys sit at positions 0, 1, 2 and are RoPE-rotated by slot - position
    rot = run_select(Finch(window=1, chunk_length=4).bind(None, ratio=0.5), ctx, 3)
    assert kept(rot) == [0, 1, 2]
    assert int(Finch(window=1).next_positions(jnp.asarray([6]), jnp.asarray([3]))[0]) == 3


def test_finch_end_to_end_and_bad_input():
    lm = tiny_lm()
    rows = [random_ids(21, 2).tolist()]
    full = lm.prefill(rows)
    cache = lm.prefill(rows, method=Finch(window=4, rerotate=False), ratio=0.5)
    for state, ref in zip(cache.layers, full.layers):
        pos = np.asarray(state.pos[0, :, :10])
        assert int(state.length[0]) == 10 and {17, 18, 19, 20} <= set(pos[0].tolist())
        np.testing.assert_allclose(state.v[0, 0, :10], ref.v[0, 0, pos[0]], rtol=1e-5, atol=1e-6)
    chunked = lm.prefill(rows, method="finch(window=4, chunk_length=10)", ratio=0.5)  # 5 + 5 + max(1, 0)
    assert [int(s.length[0]) for s in chunked.layers] == [11] * lm.cfg.n_layers
    np.testing.assert_array_equal(chunked.next_pos, [11])
    c0 = compile_seconds()
    for kw, match in [(dict(method="finch(window=4, chunk_length=6)", ratio=0.5), "chunk_length 6 must exceed"),
                      (dict(method="finch(window=4, chunk_length=10)", budget=8), "give ratio="),
                      (dict(method="finch(window=0)", ratio=0.5), "window"),
                      (dict(method="chunkkv:finch", ratio=0.5), "plain scorer")]:
        with pytest.raises(ValueError, match=match):
            lm.prefill(rows, **kw)
    assert compile_seconds() == c0
    assert methods.spec_of(Finch(window=4).bind(None, ratio=0.5)) == "finch(window=4)"


# ----------------------------------------------------------------------------------------------- DMS
def test_dms_hand_computed():
    # knorm scores -||k||: K = 2, D = 1, T = 6; head 0 norms [1, 3, 2, 5, 1, 9], head 1 [4, 4, 1, 1, 1, 1].
    # threshold -2.5, window 2: of slots 0..3, head 0 keeps -1, -2 (slots 0, 2), head 1 keeps 1, 1 (2, 3);
    # both keep the window 4, 5 whatever their scores.
    from kvjax.methods.knorm import Knorm
    from kvjax.states.ragged import RaggedKV
    k = np.zeros((1, 2, 8, 1))
    k[0, 0, :6, 0] = [1, 3, 2, 5, 1, 9]
    k[0, 1, :6, 0] = [4, 4, 1, 1, 1, 1]
    ctx = make_ctx(k, [6], g=1)
    m = methods.get("dms(threshold=-2.5, sliding_window_size=2):knorm")
    assert isinstance(m.press, Knorm) and m.name == "dms:knorm"
    state = DenseKV(k=ctx.k, v=ctx.v, pos=ctx.pos, length=ctx.length)
    out = m.select(ctx, state, m.score(ctx), jnp.asarray([6], jnp.int32), 6)
    assert isinstance(out, RaggedKV)
    np.testing.assert_array_equal(out.length, [[4, 4]])
    assert [p.tolist() for p in out.positions()] == [[[0, 2, 4, 5]], [[2, 3, 4, 5]]]


def test_dms_end_to_end_and_bad_input():
    lm = tiny_lm()
    rows = [random_ids(21, 2).tolist()]
    full = lm.prefill(rows)
    cache = lm.prefill(rows, method="dms(threshold=-1e9, sliding_window_size=4):knorm")  # nothing below: all kept
    assert all(np.asarray(s.length).tolist() == [[21] * lm.cfg.n_kv_heads] for s in cache.layers)
    cache = lm.prefill(rows, method="dms(threshold=1.0, sliding_window_size=4):knorm")  # -||k|| < 1: window only
    for state, ref in zip(cache.layers, full.layers):
        for h, pos in enumerate(state.positions()):
            assert pos[0].tolist() == [17, 18, 19, 20]
    gen = lm.generate(rows, max_new_tokens=3, method="dms(threshold=-3.0):knorm", stop_at_eos=False)
    assert len(gen.ids[0]) == 3
    c0 = compile_seconds()
    for kw, match in [(dict(method="dms:knorm"), "give threshold="),
                      (dict(method="dms(threshold=0.0):knorm", ratio=0.5), "no ratio"),
                      (dict(method="dms(threshold=0.0):kivi-4"), "wraps a scoring method"),
                      (dict(method="dms(threshold=0.0):adakv:snapkv"), "plain scorer"),
                      (dict(method="dms(threshold=0.0, sliding_window_size=-1):knorm"), "sliding_window_size")]:
        with pytest.raises(ValueError, match=match):
            lm.prefill(rows, **kw)
    assert compile_seconds() == c0


def test_kvjax_methods_lists_them(capsys):
    from kvjax.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("finch", "simlayerkv", "dms"):
        assert f"\n  {name} " in out, name


# ------------------------------------------------------------------- expected_attention_stats, qfilter
def test_expected_attention_stats_from_the_prompt_itself_is_expected_attention(tmp_path):
    # calibrated on the prompt itself, with kvpress's unbiased covariance rescaled to the biased one
    # ExpectedAttention uses (N - 1) / N, the statistics are the prompt's own: the same kept sets
    from kvjax.methods import ExpectedAttention
    from kvjax.methods import expected_attention_stats as eas
    lm = tiny_lm()
    row = random_ids(21, 2)
    stats = eas.calibrate(lm, row[None], n_sink=2)
    n = float(stats["n_tokens"])
    assert n == 21 - 2
    stats["query_cov"] = stats["query_cov"] * (n - 1) / n
    path = eas.save(tmp_path / "stats.npz", stats, lm.name)
    ours = lm.prefill([row.tolist()], method=eas.ExpectedAttentionStats(stats=str(path), n_sink=2), ratio=0.5)
    ref = lm.prefill([row.tolist()], method=ExpectedAttention(n_sink=2), ratio=0.5)
    for a, b in zip(ours.layers, ref.layers):
        np.testing.assert_array_equal(a.pos, b.pos)


def test_qfilter_filters_and_scores_hand_computed(tmp_path):
    # one layer, one head, D = 2: queries [2, 1], [2, -1]: Q^T Q = [[8, 0], [0, 2]], top eigenvector ±[1, 0],
    # mean projection on [1, 0] is +2 > 0, so the filter is -[1, 0]; score = -(f . k) = k_x
    from kvjax.methods.qfilter import QFilter, filters_from_moments
    q = np.array([[2.0, 1.0], [2.0, -1.0]])
    f = filters_from_moments(q.sum(0)[None, None], (q.T @ q)[None, None], n_kv=1)
    np.testing.assert_allclose(f, [[[-1.0, 0.0]]], atol=1e-6)
    k = np.zeros((1, 1, 4, 2))
    k[0, 0, :3] = [[3, 0], [-1, 5], [0.5, -2]]
    ctx = make_ctx(k, [3], g=1)
    np.savez(tmp_path / "f.npz", model=np.str_("tiny"), q_filters=np.concatenate([f, -f]))  # layers 0, 1
    sc = np.asarray(QFilter(filters=str(tmp_path / "f.npz")).score(ctx))[0, 0, :3]
    np.testing.assert_allclose(sc, [3, -1, 0.5], rtol=1e-6)


def test_qfilter_end_to_end_and_files_for_another_model(tmp_path):
    from kvjax.methods import expected_attention_stats as eas
    from kvjax.methods import qfilter
    lm = tiny_lm()
    rows = [random_ids(21, 2).tolist()]
    good = eas.save(tmp_path / "q.npz", qfilter.calibrate(lm, np.asarray(rows), n_sink=1), lm.name)
    cache = lm.prefill(rows, method=f"qfilter(filters={good})", ratio=0.5)
    assert [int(s.length[0]) for s in cache.layers] == [10] * lm.cfg.n_layers
    other = eas.save(tmp_path / "other.npz", qfilter.calibrate(lm, np.asarray(rows), n_sink=1), "another-model")
    wide = tmp_path / "wide.npz"
    np.savez(wide, q_filters=np.zeros((lm.cfg.n_layers, lm.cfg.n_kv_heads, 2 * lm.cfg.head_dim), np.float32))
    c0 = compile_seconds()
    for spec, match in [(f"qfilter(filters={other})", "calibrated on another-model, not"),
                        (f"qfilter(filters={wide})", "a file for another model"),
                        (f"qfilter(filters={tmp_path / 'none.npz'})", "kvjax calibrate qfilter"),
                        ("qfilter", "needs filters="),
                        (f"expected_attention_stats(stats={good})", "holds query_mean of shape None"),
                        ("expected_attention_stats", "needs stats=")]:
        with pytest.raises(ValueError, match=match) as e:
            lm.prefill(rows, method=spec, ratio=0.5)
        assert "\n" not in str(e.value)
    assert compile_seconds() == c0


# ---------------------------------------------------------------------------------------------- LU-KV
def test_lukv_head_keeps_hand_computed():
    # T = 10, prune ratios [0.25, 0.55, 0.5]: ideal keeps 7.5, 4.5, 5 (sum 17); floors 7, 4, 5 (16): one more
    # to the largest fractional part (7.5 first, a stable tie with 4.5) -> 8, 4, 5
    from kvjax.methods.lukv import head_keeps
    assert head_keeps(np.array([0.25, 0.55, 0.5]), 10).tolist() == [8, 4, 5]
    assert head_keeps(np.array([1.0, 1.0, 0.0]), 4).tolist() == [1, 1, 4]  # at least one per head


def test_lukv_select_hand_computed(tmp_path):
    # knorm scores -||k||, K = 2, T = 6, sink 1, window 1: curve row for ratio 0.5 prunes head 0 by 0.5
    # (keeps 3) and head 1 by 0.7 (1.8 -> floor 1, total round(4.8) = 5 -> head 1 gets 2).
    # head 0 norms [9, 1, 5, 2, 7, 9]: slots 0 and 5 protected, then the smallest norm: slot 1 -> {0, 1, 5}
    # head 1 norms [9, 3, 1, 4, 2, 9]: protected 0 and 5 fill its 2 -> {0, 5}
    from kvjax.states.ragged import RaggedKV
    from kvjax.testing import tiny_config
    curve = np.zeros((99, 2, 2), np.float32)
    curve[49] = [[0.5, 0.7], [0.5, 0.7]]
    np.save(tmp_path / "c.npy", curve)
    k = np.zeros((1, 2, 8, 1))
    k[0, 0, :6, 0] = [9, 1, 5, 2, 7, 9]
    k[0, 1, :6, 0] = [9, 3, 1, 4, 2, 9]
    ctx = make_ctx(k, [6], g=1)
    m = methods.get(f"lukv(curve={tmp_path / 'c.npy'}, sink=1):knorm").bind(tiny_config(head_dim=1), ratio=0.5)
    assert m.keeps(0, 6).tolist() == [3, 2] and m.layer_keep(Budget(ratio=0.5), 6, 0, 2) == 3
    out = m.select(ctx, DenseKV(k=ctx.k, v=ctx.v, pos=ctx.pos, length=ctx.length), m.score(ctx),
                   jnp.asarray([3], jnp.int32), 3)
    assert isinstance(out, RaggedKV)
    assert [p[0].tolist() for p in out.positions()] == [[0, 1, 5], [0, 5]]


def test_lukv_end_to_end_and_bad_input(tmp_path):
    lm = tiny_lm()
    rows = [random_ids(21, 2).tolist()]
    L, K = lm.cfg.n_layers, lm.cfg.n_kv_heads
    curve = np.broadcast_to((np.arange(1, 100) / 100)[:, None, None], (99, L, K)).astype(np.float32)
    np.save(tmp_path / "c.npy", curve)
    cache = lm.prefill(rows, method=f"lukv(curve={tmp_path / 'c.npy'}):knorm", ratio=0.5)  # 10.5 -> 10, 11 per head
    assert all(np.asarray(s.length).sum() == 21 for s in cache.layers)
    np.save(tmp_path / "other.npy", curve[:, :, :1])
    c0 = compile_seconds()
    for kw, match in [(dict(method=f"lukv(curve={tmp_path / 'other.npy'}):knorm", ratio=0.5), "a curve for another"),
                      (dict(method="lukv:knorm", ratio=0.5), "needs curve="),
                      (dict(method=f"lukv(curve={tmp_path / 'c.npy'}):knorm", budget=8), "give ratio="),
                      (dict(method=f"lukv(curve={tmp_path / 'c.npy'}):kivi-4", ratio=0.5), "wraps a scoring method")]:
        with pytest.raises(ValueError, match=match):
            lm.prefill(rows, **kw)
    assert compile_seconds() == c0


def test_kvjax_calibrate_bad_input_before_loading(tmp_path, capsys):
    from kvjax.cli import main

    assert main(["calibrate", "qfilter", "--calib-tokens", "0", "--out", str(tmp_path / "q.npz")]) == 2
    assert "--calib-tokens" in capsys.readouterr().err
    assert not (tmp_path / "q.npz").exists()
