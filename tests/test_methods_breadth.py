"""kvpress 0.5.5 breadth: KeyDiff, LagKV, CUR, NonCausalAttention and the wrappers chunkkv:, block:, per_layer:,
critical:, criticaladakv: on hand-computed cases (the arithmetic in comments) or, where kvpress's algorithm is
a loop over blocks or heads, a line-by-line numpy transcription of it. Parity on the real model is in
`test_kvpress_parity.py`; every method end to end on the tiny model in `test_methods.py::METHOD_TABLE`.

Legend: B batch, K KV heads, G query heads per KV head, H = K*G, S slots, D head dim, T tokens.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import methods
from kvjax.methods import Budget
from kvjax.methods.block import Block
from kvjax.methods.chunkkv import ChunkKV
from kvjax.methods.critical import FMAX, CriticalAdaKV, CriticalKV
from kvjax.methods.cur import CUR
from kvjax.methods.keydiff import KeyDiff
from kvjax.methods.knorm import Knorm
from kvjax.methods.lagkv import LagKV
from kvjax.methods.non_causal_attention import NonCausalAttention
from kvjax.methods.per_layer import PerLayer
from kvjax.observe import ObsSpec, noncausal_chunk_sums, projected_value_norms
from kvjax.states import EMPTY_POS, DenseKV
from kvjax.testing import random_ids, tiny_lm
from kvjax.timing import compile_seconds
from test_methods import GARBAGE, make_ctx, make_obs, score

R10 = math.sqrt(10.0)


def state_of(ctx):
    return DenseKV(k=ctx.k, v=ctx.v, pos=ctx.pos, length=ctx.length)


def kept_sets(state) -> list[list[set[int]]]:
    """[B][K] kept positions of a DenseKV."""
    pos, length = np.asarray(state.pos), np.asarray(state.length)
    return [[set(pos[b, k, :length[b]].tolist()) for k in range(pos.shape[1])] for b in range(pos.shape[0])]


def with_keep(ctx, n_keep):
    return dataclasses.replace(ctx, n_keep=jnp.asarray(n_keep, jnp.int32))


# ------------------------------------------------------------------------------------------ KeyDiff
def test_keydiff_hand_computed():
    # K = 1, D = 2, T = 4 of S = 6: keys [1,0], [0,1], [1,0], [2,0]; unit keys [1,0],[0,1],[1,0],[1,0]
    # anchor = mean = [3/4, 1/4], |anchor| = sqrt(10)/4; cos = [3, 1, 3, 3] / sqrt(10); score = -cos.
    # (Were the garbage slots averaged in, the anchor would point along [1, 1].)
    k = np.zeros((1, 1, 6, 2))
    k[0, 0, :4] = [[1, 0], [0, 1], [1, 0], [2, 0]]
    sc = score(KeyDiff(), make_ctx(k, [4], g=2))
    np.testing.assert_allclose(sc[0, 0, :4], -np.array([3, 1, 3, 3]) / R10, rtol=1e-6)
    assert KeyDiff().protected() == 0 and KeyDiff().observations() == ObsSpec()


# ---------------------------------------------------------------------------------------------- CUR
def cur_case():
    # K = 1, D = 1, T = 5 of S = 6: k = [1, 2, 1, 3, 2], v = [2, 1, 1, 1, 1]
    k = np.zeros((1, 1, 6, 1))
    v = np.zeros((1, 1, 6, 1))
    k[0, 0, :5, 0] = [1, 2, 1, 3, 2]
    v[0, 0, :5, 0] = [2, 1, 1, 1, 1]
    return make_ctx(k, [5], g=1, v=v)


# windows of 2: [0, 1], [2, 3], [4, pad]
#   k2 = [1, 4, 1, 9, 4], window sums 5, 10, 4 -> [1/5, 4/5, 1/10, 9/10, 1]
#   v2 = [4, 1, 1, 1, 1], window sums 5, 2, 1  -> [4/5, 1/5, 1/2, 1/2, 1]
KN = np.array([1 / 5, 4 / 5, 1 / 10, 9 / 10, 1])
VN = np.array([4 / 5, 1 / 5, 1 / 2, 1 / 2, 1])
CUR_HAND = {
    "kv_product": KN * VN,  # [4/25, 4/25, 1/20, 9/20, 1], sum 1.82
    "key": KN,
    "value": VN,
    "kv_avg": (KN + VN) / 2,
}


@pytest.mark.parametrize("kind", sorted(CUR_HAND))
def test_cur_hand_computed(kind):
    sc = score(CUR(num_sinks=1, local_window_size=2, leverage_type=kind), cur_case())
    want = CUR_HAND[kind] / CUR_HAND[kind].sum()  # normalized over the prompt, then sink slot 0 -> 1.0
    np.testing.assert_allclose(sc[0, 0, 1:5], want[1:], rtol=1e-6)
    assert sc[0, 0, 0] == 1.0


def test_cur_without_local_windows_and_random_sketch():
    # no windows: k2 v2 = [4, 4, 1, 9, 4] / 22
    sc = score(CUR(num_sinks=0, use_local_approximation=False), cur_case())
    np.testing.assert_allclose(sc[0, 0, :5], np.array([4, 4, 1, 9, 4]) / 22, rtol=1e-6)
    # random sketch (D = 8 -> 20): reproducible per seed, different across seeds, still normalized
    rng = np.random.default_rng(0)
    ctx = make_ctx(rng.normal(size=(1, 2, 40, 8)), [37], g=1, v=rng.normal(size=(1, 2, 40, 8)))
    a, b = (score(CUR(use_random_leverage=True, num_sinks=0, seed=s), ctx) for s in (1, 2))
    np.testing.assert_array_equal(a, score(CUR(use_random_leverage=True, num_sinks=0, seed=1), ctx))
    assert not np.allclose(a, b)
    np.testing.assert_allclose(a[..., :37].sum(-1), 1.0, rtol=1e-5)


# -------------------------------------------------------------------------------------------- LagKV
def lagkv_case():
    """Rows of 7 and 4 tokens (S = 8), K = 1, D = 2, values = keys; n_sink 1, lag 2.

    Row 0: partitions [1, 2], [3, 4], [5, 6]; end = 1 + 3 * 2 = 7, so the last partition (5, 6) is only
    a reference and scores 1 with the sink.
      partition 0 keys [1, 4], [2, 0]; its reference partition 1 = [0, 0], [2, 1]: min [0, 0], max [2, 1]
        -> normalized [0.5, 4], [1, 0]: std (ddof 1) |a - b| / sqrt 2 = 3.5 / sqrt 2, 1 / sqrt 2
      partition 1 keys [0, 0], [2, 1]; reference partition 2 = [0, 0], [4, 8]: range [4, 8]
        -> [0, 0], [0.5, 0.125]: std 0, 0.375 / sqrt 2
    Ranks inside each partition / lag: p0 [1, 0] / 2, p1 [0, 1] / 2 -> scores [1, 0.5, 0, 0, 0.5, 1, 1].
    Row 1 (T = 4 < n_sink + 2 lag = 5): sinks 1, then arange(3) / 3.
    """
    k = np.zeros((2, 1, 8, 2))
    k[0, 0, :7] = [[9, 9], [1, 4], [2, 0], [0, 0], [2, 1], [0, 0], [4, 8]]
    k[1, 0, :4] = [[1, 2], [3, 1], [0, 5], [2, 2]]
    return make_ctx(k, [7, 4], g=1, v=k.copy())


def test_lagkv_hand_computed():
    sc = score(LagKV(n_sink=1, lag_size=2), lagkv_case())
    np.testing.assert_allclose(sc[0, 0, :7], [1, 0.5, 0, 0, 0.5, 1, 1], atol=1e-7)
    np.testing.assert_allclose(sc[1, 0, :4], [1, 0, 1 / 3, 2 / 3], rtol=1e-6)
    # cross_scoring: the softmaxed stds themselves (keys and values agree, so their mean is either)
    sc = score(LagKV(n_sink=1, lag_size=2, cross_scoring=True), lagkv_case())
    p0 = np.exp([3.5 / math.sqrt(2), 1 / math.sqrt(2)])
    p1 = np.exp([0, 0.375 / math.sqrt(2)])
    np.testing.assert_allclose(sc[0, 0, 1:5], np.r_[p0 / p0.sum(), p1 / p1.sum()], rtol=1e-5)
    assert LagKV().protected() == 4


# ----------------------------------------------------------------------------- NonCausalAttention
def test_noncausal_chunk_sums_hand_computed():
    # H = K = 1, D = 1, chunk 2, T = 3 (slots S = 4): blocks [0, 1] and [2, pad 3]. Logits q k unscaled.
    #   block 0: k = [1, 0]; query 0 (q = ln 2): logits [ln 2, 0] -> [2/3, 1/3]; query 1 (q = 0): [1/2, 1/2]
    #            column sums [7/6, 5/6]
    #   block 1: k2 = 1, query 2 (q = ln 3): logits [ln 3, -1e-9 (padded key)] -> [3/4, 1/4];
    #            the padded query's row: logits [0, -1e-9] -> [1/2, 1/2]; column sum of key 2: 3/4 + 1/2
    # Slot 3 holds a garbage key and query: kvpress's padding replaces them.
    q = np.array([math.log(2), 0, math.log(3), 50.0]).reshape(1, 4, 1, 1)
    k = np.array([1, 0, 1, GARBAGE], np.float32).reshape(1, 1, 4, 1)
    state = DenseKV(k=jnp.asarray(k), v=jnp.asarray(k), pos=jnp.arange(4)[None, None], length=jnp.array([3]))
    col = noncausal_chunk_sums(jnp.asarray(q, jnp.float32), jnp.arange(4)[None], jnp.array([3]), state, 2, 4)
    np.testing.assert_allclose(np.asarray(col)[0, 0], [7 / 6, 5 / 6, 5 / 4, 0], rtol=1e-6)


def test_non_causal_attention_score_hand_computed():
    # column sums [7/6, 5/6, 5/4] (above) as observations, H = 2 heads of one group with sums c and 2 - ... :
    # head 0 = [7/6, 5/6, 5/4], head 1 = [5/6, 7/6, 3/4] -> group mean [1, 1, 1]; ||v|| = [1, 2, 1]
    # -> [1, 2, 1]; avg_pool(3, pad 1): [(0+1+2)/3, (1+2+1)/3, (2+1+0)/3] = [1, 4/3, 1]
    # z-norm: mean 10/9, unbiased std sqrt(((1/9)^2 * 2 + (2/9)^2) / 2) = sqrt(3)/9
    col = np.zeros((1, 2, 5))
    col[0, 0, :3] = [7 / 6, 5 / 6, 5 / 4]
    col[0, 1, :3] = [5 / 6, 7 / 6, 3 / 4]
    v = np.zeros((1, 1, 5, 2))
    v[0, 0, :3] = [[1, 0], [0, 2], [0, 1]]
    obs = dataclasses.replace(make_obs(1, 2, 2), nc_sum=jnp.asarray(col, jnp.float32))
    sc = score(NonCausalAttention(chunk_size=2), make_ctx(np.zeros((1, 1, 5, 2)), [3], g=2, obs=obs, v=v))
    np.testing.assert_allclose(sc[0, 0, :3], (np.array([1, 4 / 3, 1]) - 10 / 9) / (math.sqrt(3) / 9), rtol=1e-5)
    assert NonCausalAttention().observations() == ObsSpec(nc_chunk=256)


# -------------------------------------------------------------------------------------------- ChunkKV
def chunk_case(t=(7,)):
    """K = 2, D = 1: Knorm scores -|k|. Head 0 norms [1,1,1, .5,3,3, .2], head 1 [0,0,0, 0,0,0, 5].
    Summed over heads: -[1,1,1, .5,3,3, 5.2]; chunks of 3: [0..2], [3..5], [6]: means -1, -6.5/3, -5.2,
    so chunk 0, then 1, then 2 (per head 0 alone, chunk 2 would come first)."""
    k = np.zeros((len(t), 2, 8, 1))
    k[:, 0, :7, 0] = [1, 1, 1, .5, 3, 3, .2]
    k[:, 1, :7, 0] = [0, 0, 0, 0, 0, 0, 5]
    return make_ctx(k, list(t), g=1)


@pytest.mark.parametrize("ratio,kept", [(0.5, {0, 1, 2}), (0.25, {0, 1, 2, 3, 4, 5}), (0.0, set(range(7)))])
def test_chunkkv_hand_computed(ratio, kept):
    # 3 chunks: keep max(1, int(3 (1 - r))) of them (r 0.5: 1, r 0.25: 2); the same tokens in both heads
    method = ChunkKV(press=Knorm(), chunk_length=3)
    ctx = chunk_case()
    n_keep = method.layer_keep(Budget(ratio=ratio), 7, 0, 2)
    assert n_keep == min(7, 3 * max(1, int(3 * (1 - ratio))))
    out = method.select(ctx, state_of(ctx), method.score(ctx), jnp.array([n_keep]), n_keep)
    assert kept_sets(out) == [[kept, kept]]
    assert method.name == "chunkkv:knorm" and methods.spec_of(method) == "chunkkv(chunk_length=3):knorm"


def test_chunkkv_partial_chunk_and_short_prompt():
    # the partial chunk [6] scores -5.2 alone; with scores of head 1 flipped it would lead. Rows of 7 and 2
    # tokens: the 2-token row is shorter than a chunk and falls back to Knorm's top-k per head.
    method = ChunkKV(press=Knorm(), chunk_length=3)
    ctx = chunk_case((7, 2))
    k = np.asarray(ctx.k).copy()
    k[1, 0, :2, 0] = [2, 1]  # row 1: head 0 keeps slot 1 (norm 1), head 1 (norms 0, 0) keeps slot 0 (tie: first)
    ctx = dataclasses.replace(ctx, k=jnp.asarray(k))
    n_keep = jnp.array([method.layer_keep(Budget(ratio=0.5), 7, 0, 2), method.layer_keep(Budget(ratio=0.5), 2, 0, 2)])
    np.testing.assert_array_equal(n_keep, [3, 1])
    out = method.select(ctx, state_of(ctx), method.score(ctx), n_keep, 3)
    assert kept_sets(out) == [[{0, 1, 2}, {0, 1, 2}], [{1}, {0}]]
    # budget in tokens: max(1, 5 // 3) = 1 chunk
    assert method.layer_keep(Budget(tokens=5), 7, 0, 2) == 3


# ---------------------------------------------------------------------------------------------- Block
def kvpress_block(keys, n_kept, block_size, scorer):
    """kvpress 0.5.5 `BlockPress.compress` for one row and head, transcribed: keys [T, D] -> kept indices
    (in the order the last top-k left them). `scorer(keys [n, D]) -> [n]`."""
    t = len(keys)
    bs = block_size if block_size < t else t
    kept = np.arange(n_kept)
    for i in range(n_kept, t, bs):
        cur = np.concatenate([kept, np.arange(i, min(i + bs, t))])
        s = scorer(keys[cur])
        kept = cur[np.argsort(-s, kind="stable")[:n_kept]]
    return kept


def np_keydiff(k):
    unit = k / np.linalg.norm(k, axis=-1, keepdims=True)
    anchor = unit.mean(0)
    return -(k @ anchor) / (np.linalg.norm(k, axis=-1) * np.linalg.norm(anchor))


@pytest.mark.parametrize("block_size", [1, 3, 5, 64])
def test_block_keydiff_matches_kvpress_transcription(block_size):
    # B = 2 rows of 23 and 14 tokens (S = 24), K = 2, D = 4, random keys; ratio 0.5 -> n_keep [11, 7]
    rng = np.random.default_rng(block_size)
    k = rng.normal(size=(2, 2, 24, 4))
    lengths = [23, 14]
    ctx = make_ctx(k, lengths, g=1)
    method = Block(press=KeyDiff(), block_size=block_size)
    n_keep = [method.layer_keep(Budget(ratio=0.5), t, 0, 2) for t in lengths]
    @jax.jit
    def run(state):  # the context is built inside jit, as `kvjax.compress` does
        c = dataclasses.replace(ctx, k=state.k, v=state.v, pos=state.pos, length=state.length)
        return method.select(c, state, method.score(c), jnp.asarray(n_keep), max(n_keep))

    out = run(state_of(ctx))
    for b, t in enumerate(lengths):
        for h in range(2):
            want = set(kvpress_block(k[b, h, :t], n_keep[b], block_size, np_keydiff).tolist())
            assert kept_sets(out)[b][h] == want, (b, h)
    if block_size == 64:  # one block covers the prompt: the plain scorer's top-k
        plain = state_of(ctx).keep_top(KeyDiff().score(ctx), jnp.asarray(n_keep), max(n_keep))
        assert kept_sets(out) == kept_sets(plain)


def test_block_of_an_order_free_scorer_is_the_scorer():
    # Knorm's score of a token ignores the others: block-wise top-k = one top-k
    rng = np.random.default_rng(0)
    ctx = make_ctx(rng.normal(size=(1, 2, 30, 4)), [30], g=1)
    out = Block(press=Knorm(), block_size=4).select(ctx, state_of(ctx), Knorm().score(ctx), jnp.array([9]), 9)
    assert kept_sets(out) == kept_sets(state_of(ctx).keep_top(Knorm().score(ctx), jnp.array([9]), 9))


# ------------------------------------------------------------------------------------------ per_layer
def test_per_layer_budgets():
    m = PerLayer(press=Knorm(), ratios=[0.25, 0.75])
    assert m.ratios == (0.25, 0.75) and m.name == "per_layer:knorm"
    # T = 13: layer 0 int(13 * 0.75) = 9, layer 1 int(13 * 0.25) = 3
    assert [m.layer_keep(Budget(ratio=0.5), 13, i, 2) for i in range(2)] == [9, 3]
    with pytest.raises(ValueError, match="average 0.5"):
        m.layer_keep(Budget(ratio=0.4), 13, 0, 2)
    with pytest.raises(ValueError, match="not budget="):
        m.layer_keep(Budget(tokens=4), 13, 0, 2)
    with pytest.raises(ValueError, match="2 ratios for a model of 3 layers"):
        m.layer_keep(Budget(ratio=0.5), 13, 0, 3)
    assert methods.get("per_layer(ratios=(0.25, 0.75)):knorm") == m


# ------------------------------------------------------------------------------------------- Critical
def critical_case():
    """K = 1, G = 2, D = 1, T = 4 of S = 5: Knorm scores -[1, 2, 3, 4]; projected value norms per head
    [1, 10, .5, 1] and [3, 10, .5, 1] -> group mean [2, 10, .5, 1]."""
    k = np.zeros((1, 1, 5, 1))
    k[0, 0, :4, 0] = [1, 2, 3, 4]
    wov = np.zeros((1, 2, 5))
    wov[0, 0, :4] = [1, 10, .5, 1]
    wov[0, 1, :4] = [3, 10, .5, 1]
    obs = dataclasses.replace(make_obs(1, 2, 1), wov=jnp.asarray(wov, jnp.float32))
    return make_ctx(k, [4], g=2, obs=obs)


def test_critical_hand_computed():
    # n_keep 2 -> stage 1 keeps int(2 * 0.5) = 1: slot 0 (score -1) -> float32 max
    # stage 2: (s + 1e-4) * [2, 10, .5, 1] = [.., -19.999, -1.49995, -3.9999] -> keep slots 0 and 2
    # (Knorm alone would keep 0 and 1.)
    method = CriticalKV(press=Knorm())
    ctx = with_keep(critical_case(), [2])
    sc = score(method, ctx)
    assert sc[0, 0, 0] == FMAX
    np.testing.assert_allclose(sc[0, 0, 1:4], (np.array([-2, -3, -4]) + 1e-4) * [10, .5, 1], rtol=1e-6)
    out = method.select(ctx, state_of(ctx), method.score(ctx), jnp.array([2]), 2)
    assert kept_sets(out) == [[{0, 2}]]
    # first_stage_ratio 0: no first stage, slot 0 scores (-1 + 1e-4) * 2 < slot 2
    sc0 = score(CriticalKV(press=Knorm(), first_stage_ratio=0.0), ctx)
    np.testing.assert_allclose(sc0[0, 0, :4], (-np.arange(1, 5) + 1e-4) * [2, 10, .5, 1], rtol=1e-6)
    assert method.observations() == ObsSpec(wov=True)
    assert methods.get("critical:knorm") == method and methods.get("adakv:critical:knorm").press == method


def np_critical_adakv(s, wov, n_kept, alpha=0.2, eps=1e-4, fsr=0.5):
    """kvpress 0.5.5 `CriticalAdaKVPress.compress` for one row, transcribed (float64): s, wov [K, T] ->
    kept positions per head."""
    n_kv, t = s.shape
    s = s.astype(np.float64).copy()
    n_safe = max(1, int(n_kept * alpha))
    for h in range(n_kv):
        s[h, np.argsort(-s[h], kind="stable")[:n_safe]] = FMAX
    top = np.argsort(-s.reshape(-1), kind="stable")[:n_kept * n_kv]
    budgets = np.bincount(top // t, minlength=n_kv)
    for h in range(n_kv):
        s[h, np.argsort(-s[h], kind="stable")[:int(budgets[h] * fsr)]] = FMAX
    s = (s + eps) * wov
    return [set(np.argsort(-s[h], kind="stable")[:budgets[h]].tolist()) for h in range(n_kv)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_criticaladakv_matches_kvpress_transcription(seed):
    # K = 3, G = 2, D = 4, rows of 20 and 13 tokens (S = 21); Knorm scores, random positive value norms
    rng = np.random.default_rng(seed)
    lengths = [20, 13]
    k = rng.normal(size=(2, 3, 21, 4)) * rng.uniform(0.2, 3, size=(2, 3, 1, 1))
    wov = rng.uniform(0.1, 3, size=(2, 6, 21))
    obs = dataclasses.replace(make_obs(2, 6, 4), wov=jnp.asarray(wov, jnp.float32))
    ctx = make_ctx(k, lengths, g=2, obs=obs)
    method = CriticalAdaKV(press=Knorm())
    n_keep = [10, 6]
    out = method.select(ctx, state_of(ctx), method.score(ctx), jnp.asarray(n_keep), 10)
    wov_mean = wov.reshape(2, 3, 2, 21).mean(2)
    for b, t in enumerate(lengths):
        want = np_critical_adakv(-np.linalg.norm(k[b, :, :t], axis=-1), wov_mean[b, :, :t], n_keep[b])
        got = [set(np.asarray(out.pos[b])[np.asarray(out.start[b, h]) + np.arange(int(out.length[b, h]))].tolist())
               for h in range(3)]
        assert got == want, b
        assert sum(len(x) for x in got) == 3 * n_keep[b]


# ---------------------------------------------------------------------------------- observations
def test_projected_value_norms_hand_computed():
    # K = 1, G = 2, D = 2, E = 3: W_o rows of head 0 [[1, 0, -1], [0, 2, 0]], head 1 [[1, 1, 1], [0, 0, 3]]
    # v = [1, 2]: head 0 -> [1, 4, -1], L1 6; head 1 -> [1, 1, 7], L1 9. v = [0, -1]: 2 and 3.
    wo = np.array([[1, 0, -1], [0, 2, 0], [1, 1, 1], [0, 0, 3]], np.float32)
    v = np.array([[1, 2], [0, -1], [5, 5]], np.float32).reshape(1, 3, 1, 2)
    out = projected_value_norms(jnp.asarray(v), jnp.asarray(wo), jnp.array([[0, 1, 2]]),
                                jnp.array([[True, True, False]]), 4)
    np.testing.assert_allclose(np.asarray(out)[0], [[6, 2, 0, 0], [9, 3, 0, 0]])


def test_prefill_observations_nc_and_wov_equal_dense_computation(monkeypatch):
    # chunks of 8 over rows of 13 and 21 tokens: the non-causal blocks of 4 tile each chunk; the last
    # block of row 0 ([12, 16)) holds one real token. Reference: float64 numpy from the params.
    from kvjax import generation
    from kvjax.states import init_cache
    from test_methods import numpy_attention_layers

    lm = tiny_lm(seed=0)
    cfg = lm.cfg
    rows = [random_ids(13, 7).tolist(), random_ids(21, 8).tolist()]
    lengths = np.array([13, 21], np.int32)
    tokens = np.zeros((2, 24), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    spec = ObsSpec(nc_chunk=4, wov=True)
    with monkeypatch.context() as m:
        m.setattr(generation, "PREFILL_CHUNK", 8)
        jax.clear_caches()
        try:
            cache = init_cache(cfg.n_layers, 2, cfg.n_kv_heads, 24, cfg.head_dim, cfg.jnp_dtype)
            _, cache, obs = generation.prefill(lm.params, cfg, tokens, lengths, cache, observe=spec)
        finally:
            jax.clear_caches()
    g = cfg.n_heads // cfg.n_kv_heads
    for b, r in enumerate(rows):
        t = len(r)
        ref = numpy_attention_layers(lm.params, cfg, r)
        for layer, (o, want) in enumerate(zip(obs, ref)):
            q, k, v = want["q"], want["k"], want["v"]  # [T, H, D], [T, K, D], [T, K, D]
            nc = np.zeros((cfg.n_heads, t))
            for s0 in range(0, t, 4):  # kvpress: pad the last block; padded keys -1e-9, padded queries 0
                idx = np.arange(s0, s0 + 4)
                ok = idx < t
                for h in range(cfg.n_heads):
                    qs = np.where(ok[:, None], q[np.minimum(idx, t - 1), h], 0)
                    ks = np.where(ok[:, None], k[np.minimum(idx, t - 1), h // g], 0)
                    logits = np.where(ok[None, :], qs @ ks.T, -1e-9)
                    p = np.exp(logits - logits.max(-1, keepdims=True))
                    p /= p.sum(-1, keepdims=True)
                    nc[h, idx[ok]] = p.sum(0)[ok]
            np.testing.assert_allclose(o.nc_sum[b, :, :t], nc, rtol=2e-4, atol=1e-5, err_msg=f"{b} {layer}")
            np.testing.assert_array_equal(o.nc_sum[b, :, t:], 0)
            wo = np.asarray(lm.params[f"layers_{layer}"]["attn"]["o_proj"]["kernel"], np.float64)
            wo = wo.reshape(cfg.n_heads, cfg.head_dim, -1)
            wov = np.stack([np.abs(v[:, h // g] @ wo[h]).sum(-1) for h in range(cfg.n_heads)])
            np.testing.assert_allclose(o.wov[b, :, :t], wov, rtol=2e-4, atol=1e-5, err_msg=f"{b} {layer}")


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("spec,match", [
    ("chunkkv:kivi-4", "chunkkv: wraps a scoring method.*quantizer"),
    ("nope:snapkv", "unknown wrapper 'nope'"),
    ("chunkkv:adakv:snapkv", "chunkkv: wraps a plain scorer.*adakv:snapkv"),
    ("block:snapkv", "block: .*snapkv reads prefill observations"),
    ("critical:locret", "works while prefilling"),
    ("adakv:chunkkv:knorm", "adakv: wraps a plain scorer"),
    ("chunkkv(chunk_length=0):knorm", "chunk_length must be a positive integer"),
    ("per_layer(ratios=(0.5, 1.2)):knorm", "every ratio must be in"),
    ("per_layer:knorm", "ratios is a tuple"),
    ("critical(first_stage_ratio=2):knorm", "first_stage_ratio must be in"),
    ("non_causal_attention(chunk_size=100)", "must divide the prefill chunk"),
    ("lagkv(lag_size=0)", "lag_size must be a positive integer"),
    ("cur(leverage_type=foo)", "leverage_type must be one of"),
])
def test_bad_specs_one_line_errors_before_compiling(spec, match):
    c0 = compile_seconds()
    with pytest.raises(ValueError, match=match) as e:
        methods.get(spec)
    assert "\n" not in str(e.value)
    assert compile_seconds() == c0


def test_bad_wrapper_on_the_cli_exits_2(smollm2, capsys):
    from kvjax.cli import main

    c0 = compile_seconds()
    assert main(["generate", "--prompt", "hi there", "--method", "chunkkv:kivi-4", "--ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvjax: error: chunkkv: wraps a scoring method") and err.count("\n") == 1
    assert compile_seconds() == c0


def test_kvjax_methods_lists_the_new_methods_and_wrappers(capsys):
    from kvjax.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("keydiff", "lagkv", "cur", "non_causal_attention", "chunkkv", "block", "per_layer", "critical",
                 "criticaladakv"):
        assert f"\n  {name} " in out, name


# ------------------------------------------------------------------------------------------ rerotate
def test_rerotate_matches_recomputed_rope():
    # rerotate:keydiff keeps keydiff's tokens; layer-0 keys depend only on the token and its position, so
    # after re-rotation layer 0 equals a fresh prefill of the kept tokens at positions 0..n-1 (RoPE
    # recomputed from scratch); new tokens continue at n. Deeper layers: same values, same selection.
    lm = tiny_lm(seed=0)
    rows = [random_ids(13, 1).tolist(), random_ids(21, 2).tolist()]
    cache = lm.prefill(rows, method="rerotate:keydiff", ratio=0.5)
    plain = lm.prefill(rows, method="keydiff", ratio=0.5)
    n_keep = [6, 10]
    np.testing.assert_array_equal(cache.next_pos, n_keep)
    for b, (r, n) in enumerate(zip(rows, n_keep)):
        for layer in range(lm.cfg.n_layers):
            np.testing.assert_array_equal(cache.layers[layer].pos[b, :, :n], np.broadcast_to(np.arange(n), (2, n)))
            np.testing.assert_allclose(cache.layers[layer].v[b, :, :n], plain.layers[layer].v[b, :, :n], rtol=1e-6)
        for kv in range(2):
            kept = np.asarray(plain.layers[0].pos[b, kv, :n])
            fresh = lm.prefill([[r[p] for p in kept]])
            np.testing.assert_allclose(cache.layers[0].k[b, kv, :n], fresh.layers[0].k[0, kv, :n], rtol=1e-4,
                                       atol=1e-5)
    out = lm.generate(rows, method="rerotate:keydiff", ratio=0.5, max_new_tokens=3, stop_at_eos=False)
    np.testing.assert_array_equal(out.cache.next_pos, np.array(n_keep) + 3)
    assert methods.get("rerotate:keydiff").name == "rerotate:keydiff"
    with pytest.raises(ValueError, match="rerotate: wraps a plain scorer"):
        methods.get("rerotate:adakv:keydiff")


# ------------------------------------------------------------------------------------------- merging
def merging_case():
    """K = 1, D = 2, T = 4 of S = 5. Keys [1,0], [0,2], [3,0], [1,3] (norms 1, 2, 3, sqrt 10): Knorm keeps
    0 and 1. Evicted 2 (unit [1, 0]) is closest to kept 0 (cosine 1); evicted 3 (unit [1, 3]/sqrt 10) to
    kept 1 (cosine 3/sqrt 10 = 0.9487). Values [1,0], [0,1], [2,0], [0,3]."""
    k = np.zeros((1, 1, 5, 2))
    k[0, 0, :4] = [[1, 0], [0, 2], [3, 0], [1, 3]]
    v = np.zeros((1, 1, 5, 2))
    v[0, 0, :4] = [[1, 0], [0, 1], [2, 0], [0, 3]]
    return make_ctx(k, [4], g=1, v=v)


@pytest.mark.parametrize("kw,v0,v1", [
    # weights w = s ||v_e|| / (||v_e|| + ||v_t|| + 1e-6): e2 -> 1 * 2 / 3, e3 -> 0.9487 * 3 / 4
    # v0 = ([1, 0] + 2/3 [2, 0]) / (5/3) = [7/5, 0]; v1 = ([0, 1] + w3 [0, 3]) / (1 + w3)
    ({}, [1.4, 0], [0, (1 + 3 * 0.75 * 3 / R10) / (1 + 0.75 * 3 / R10)]),
    # threshold 0.95: e3 (0.9487) stays out
    (dict(similarity_threshold=0.95), [1.4, 0], [0, 1]),
    # merge_fraction 0.5: only the similarities >= their median (1 and 0.9487 -> 0.974) merge
    (dict(merge_fraction=0.5), [1.4, 0], [0, 1]),
])
def test_merging_hand_computed(kw, v0, v1):
    ctx = merging_case()
    method = methods.get("merging:knorm") if not kw else dataclasses.replace(methods.get("merging:knorm"), **kw)
    out = method.select(ctx, state_of(ctx), method.score(ctx), jnp.array([2]), 2)
    np.testing.assert_array_equal(out.pos[0, 0], [0, 1])
    np.testing.assert_allclose(out.k[0, 0], [[1, 0], [0, 2]])  # keys unchanged
    np.testing.assert_allclose(out.v[0, 0], [v0, v1], rtol=1e-5, atol=1e-7)


def test_merging_stores_the_kept_tokens_only():
    # same positions and keys as the scorer alone, same bytes; values differ where evicted tokens merged
    import kvjax

    lm = tiny_lm(seed=0)
    rows = [random_ids(13, 1).tolist(), random_ids(21, 2).tolist()]
    merged = lm.prefill(rows, method="merging(block=4):keydiff", ratio=0.5)
    plain = lm.prefill(rows, method="keydiff", ratio=0.5)
    assert kvjax.cache_nbytes(merged) == kvjax.cache_nbytes(plain)
    changed = 0
    for a, b in zip(merged.layers, plain.layers):
        np.testing.assert_array_equal(a.pos, b.pos)
        held = (np.asarray(a.pos) != EMPTY_POS)[..., None]  # slots past a row's length hold nothing
        np.testing.assert_array_equal(np.where(held, a.k, 0), np.where(held, b.k, 0))
        changed += int((held & (np.abs(np.asarray(a.v) - np.asarray(b.v)) > 1e-6)).any(-1).sum())
    assert changed > 0
    out = lm.generate(rows, method="merging:keydiff", ratio=0.5, max_new_tokens=3, stop_at_eos=False)
    assert [len(x) for x in out.ids] == [3, 3]


# ------------------------------------------------------------------------------------------ leverage
def test_leverage_scores_hand_computed():
    # identity sketch (r = D): score_j = x_j^T (X^T X + 0.01 I)^-1 x_j of the centered keys.
    # D = 1, keys [3, 1] (T = 2 of S = 3): centered [1, -1], X^T X = 2 -> 1 / 2.01 each
    from kvjax.methods.leverage import leverage_scores

    x = np.zeros((1, 1, 3, 1))
    x[0, 0, :2, 0] = [3, 1]
    x[0, 0, 2, 0] = GARBAGE
    used = jnp.array([[[True, True, False]]])
    sc = np.asarray(leverage_scores(jnp.asarray(x, jnp.float32), used, jnp.ones((1, 1, 1, 1))))
    np.testing.assert_allclose(sc[0, 0, :2], [1 / 2.01, 1 / 2.01], rtol=1e-5)
    # D = 3, random keys, identity sketch: the ridge leverage of numpy's centered keys
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 2, 12, 3)) * [1, 3, 0.5]
    sc = np.asarray(leverage_scores(jnp.asarray(x, jnp.float32), jnp.ones((1, 1, 12), bool),
                                    jnp.broadcast_to(jnp.eye(3), (1, 2, 3, 3))))
    for h in range(2):
        c = x[0, h] - x[0, h].mean(0)
        want = np.einsum("sd,de,se->s", c, np.linalg.inv(c.T @ c + 0.01 * np.eye(3)), c)
        np.testing.assert_allclose(sc[0, h], want, rtol=1e-4)


def test_leverage_undoes_rope_and_is_seeded():
    # the scorer un-rotates the cached keys: scores of post-RoPE keys at positions p equal those of the
    # pre-RoPE keys placed at position 0; seeds differ; the z-normalized scores have mean 0
    from kvjax.models.rope import apply_rope

    rng = np.random.default_rng(1)
    pre = rng.normal(size=(1, 2, 20, 8)).astype(np.float32)
    ctx0 = make_ctx(pre, [20], g=1, pos=np.zeros((1, 2, 20), int))
    ctx0 = dataclasses.replace(ctx0, pos=jnp.zeros((1, 2, 20), jnp.int32))
    post = np.asarray(apply_rope(jnp.asarray(pre), jnp.broadcast_to(jnp.arange(20), (1, 2, 20)),
                                 jnp.asarray(1.0 / (10000.0 ** (np.arange(0, 8, 2) / 8)), jnp.float32)))
    ctx = make_ctx(post, [20], g=1)
    a = score(methods.get("leverage(sketch_dimension=4)"), ctx)
    np.testing.assert_allclose(a, score(methods.get("leverage(sketch_dimension=4)"), ctx0), rtol=1e-3, atol=1e-4)
    assert not np.allclose(a, score(methods.get("leverage(sketch_dimension=4, seed=1)"), ctx))
    np.testing.assert_allclose(a.mean(), 0, atol=1e-5)


# ------------------------------------------------------------------------------- wrappers end to end
@pytest.mark.parametrize("spec,state_type", [
    ("chunkkv(chunk_length=4):keydiff", "DenseKV"), ("block(block_size=4):cur(num_sinks=2)", "DenseKV"),
    ("per_layer(ratios=(0.25, 0.75)):lagkv(n_sink=2, lag_size=4)", "DenseKV"),
    ("critical:non_causal_attention(chunk_size=8)", "DenseKV"), ("adakv:critical:keydiff", "RaggedKV"),
    ("criticaladakv:keydiff", "RaggedKV"), ("rerotate:keydiff", "DenseKV"), ("merging:keydiff", "DenseKV"),
    ("compose(chunkkv(chunk_length=4):keydiff, int8(residual=4))", "QuantKV"),
    ("compose(criticaladakv:keydiff, int8(residual=4))", "QuantRaggedKV"),
])
def test_wrappers_through_the_pipeline(spec, state_type):
    # every wrapper: the state type it builds, bytes exactly as `pipeline.abstract` predicts, less than the
    # full cache, and generation from the compressed cache
    import kvjax
    from kvjax import pipeline
    from kvjax.states import tree_nbytes

    lm = tiny_lm(seed=0)
    ids = random_ids(21, 5).tolist()
    cache = lm.prefill(ids, method=spec, ratio=0.5)
    assert all(type(s).__name__ == state_type for s in cache.layers)
    plan = pipeline.plan(lm.cfg, [21], spec, ratio=0.5)
    assert kvjax.cache_nbytes(cache) == tree_nbytes(pipeline.abstract(lm.cfg, plan, 21))
    assert kvjax.cache_nbytes(cache) < kvjax.cache_nbytes(lm.prefill(ids))
    out = lm.generate(ids, method=spec, ratio=0.5, max_new_tokens=3, stop_at_eos=False)
    assert len(out.ids) == 3
