"""Eviction methods: each scorer on tiny hand-computed cases, budgets, `keep_top`, the observations
gathered during chunked prefill, and every registered method end to end on the tiny model.

Reference semantics: kvpress 0.5.5 (`/work/shared/METHODS.md`). Hand cases write the arithmetic in
comments; where a formula is long (ExpectedAttention, PyramidKV budgets) the test holds a direct
numpy / Python transcription of kvpress's code instead. Slots past a row's length hold large
garbage with positions a causal mask alone would let through, so any read of them shows up.

Legend: B batch, K KV heads, G query heads per KV head, H = K*G, S slots, D head dim, W window, T tokens.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_llama import apply_rope as np_rope
from numpy_llama import hf_inv_freq, rms_norm, silu

import kvjax
from kvjax import generation, methods
from kvjax.compress import resolve_keep
from kvjax.states import EMPTY_POS, DenseKV, KVCache, init_cache
from kvjax.methods import (Budget, ExpectedAttention, Knorm, ObservedAttention, PyramidKV, Random, ScoreContext,
                           SnapKV, StreamingLLM, TOVA)
from kvjax.observe import LayerObs, ObsSpec
from kvjax.testing import random_ids, tiny_config, tiny_lm
from kvjax.timing import compile_seconds

GARBAGE = 1e4  # unused slots hold keys/values of this size (any weight on them swamps a score)
S2 = math.sqrt(2.0)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(seed=0)


# ------------------------------------------------------------------------------------- helpers
def make_obs(b, h, d, q_win=None, win_pos=None, col_sum=None, q_sum=None, q_sq=None, q_cnt=None) -> LayerObs:
    """A `LayerObs` by hand; fields not given are zero-sized, as for a spec that does not ask for them."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return LayerObs(
        q_win=f32(np.zeros((b, 0, h, d)) if q_win is None else q_win),
        win_pos=jnp.asarray(np.zeros((b, 0)) if win_pos is None else win_pos, jnp.int32),
        col_sum=f32(np.zeros((b, h, 0)) if col_sum is None else col_sum),
        q_sum=f32(np.zeros((b, h, 0)) if q_sum is None else q_sum),
        q_sq=f32(np.zeros((b, h, 0, 0)) if q_sq is None else q_sq),
        q_cnt=f32(np.zeros((b,)) if q_cnt is None else q_cnt),
    )


def make_ctx(k, length, g, obs=None, v=None, pos=None, layer=0, n_layers=2, rope_theta=10000.0,
             pad_pos="zero") -> ScoreContext:
    """ScoreContext over k [B, K, S, D]: slot s holds position s (`pos` overrides); slots at or past
    `length` get garbage keys/values and position 0 (a causal mask alone would let them through) or,
    with pad_pos="next", the positions after the prompt (as the padding of a real prefill)."""
    k = np.array(k, np.float32)
    b, n_kv, s, d = k.shape
    v = np.ones_like(k) if v is None else np.array(v, np.float32)
    pos = np.broadcast_to(np.arange(s), (b, n_kv, s)).copy() if pos is None else np.array(pos)
    length = np.asarray(length, np.int32)
    for i, n in enumerate(length):
        k[i, :, n:] = GARBAGE
        v[i, :, n:] = -GARBAGE
        pos[i, :, n:] = 0 if pad_pos == "zero" else np.arange(n, s)
    cfg = tiny_config(n_heads=n_kv * g, n_kv_heads=n_kv, head_dim=d, rope_theta=rope_theta)
    return ScoreContext(k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos, jnp.int32),
                        length=jnp.asarray(length), n_tokens=jnp.asarray(length), obs=obs or make_obs(b, n_kv * g, d),
                        layer=layer, n_layers=n_layers, cfg=cfg)


def score(method, ctx) -> np.ndarray:
    return np.asarray(method.score(ctx), np.float64)


# ------------------------------------------------------------------------------------- SnapKV
def snapkv_case():
    """1 row, K = 1, G = 2, D = 2; 8 prompt tokens in slots 0..7 of S = 10; obs window 2 (positions 6, 7).

    Keys k_j = [ln w_j, 0] with w = [4, 2, 1, 1, 4, 2, 2, 16]. Scores are q.k / sqrt(2), so a query
    [c sqrt(2), 0] has logits c ln w_j: its attention is proportional to w_j^c over the keys it sees.
      head 0: query@6 c=+1 sees keys 0..6 (key 7 is later: causal) -> [4,2,1,1,4,2,2] / 16
              query@7 c=0  sees keys 0..7                           -> 1/8 each
      head 1: query@6 c=-1: 1/w = [1/4,1/2,1,1,1/4,1/2,1/2], sum 4  -> [1,2,4,4,1,2,2] / 16
              query@7 c=0                                           -> 1/8 each
    (Were key 7 visible to query@6, head 0 would get [4,2,1,1,4,2,2,16] / 32 instead.)
    Window columns 6, 7 are dropped; per head, columns 0..5 in units of 1/32:
      head 0: query@6 [8,4,2,2,8,4], query@7 [4,4,4,4,4,4]
      head 1: query@6 [2,4,8,8,2,4], query@7 [4,4,4,4,4,4]
    """
    w = np.array([4, 2, 1, 1, 4, 2, 2, 16], np.float64)
    k = np.zeros((1, 1, 10, 2))
    k[0, 0, :8, 0] = np.log(w)
    q_win = np.zeros((1, 2, 2, 2))  # [B, W, H, D]
    q_win[0, 0, 0] = [S2, 0]  # query@6 head 0: c = +1
    q_win[0, 0, 1] = [-S2, 0]  # query@6 head 1: c = -1
    obs = make_obs(1, 2, 2, q_win=q_win, win_pos=[[6, 7]])  # query@7: zeros, c = 0
    return make_ctx(k, [8], g=2, obs=obs)


# variant -> expected scores of slots 0..5 (slots 6, 7 = the window get max + 1)
SNAPKV_HAND = {
    # mean over window: head 0 [6,4,3,3,6,4]/32, head 1 [3,4,6,6,3,4]/32
    # avg_pool k=3 (pad 1, zeros counted), units 1/96:
    #   head 0: [0+6+4, 6+4+3, 4+3+3, 3+3+6, 3+6+4, 6+4+0] = [10,13,10,12,13,10]
    #   head 1: [0+3+4, 3+4+6, 4+6+6, 6+6+3, 6+3+4, 3+4+0] = [7,13,16,15,13,7]
    # group mean: [8.5, 13, 13, 13.5, 13, 8.5] / 96
    "k3": (dict(window=2, kernel=3), np.array([8.5, 13, 13, 13.5, 13, 8.5]) / 96),
    # avg_pool k=5 (pad 2), units 1/160:
    #   head 0: [0+0+6+4+3, 0+6+4+3+3, 6+4+3+3+6, 4+3+3+6+4, 3+3+6+4+0, 3+6+4+0+0] = [13,16,22,20,16,13]
    #   head 1: [0+0+3+4+6, 0+3+4+6+6, 3+4+6+6+3, 4+6+6+3+4, 6+6+3+4+0, 6+3+4+0+0] = [13,19,22,23,19,13]
    "k5": (dict(window=2, kernel=5), np.array([13, 17.5, 22, 21.5, 17.5, 13]) / 160),
    # max_pool k=3, units 1/32: head 0 [6,6,4,6,6,6], head 1 [4,6,6,6,6,4] -> mean [5,6,5,6,6,5]
    "max": (dict(window=2, kernel=3, pool="max"), np.array([5, 6, 5, 6, 6, 5]) / 32),
    # sum over the window = 2 x mean: [8.5, 13, 13, 13.5, 13, 8.5] / 48
    "sum": (dict(window=2, kernel=3, reduce="sum"), np.array([8.5, 13, 13, 13.5, 13, 8.5]) / 48),
    # window 1 from an observation of 2 queries: only query@7 (uniform 1/8 over keys 0..7), window
    # column 7 dropped -> [1]*7/8; avg_pool k=3: [2,3,3,3,3,3,2]/24 (both heads, so the group mean too)
    "w1": (dict(window=1, kernel=3), np.array([2, 3, 3, 3, 3, 3, 2]) / 24),
}


@pytest.mark.parametrize("variant", sorted(SNAPKV_HAND))
def test_snapkv_hand_computed(variant):
    kw, expected = SNAPKV_HAND[variant]
    sc = score(SnapKV(**kw), snapkv_case())
    assert sc.shape == (1, 1, 10)
    n = len(expected)
    np.testing.assert_allclose(sc[0, 0, :n], expected, rtol=1e-5, atol=1e-7)
    # the window positions [8 - W, 8) get the max + 1 (kvpress pads with scores.max() + 1)
    np.testing.assert_allclose(sc[0, 0, n:8], expected.max() + 1, rtol=1e-6)
    # PyramidKV scores are SnapKV's
    np.testing.assert_array_equal(score(PyramidKV(**kw), snapkv_case())[..., :8], sc[..., :8])


def test_snapkv_keeps_window_and_best_under_jit():
    ctx = snapkv_case()
    state = DenseKV(k=ctx.k, v=ctx.v, pos=ctx.pos, length=ctx.length)
    method = SnapKV(window=2, kernel=3)

    @jax.jit
    def run(state, obs):  # ScoreContext is built inside jit, as `kvjax.compress` does
        c = dataclasses.replace(ctx, k=state.k, v=state.v, pos=state.pos, length=state.length, obs=obs)
        return method.select(c, state, method.score(c), jnp.array([4]), 4)

    kept = run(state, ctx.obs)
    # scores [8.5, 13, 13, 13.5, 13, 8.5]/96 + window: keep the window (6, 7), 3 (13.5) and one of the
    # ties at 13 (positions 1, 2, 4), in position order
    pos = np.asarray(kept.pos[0, 0]).tolist()
    assert pos == sorted(pos) and {3, 6, 7} <= set(pos) and len(set(pos) & {1, 2, 4}) == 1


# --------------------------------------------------------------------------------------- TOVA
def test_tova_hand_computed():
    # 1 row, K = 2, G = 2 (H = 4), D = 2; 6 prompt tokens in S = 8 slots. Keys k_j = sqrt(2) [ln a_j, ln b_j];
    # last query (position 5) of head h is [1, 0] (attention ∝ a_j) or [0, 1] (∝ b_j), over keys 0..5:
    #   KV 0: a = [1,1,2,4,4,4], b = [8,4,1,1,1,1] (both sum 16)
    #   KV 1: a = [2,2,2,2,4,4], b = [1,1,1,1,8,4]
    #   head 0 (KV 0, a) [1,1,2,4,4,4]/16   head 1 (KV 0, b) [8,4,1,1,1,1]/16
    #   head 2 (KV 1, a) [2,2,2,2,4,4]/16   head 3 (KV 1, b) [1,1,1,1,8,4]/16
    # mean over ALL 4 heads: [12, 8, 6, 8, 17, 13] / 64 -- the same for both KV heads (a per-group
    # mean would give KV 0 [9,5,3,5,5,5]/32 and KV 1 [3,3,3,3,12,8]/32). Position 5: max + 1 = 17/64 + 1.
    a = np.array([[1, 1, 2, 4, 4, 4], [2, 2, 2, 2, 4, 4]], np.float64)
    b = np.array([[8, 4, 1, 1, 1, 1], [1, 1, 1, 1, 8, 4]], np.float64)
    k = np.zeros((1, 2, 8, 2))
    k[0, :, :6] = S2 * np.stack([np.log(a), np.log(b)], -1)
    q_win = np.zeros((1, 2, 4, 2))  # an observation window of 2: TOVA must use only the last query
    q_win[0, 0] = 5.0  # query@4: would change everything if used
    q_win[0, 1] = [[1, 0], [0, 1], [1, 0], [0, 1]]
    ctx = make_ctx(k, [6], g=2, obs=make_obs(1, 4, 2, q_win=q_win, win_pos=[[4, 5]]))
    sc = score(TOVA(), ctx)
    expected = np.array([12, 8, 6, 8, 17]) / 64
    for kv in range(2):
        np.testing.assert_allclose(sc[0, kv, :5], expected, rtol=1e-5)
        np.testing.assert_allclose(sc[0, kv, 5], 17 / 64 + 1, rtol=1e-6)
    assert TOVA().protected() == 1 and TOVA().observations() == ObsSpec(window=1)


# -------------------------------------------------------------------------------------- Knorm
def test_knorm_is_minus_key_norm():
    # K = 2, D = 2: norms |[3,4]| = 5, |[0,0]| = 0, |[1,0]| = 1, |[6,-8]| = 10, |[0,-1]| = 1; no protection
    k = np.zeros((1, 2, 6, 2))
    k[0, 0, :5] = [[3, 4], [0, 0], [1, 0], [6, -8], [0, -1]]
    k[0, 1, :5] = [[0, 0], [6, -8], [0, -1], [3, 4], [1, 0]]
    sc = score(Knorm(), make_ctx(k, [5], g=2))
    np.testing.assert_allclose(sc[0, 0, :5], [-5, 0, -1, -10, -1], rtol=1e-6)
    np.testing.assert_allclose(sc[0, 1, :5], [0, -10, -1, -5, -1], rtol=1e-6)
    assert Knorm().protected() == 0


# ------------------------------------------------------------------------- ObservedAttention / H2O
def test_observed_attention_hand_computed():
    # B = 2 rows of 4 and 3 tokens (S = 5), K = 1, G = 2. Column sums of the prefill attention A[h, i, j]
    # (rows i sum to 1), then score_j = col_j / (T - j) (the number of queries that see key j), group mean.
    # row 0 (T = 4):
    #   head 0, uniform A[i, j] = 1/(i+1): col = [1+1/2+1/3+1/4, 1/2+1/3+1/4, 1/3+1/4, 1/4]
    #                                          = [25, 13, 7, 3] / 12 -> / [4,3,2,1] = [25/48, 13/36, 7/24, 1/4]
    #   head 1, every query on key 0: col = [4, 0, 0, 0] -> [1, 0, 0, 0]
    #   mean: [(25/48 + 1)/2, 13/72, 7/48, 1/8]
    # row 1 (T = 3):
    #   head 0 uniform: col = [11/6, 5/6, 1/3] -> / [3,2,1] = [11/18, 5/12, 1/3]
    #   head 1 diagonal (each query on itself): col = [1, 1, 1] -> [1/3, 1/2, 1]
    #   mean: [17/36, 11/24, 2/3]
    col = np.zeros((2, 2, 5))
    col[0, 0, :4] = np.array([25, 13, 7, 3]) / 12
    col[0, 1, :4] = [4, 0, 0, 0]
    col[1, 0, :3] = [11 / 6, 5 / 6, 1 / 3]
    col[1, 1, :3] = [1, 1, 1]
    np.testing.assert_allclose(col.sum(-1), [[4, 4], [3, 3]])  # each query's probabilities sum to 1
    ctx = make_ctx(np.zeros((2, 1, 5, 2)), [4, 3], g=2, obs=make_obs(2, 2, 2, col_sum=col))
    sc = score(ObservedAttention(), ctx)
    np.testing.assert_allclose(sc[0, 0, :4], [(25 / 48 + 1) / 2, 13 / 72, 7 / 48, 1 / 8], rtol=1e-6)
    np.testing.assert_allclose(sc[1, 0, :3], [17 / 36, 11 / 24, 2 / 3], rtol=1e-6)
    assert methods.get("h2o") == ObservedAttention() and ObservedAttention().observations().col_sums


# -------------------------------------------------------------------------------- ExpectedAttention
def kvpress_expected_attention(keys, values, q_pre, t, n_sink, n_future, inv_freq, use_cov=True, use_vnorm=True,
                               eps=0.0):
    """kvpress 0.5.5 `ExpectedAttentionPress.score` for one row, transcribed to float64 numpy.

    keys, values [K, T, D] (post-RoPE keys); q_pre [T - n_sink, H, D] pre-RoPE queries at positions
    [n_sink, T). Returns [K, T].
    """
    n_kv, _, d = keys.shape
    h = q_pre.shape[1]
    g = h // n_kv
    # get_query_statistics
    mu = q_pre.mean(0)  # [H, D]
    centered = q_pre - mu
    cov = np.einsum("nhi,nhj->hij", centered, centered) / q_pre.shape[0]
    # apply_avg_rope: R = mean_p (cos(p) * Id + sin(p) * P) over p in [T, T + n_future)
    position_ids = np.arange(t, t + n_future)
    freqs = position_ids[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = np.cos(emb), np.sin(emb)  # [F, D]
    eye = np.eye(d)
    p_mat = np.zeros((d, d))
    p_mat[d // 2:, : d // 2], p_mat[: d // 2, d // 2:] = np.eye(d // 2), -np.eye(d // 2)
    rot = (cos[:, None, :] * eye + sin[:, None, :] * p_mat).mean(0)  # torch: cos.unsqueeze(1) * Id
    mu = mu @ rot.T
    cov = rot @ cov @ rot.T
    # score
    k = np.repeat(keys[:, n_sink:], g, axis=0)  # repeat_kv: [H, T', D]
    v = values[:, n_sink:]
    s = np.einsum("hd,htd->ht", mu, k) / math.sqrt(d)
    if use_cov:
        s = s + np.einsum("hti,hij,htj->ht", k, cov, k) / d / 2
    s = np.exp(s - s.max(-1, keepdims=True))
    s = s / s.sum(-1, keepdims=True)
    s = s.reshape(n_kv, g, -1).mean(1)
    if use_vnorm:
        s = (s + eps) * np.linalg.norm(v, axis=-1)
    return np.concatenate([np.full((n_kv, n_sink), s.max() + 1), s], -1)


@pytest.mark.parametrize("kw", [dict(n_future=3, n_sink=2), dict(n_future=5, n_sink=1, use_covariance=False),
                                dict(n_future=2, n_sink=3, use_vnorm=False), dict(n_future=4, n_sink=2, epsilon=0.1),
                                dict(n_future=4, n_sink=0, epsilon=0.1)])
def test_expected_attention_matches_kvpress_transcription(kw):
    # B = 2 rows of 8 and 6 tokens (S = 8), K = 2, G = 2, D = 4, RoPE theta 100 (inv freq [1, 0.1]).
    # The observations are the sums kvjax gathers: q_sum = sum q, q_sq = sum q q^T, q_cnt over [n_sink, T).
    rng = np.random.default_rng(0)
    b, n_kv, g, s, d, theta = 2, 2, 2, 8, 4, 100.0
    lengths = [8, 6]
    keys = rng.normal(size=(b, n_kv, s, d))
    values = rng.normal(size=(b, n_kv, s, d))
    q_pre = [rng.normal(size=(n - kw["n_sink"], n_kv * g, d)) + rng.normal(size=(1, n_kv * g, d)) for n in lengths]
    obs = make_obs(b, n_kv * g, d, q_sum=[q.sum(0) for q in q_pre],
                   q_sq=[np.einsum("nhi,nhj->hij", q, q) for q in q_pre], q_cnt=[len(q) for q in q_pre])
    method = ExpectedAttention(**kw)
    for pad_pos in ("zero", "next"):
        sc = score(method, make_ctx(keys, lengths, g=g, obs=obs, v=values, rope_theta=theta, pad_pos=pad_pos))
        check_expected_attention(sc, keys, values, q_pre, lengths, kw, theta)
    assert method.protected() == kw["n_sink"] and method.observations() == ObsSpec(qstats_from=kw["n_sink"])


def check_expected_attention(sc, keys, values, q_pre, lengths, kw, theta):
    d = keys.shape[-1]
    inv = hf_inv_freq(d, theta).astype(np.float64)
    for i, n in enumerate(lengths):
        ref = kvpress_expected_attention(keys[i, :, :n], values[i, :, :n], q_pre[i], n, kw["n_sink"], kw["n_future"],
                                         inv, kw.get("use_covariance", True), kw.get("use_vnorm", True),
                                         kw.get("epsilon", 0.0))
        m = kw["n_sink"]
        np.testing.assert_allclose(sc[i, :, m:n], ref[:, m:], rtol=2e-4, atol=1e-7)
        # sinks: above every other score of the row (kvpress: max + 1)
        np.testing.assert_allclose(sc[i, :, :m], sc[i, :, m:n].max() + 1, rtol=1e-6)


def test_expected_attention_mean_rotation_explicit():
    # D = 4, theta 100 -> inv freq [1, 0.1]; positions T = 8, 9, 10: R = mean_p [[c0, 0, -s0, 0],
    # [0, c1, 0, -s1], [s0, 0, c0, 0], [0, s1, 0, c1]] with c_i = cos(p f_i), s_i = sin(p f_i)
    from kvjax.methods.expected_attention import mean_rotation

    ctx = make_ctx(np.zeros((1, 1, 8, 4)), [8], g=1, rope_theta=100.0)
    rot = np.asarray(mean_rotation(ctx, 3))[0]
    ps = np.array([8.0, 9.0, 10.0])
    c0, c1, s0, s1 = (np.mean(f(ps * fr)) for f, fr in ((np.cos, 1), (np.cos, 0.1), (np.sin, 1), (np.sin, 0.1)))
    expected = np.array([[c0, 0, -s0, 0], [0, c1, 0, -s1], [s0, 0, c0, 0], [0, s1, 0, c1]])
    np.testing.assert_allclose(rot, expected, atol=1e-6)


# --------------------------------------------------------------------------------- StreamingLLM
def streaming_state(seed=0):
    """B = 2 rows of 10 and 7 tokens (S = 10), K = 2, D = 4: pre-RoPE keys, post-RoPE keys at slot = position."""
    rng = np.random.default_rng(seed)
    pre = rng.normal(size=(2, 2, 10, 4))
    inv = hf_inv_freq(4, 10000.0)
    post = np.stack([np_rope(pre[b].transpose(1, 0, 2), np.arange(10), inv).transpose(1, 0, 2) for b in range(2)])
    ctx = make_ctx(post, [10, 7], g=2, v=rng.normal(size=(2, 2, 10, 4)))
    state = DenseKV(k=ctx.k, v=ctx.v, pos=ctx.pos, length=ctx.length)
    return pre, ctx, state, inv


@pytest.mark.parametrize("rerotate", [False, True])
def test_streaming_llm_keeps_sinks_and_recent(rerotate):
    # n_sink 2, n_keep [6, 4]: row 0 (T = 10) keeps [0, 1] + the last 4 = [6, 7, 8, 9];
    # row 1 (T = 7) keeps [0, 1] + [5, 6] (its garbage slots 7..9 hold position 0: never kept)
    pre, ctx, state, inv = streaming_state()
    method = StreamingLLM(n_sink=2, rerotate=rerotate)
    n_keep = jnp.array([6, 4])
    kept = method.select(ctx, state, method.score(ctx), n_keep, 6)
    expected_pos = [[0, 1, 6, 7, 8, 9], [0, 1, 5, 6]]
    np.testing.assert_array_equal(kept.length, [6, 4])
    np.testing.assert_array_equal(method.next_positions(jnp.array([10, 7]), n_keep), [6, 4] if rerotate else [10, 7])
    for b, orig in enumerate(expected_pos):
        n = len(orig)
        for kv in range(2):
            np.testing.assert_allclose(kept.v[b, kv, :n], np.asarray(ctx.v)[b, kv, orig], rtol=1e-6)
            if rerotate:
                # re-rotated to slot positions 0..n-1: RoPE at the slot, computed from the pre-RoPE keys
                np.testing.assert_array_equal(kept.pos[b, kv, :n], np.arange(n))
                at_slot = np_rope(pre[b, kv, orig][:, None], np.arange(n), inv)[:, 0]
                np.testing.assert_allclose(kept.k[b, kv, :n], at_slot, rtol=1e-5, atol=1e-5)
            else:
                np.testing.assert_array_equal(kept.pos[b, kv, :n], orig)
                np.testing.assert_allclose(kept.k[b, kv, :n], np.asarray(ctx.k)[b, kv, orig], rtol=1e-6)
    np.testing.assert_array_equal(kept.pos[1, :, 4:], EMPTY_POS)


def test_streaming_llm_rerotate_matches_fresh_prefill_of_kept_tokens(lm):
    # layer-0 keys/values depend only on the token and its position: after re-rotation, the cache's
    # layer 0 equals a fresh prefill of the kept tokens at positions 0..n-1; new tokens continue at n.
    rows = [random_ids(13, 1).tolist(), random_ids(21, 2).tolist()]
    cache = lm.prefill(rows, method=StreamingLLM(n_sink=2, rerotate=True), ratio=0.5)
    n_keep = [6, 10]  # int(13 * 0.5), int(21 * 0.5)
    np.testing.assert_array_equal(cache.next_pos, n_keep)
    kept_ids = [r[:2] + r[len(r) - (n - 2):] for r, n in zip(rows, n_keep)]
    fresh = lm.prefill(kept_ids)
    for b, n in enumerate(n_keep):
        np.testing.assert_array_equal(cache.layers[0].pos[b, :, :n], np.broadcast_to(np.arange(n), (2, n)))
        np.testing.assert_allclose(cache.layers[0].k[b, :, :n], fresh.layers[0].k[b, :, :n], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(cache.layers[0].v[b, :, :n], fresh.layers[0].v[b, :, :n], rtol=1e-4, atol=1e-5)
    # without re-rotation the kept keys keep their phases and positions
    plain = lm.prefill(rows, method=StreamingLLM(n_sink=2), ratio=0.5)
    full = lm.prefill(rows)
    np.testing.assert_array_equal(plain.next_pos, [13, 21])
    for b, (r, n) in enumerate(zip(rows, n_keep)):
        orig = list(range(2)) + list(range(len(r) - (n - 2), len(r)))
        np.testing.assert_array_equal(plain.layers[1].pos[b, :, :n], np.broadcast_to(orig, (2, n)))
        np.testing.assert_allclose(plain.layers[1].k[b, :, :n], full.layers[1].k[b][:, orig], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ Random
def test_random_deterministic_per_seed_and_layer():
    ctx0 = make_ctx(np.zeros((2, 2, 12, 2)), [12, 9], g=1)
    ctx1 = dataclasses.replace(ctx0, layer=1)
    a, a2, b = score(Random(seed=0), ctx0), score(Random(seed=0), ctx0), score(Random(seed=0), ctx1)
    np.testing.assert_array_equal(a, a2)
    assert not np.allclose(a, b)  # layers differ
    assert not np.allclose(a, score(Random(seed=1), ctx0))  # seeds differ
    assert a.min() >= 0 and a.max() < 1 and not np.allclose(a[0], a[1])  # uniform [0, 1), rows differ


# ----------------------------------------------------------------------------- budgets and resolve_keep
def test_budget_keep_follows_kvpress():
    # n_kept = max(1, int(T (1 - r))): int truncates (T = 15, r = 0.5: 7.5 -> 7, not 8); float rounding as
    # Python's (10 * (1 - 0.7) = 3.0000000000000004 -> 3; 10 * (1 - 0.9) = 0.9999999999999998 -> 0 -> 1)
    cases = [(15, 0.5, 7), (13, 0.5, 6), (21, 0.5, 10), (19, 0.25, 14), (10, 0.7, 3), (10, 0.9, 1), (13, 0.99, 1),
             (13, 0.0, 13)]
    for t, r, n in cases:
        assert Budget(ratio=r).keep(t) == n == max(1, int(t * (1 - r))), (t, r)
    assert Budget(tokens=16).keep(13) == 13 and Budget(tokens=16).keep(21) == 16
    assert Budget(tokens=5).kept_fraction(20) == 0.25 and Budget(tokens=50).kept_fraction(20) == 1.0


@pytest.mark.parametrize("kw", [dict(ratio=1.0), dict(ratio=-0.1), dict(ratio=1.5), dict(ratio="0.5"),
                                dict(tokens=0), dict(tokens=-3), dict(tokens=2.5), dict(tokens=True), dict(),
                                dict(ratio=0.5, tokens=4)])
def test_budget_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        Budget(**kw)


def test_resolve_keep_per_row_and_protection():
    knorm = Knorm()
    np.testing.assert_array_equal(resolve_keep(knorm, Budget(ratio=0.5), [13, 21], 3), [[6, 10]] * 3)
    np.testing.assert_array_equal(resolve_keep(knorm, Budget(ratio=0.25), [15, 19], 2), [[11, 14]] * 2)
    np.testing.assert_array_equal(resolve_keep(knorm, Budget(tokens=16), [13, 21], 2), [[13, 16]] * 2)
    snap = SnapKV(window=8)
    # a budget >= T keeps everything, even below the window
    np.testing.assert_array_equal(resolve_keep(snap, Budget(tokens=100), [13, 4], 2), [[13, 4]] * 2)
    np.testing.assert_array_equal(resolve_keep(snap, Budget(tokens=8), [5, 21], 2), [[5, 8]] * 2)
    with pytest.raises(ValueError, match="snapkv.*8"):
        resolve_keep(snap, Budget(tokens=5), [13, 21], 2)
    with pytest.raises(ValueError, match="window"):
        resolve_keep(snap, Budget(tokens=5), [5, 21], 2)  # row 0 keeps all, row 1 only 5 < 8
    with pytest.raises(ValueError):
        resolve_keep(snap, Budget(ratio=0.5), [13], 2)  # 6 < 8
    with pytest.raises(ValueError):
        resolve_keep(StreamingLLM(n_sink=4), Budget(ratio=0.9), [13], 2)  # 1 < 4
    with pytest.raises(ValueError):
        # PyramidKV falls back to round(13 * 0.2) = 3 < window 4
        resolve_keep(PyramidKV(window=4, kernel=3), Budget(ratio=0.8), [13], 2)


# ------------------------------------------------------------------------------------------ PyramidKV
def pyramid_reference(t, ratio, window, beta, n_layers, layer):
    """kvpress 0.5.5 `PyramidKVPress.get_layer_budget`, line by line (Python's round: half to even)."""
    max_capacity_prompt = window + t * (1 - ratio)
    min_num = (max_capacity_prompt - window) / beta
    max_num = (max_capacity_prompt - window) * 2 - min_num
    if max_num >= t - window:
        max_num = t - window
        min_num = (max_capacity_prompt - window) * 2 - max_num
    if not (t >= max_num >= min_num >= window):
        return round(t * (1 - ratio))
    steps = (max_num - min_num) / (n_layers - 1)
    return round(max_num - layer * steps)


def test_pyramidkv_layer_budgets_hand_computed():
    pk = PyramidKV()  # window 64, beta 20
    keep = lambda m, t, r, n_layers: [m.layer_keep(Budget(ratio=r), t, l, n_layers) for l in range(n_layers)]  # noqa
    # T = 1000, r = 0.5, L = 30: cap = 564, min = 500/20 = 25, max = 1000 - 25 = 975 >= 936 = T - 64
    # -> max = 936, min = 1000 - 936 = 64; 1000 >= 936 >= 64 >= 64: layer l keeps round(936 - l * 872/29)
    b = keep(pk, 1000, 0.5, 30)
    assert b[0] == 936 and b[1] == 906 and b[-1] == 64  # 936 - 30.07 = 905.93
    assert b == sorted(b, reverse=True) and abs(sum(b) - 30 * 500) <= 15
    # T = 200, r = 0.5, L = 17: max = 136, min = 64, step 72/16 = 4.5: l = 1: 131.5 -> 132, l = 3: 122.5 -> 122
    b = keep(pk, 200, 0.5, 17)
    assert (b[0], b[1], b[2], b[3], b[16]) == (136, 132, 127, 122, 64)
    # T = 100, r = 0.5: max = 36 < min = 64 -> every layer round(50) = 50
    assert keep(pk, 100, 0.5, 4) == [50] * 4
    # fallback rounds half to even: round(12.5) = 12, round(13.5) = 14
    assert keep(pk, 25, 0.5, 3) == [12] * 3 and keep(pk, 27, 0.5, 3) == [14] * 3
    # beta = 1: min = max = 500 -> flat; beta = 2: min 250, max 750 -> linear
    assert keep(PyramidKV(beta=1), 1000, 0.5, 5) == [500] * 5
    assert keep(PyramidKV(beta=2), 1000, 0.5, 3) == [750, 500, 250]
    # one layer: kvpress divides by L - 1 = 0; kvjax falls back to round(T (1 - r))
    assert keep(pk, 1000, 0.5, 1) == [500]
    # budget= in tokens: T = 20, 10 tokens, window 4: max 16, min 4 -> [16, 4]
    small = PyramidKV(window=4, kernel=3)
    assert [small.layer_keep(Budget(tokens=10), 20, l, 2) for l in range(2)] == [16, 4]
    # the tiny model's prompts: T = 13 -> [9, 4], T = 21 -> [17, 4] (window 4, r = 0.5)
    np.testing.assert_array_equal(resolve_keep(small, Budget(ratio=0.5), [13, 21], 2), [[9, 17], [4, 4]])


def test_pyramidkv_layer_budgets_match_kvpress_formula():
    for t in (13, 21, 64, 100, 128, 200, 500, 1000, 4096):
        for r in (0.1, 0.25, 0.5, 0.75, 0.9):
            for window in (4, 64):
                for beta in (1, 2, 20):
                    for n_layers in (2, 3, 30):
                        m = PyramidKV(window=window, beta=beta)
                        got = [m.layer_keep(Budget(ratio=r), t, l, n_layers) for l in range(n_layers)]
                        ref = [max(1, pyramid_reference(t, r, window, beta, n_layers, l)) for l in range(n_layers)]
                        assert got == ref, (t, r, window, beta, n_layers)


# ------------------------------------------------------------------------------------------ keep_top
def test_keep_top_hand_computed():
    # B = 2, K = 2, S = 6, D = 2; lengths [5, 3], n_keep [3, 2], capacity 3. Slots hold positions out of
    # order; k[b, kv, s] = [s, 10 b + kv] names the source slot. Unused slots: score 1e9 (never kept).
    pos = np.array([[[4, 0, 3, 1, 2, 9], [0, 1, 2, 3, 4, 9]],
                    [[2, 1, 0, 0, 0, 0], [0, 1, 2, 0, 0, 0]]], np.int32)
    scores = np.array([[[.9, .1, .5, .7, .2, 1e9], [.3, .8, .1, .6, .9, 1e9]],
                       [[.2, .4, .6, 1e9, 1e9, 1e9], [.5, -1, .7, 1e9, 1e9, 1e9]]], np.float32)
    # row 0 head 0: top 3 = slots 0 (.9, pos 4), 3 (.7, pos 1), 2 (.5, pos 3) -> by position: slots 3, 2, 0
    # row 0 head 1: slots 4 (.9, pos 4), 1 (.8, pos 1), 3 (.6, pos 3)          -> slots 1, 3, 4
    # row 1 head 0: top 2 = slots 2 (.6, pos 0), 1 (.4, pos 1)                  -> slots 2, 1
    # row 1 head 1: slots 2 (.7, pos 2), 0 (.5, pos 0)                          -> slots 0, 2
    k = np.zeros((2, 2, 6, 2), np.float32)
    for b in range(2):
        for kv in range(2):
            k[b, kv, :, 0] = np.arange(6)
            k[b, kv, :, 1] = 10 * b + kv
    state = DenseKV(k=jnp.asarray(k), v=jnp.asarray(-k), pos=jnp.asarray(pos), length=jnp.array([5, 3], jnp.int32))
    out = jax.jit(lambda st, sc, n: st.keep_top(sc, n, 3))(state, jnp.asarray(scores), jnp.array([3, 2]))
    slots = {(0, 0): [3, 2, 0], (0, 1): [1, 3, 4], (1, 0): [2, 1], (1, 1): [0, 2]}
    assert out.k.shape == (2, 2, 3, 2)
    np.testing.assert_array_equal(out.length, [3, 2])
    for (b, kv), sl in slots.items():
        n = len(sl)
        np.testing.assert_array_equal(out.pos[b, kv, :n], pos[b, kv, sl])
        assert list(np.asarray(out.pos[b, kv, :n])) == sorted(pos[b, kv, sl])
        np.testing.assert_array_equal(out.k[b, kv, :n], k[b, kv, sl])
        np.testing.assert_array_equal(out.v[b, kv, :n], -k[b, kv, sl])
    np.testing.assert_array_equal(out.pos[1, :, 2], EMPTY_POS)  # row 1 holds 2 of 3 slots
    # bytes: per layer k, v 2 * (2*2*3*2) * 4 = 192, pos 2*2*3 * 4 = 48, length 2 * 4 = 8; next_pos 8
    cache = KVCache(layers=(out, out), next_pos=jnp.array([5, 3], jnp.int32))
    assert kvjax.cache_nbytes(cache) == 2 * (192 + 48 + 8) + 8 == 504


def dense_nbytes(cfg, batch, capacities) -> int:
    """Bytes of a dense cache with the given per-layer slot counts: k, v, pos, length; plus next_pos."""
    item = np.dtype(cfg.dtype).itemsize
    per_slot = 2 * cfg.n_kv_heads * cfg.head_dim * item + cfg.n_kv_heads * 4
    return sum(batch * (c * per_slot + 4) for c in capacities) + batch * 4


# ----------------------------------------------------------------------------- observations in prefill
def numpy_attention_layers(params, cfg, ids) -> list[dict]:
    """Per layer: pre-/post-RoPE queries [T, H, D], post-RoPE keys [T, K, D] and the causal attention
    probabilities [H, T, T], from the tiny model's params in float64 (an independent numpy Llama)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    h_, k_, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    inv = hf_inv_freq(d, cfg.rope_theta)
    t = len(ids)
    pos = np.arange(t)
    x = p["embed"]["embedding"][np.asarray(ids)]
    out = []
    for i in range(cfg.n_layers):
        lp = p[f"layers_{i}"]
        h = rms_norm(x, lp["attn_norm"]["scale"], cfg.rms_eps)
        q_pre = (h @ lp["attn"]["q_proj"]["kernel"]).reshape(t, h_, d)
        k = np_rope((h @ lp["attn"]["k_proj"]["kernel"]).reshape(t, k_, d), pos, inv)
        v = (h @ lp["attn"]["v_proj"]["kernel"]).reshape(t, k_, d)
        q = np_rope(q_pre, pos, inv)
        kh, vh = np.repeat(k, h_ // k_, axis=1), np.repeat(v, h_ // k_, axis=1)
        sc = np.einsum("thd,shd->hts", q, kh) / math.sqrt(d)
        sc = np.where(np.tril(np.ones((t, t), bool))[None], sc, -np.inf)
        probs = np.exp(sc - sc.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("hts,shd->thd", probs, vh).reshape(t, h_ * d)
        x = x + attn @ lp["attn"]["o_proj"]["kernel"]
        h = rms_norm(x, lp["mlp_norm"]["scale"], cfg.rms_eps)
        mlp = lp["mlp"]
        x = x + (silu(h @ mlp["gate_proj"]["kernel"]) * (h @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
        out.append(dict(q_pre=q_pre, q=q, k=k, v=v, probs=probs))
    return out


def test_observations_equal_dense_computation(lm, monkeypatch):
    # chunks of 8 over prompts of 13 and 21 tokens (padded to 24): the window of 6 queries spans two
    # chunks in both rows (7..12 and 15..20), query statistics start inside the first chunk (position 2),
    # column sums see keys from earlier chunks, and row 0 has nothing in the last chunk.
    cfg = lm.cfg
    rows = [random_ids(13, 7).tolist(), random_ids(21, 8).tolist()]
    lengths = np.array([13, 21], np.int32)
    tokens = np.zeros((2, 24), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    spec = ObsSpec(window=6, col_sums=True, qstats_from=2)
    with monkeypatch.context() as m:
        m.setattr(generation, "PREFILL_CHUNK", 8)  # read at trace time: drop the compiled programs
        jax.clear_caches()
        try:
            cache = init_cache(cfg.n_layers, 2, cfg.n_kv_heads, 24, cfg.head_dim, cfg.jnp_dtype)
            _, cache, obs = generation.prefill(lm.params, cfg, tokens, lengths, cache, observe=spec)
        finally:
            jax.clear_caches()
    np.testing.assert_array_equal(cache.next_pos, lengths)
    assert len(obs) == cfg.n_layers
    for b, r in enumerate(rows):
        t = len(r)
        ref = numpy_attention_layers(lm.params, cfg, r)
        for layer, (o, want) in enumerate(zip(obs, ref)):
            where = f"row {b} layer {layer}"
            col = np.asarray(o.col_sum[b])  # [H, S]
            assert col.shape == (cfg.n_heads, 24)
            np.testing.assert_allclose(col[:, :t], want["probs"].sum(1), rtol=1e-4, atol=1e-5, err_msg=where)
            np.testing.assert_array_equal(col[:, t:], 0, err_msg=where)  # padding slots receive nothing
            np.testing.assert_allclose(col.sum(-1), t, rtol=1e-5, err_msg=where)  # each query's row sums to 1
            np.testing.assert_array_equal(o.win_pos[b], np.arange(t - 6, t), err_msg=where)
            np.testing.assert_allclose(o.q_win[b], want["q"][t - 6:], rtol=1e-4, atol=1e-5, err_msg=where)
            q = want["q_pre"][2:]
            assert float(o.q_cnt[b]) == t - 2
            np.testing.assert_allclose(o.q_sum[b], q.sum(0), rtol=1e-4, atol=1e-4, err_msg=where)
            np.testing.assert_allclose(o.q_sq[b], np.einsum("thi,thj->hij", q, q), rtol=1e-4, atol=1e-4,
                                       err_msg=where)
            # and the cache holds the same post-RoPE keys
            np.testing.assert_allclose(cache.layers[layer].k[b, :, :t], want["k"].transpose(1, 0, 2), rtol=1e-4,
                                       atol=1e-5, err_msg=where)


# ------------------------------------------------------------------------------ every registered method
# {name: [mild kwargs, aggressive kwargs]}: windows small enough for the tiny prompts (13 and 21 tokens)
METHOD_TABLE = {
    "snapkv": [dict(window=4, kernel=3), dict(window=2, kernel=5, reduce="sum", pool="max")],
    "pyramidkv": [dict(window=4, kernel=3), dict(window=2, kernel=5, beta=2)],
    "tova": [{}, {}],
    "knorm": [{}, {}],
    "observed_attention": [{}, {}],
    "expected_attention": [dict(n_future=8, n_sink=2), dict(n_future=1, n_sink=0, use_covariance=False,
                                                            use_vnorm=False)],
    "streaming_llm": [dict(n_sink=2), dict(n_sink=1, rerotate=True)],
    "random": [dict(seed=0), dict(seed=3)],
    "keydiff": [{}, {}],
    "lagkv": [dict(n_sink=2, lag_size=4), dict(n_sink=1, lag_size=3, cross_scoring=True)],
    "cur": [dict(num_sinks=2, local_window_size=4), dict(num_sinks=0, leverage_type="kv_avg",
                                                         use_local_approximation=False)],
    "non_causal_attention": [dict(chunk_size=8), dict(chunk_size=4)],
    "leverage": [dict(sketch_dimension=4), dict(sketch_dimension=2, seed=3)],
    "finch": [dict(window=4), dict(window=2, normalize_scores=False, rerotate=False)],
}
ROWS = [(13, 1), (21, 2)]  # (length, seed) of the two prompts
N_NEW = 8


# need a trained run, a second model pass (kvzip) or their own states or layer sharing: tested there
TRAINED = {"locret": "test_locret.py", "matryoshka": "test_train_matryoshka.py", "duo": "test_duo.py",
           "kvzip": "test_kvzip.py", "cla": "test_crosslayer.py", "kvsharer": "test_crosslayer.py",
           "simlayerkv": "test_methods_more.py", "minicache": "test_layermerge.py", "xkv": "test_layermerge.py",
           "expected_attention_stats": "test_methods_more.py", "qfilter": "test_methods_more.py",
           "palu": "test_palu.py", "kvzap": "test_kvzap.py"}


def test_method_table_covers_the_registry():
    assert set(METHOD_TABLE) | set(TRAINED) == set(methods.registry())
    assert not set(METHOD_TABLE) & set(TRAINED)


def protected_positions(method, t: int) -> set[int]:
    """Positions `method` must keep in a prompt of t tokens (kvpress: window / sinks / last token)."""
    if isinstance(method, SnapKV):  # PyramidKV too
        return set(range(t - method.window, t))
    if isinstance(method, TOVA):
        return {t - 1}
    if isinstance(method, (ExpectedAttention, StreamingLLM)):
        return set(range(method.n_sink))
    return set()


def one_row(cache: KVCache, b: int) -> KVCache:
    return jax.tree_util.tree_map(lambda x: x[b:b + 1], cache)


@pytest.mark.parametrize("name,which", [(n, w) for n in sorted(METHOD_TABLE) for w in (0, 1)])
def test_every_method_end_to_end(lm, name, which):
    cfg = lm.cfg
    method = methods.registry()[name](**METHOD_TABLE[name][which])
    rows = [random_ids(n, s).tolist() for n, s in ROWS]
    lengths = [len(r) for r in rows]
    n_keep = resolve_keep(method, Budget(ratio=0.5), lengths, cfg.n_layers)  # [L, B]
    if not isinstance(method, PyramidKV):
        np.testing.assert_array_equal(n_keep, [[6, 10]] * cfg.n_layers)  # int(13 / 2), int(21 / 2)
    cache = lm.prefill(rows, method=method, ratio=0.5)
    full = lm.prefill(rows)
    rerotate = getattr(method, "rerotate", False)
    np.testing.assert_array_equal(cache.next_pos, n_keep[0] if rerotate else lengths)
    for layer, (state, ref) in enumerate(zip(cache.layers, full.layers)):
        cap = int(n_keep[layer].max())
        assert state.k.shape == state.v.shape == (2, cfg.n_kv_heads, cap, cfg.head_dim)
        assert state.pos.shape == (2, cfg.n_kv_heads, cap)
        np.testing.assert_array_equal(state.length, n_keep[layer])
        for b, t in enumerate(lengths):
            n = int(n_keep[layer, b])
            pos = np.asarray(state.pos[b, :, :n])
            np.testing.assert_array_equal(pos[:, 1:] > pos[:, :-1], True)  # sorted, unique
            assert pos.min() >= 0 and pos.max() < t
            np.testing.assert_array_equal(state.pos[b, :, n:], EMPTY_POS)
            np.testing.assert_array_equal(kvjax.kept_positions(one_row(cache, b))[layer][0], pos)
            if rerotate:
                np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(n), pos.shape))
                continue
            for kv in range(cfg.n_kv_heads):
                assert protected_positions(method, t) <= set(pos[kv].tolist()), (layer, b, kv)
                # kept slots hold the prefill's keys and values of those positions
                np.testing.assert_allclose(state.k[b, kv, :n], ref.k[b, kv, pos[kv]], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(state.v[b, kv, :n], ref.v[b, kv, pos[kv]], rtol=1e-5, atol=1e-6)
            if isinstance(method, (TOVA, StreamingLLM)):  # one set shared by every KV head
                np.testing.assert_array_equal(pos, np.broadcast_to(pos[0], pos.shape))
            if isinstance(method, StreamingLLM):
                s = method.n_sink
                np.testing.assert_array_equal(pos[0], list(range(s)) + list(range(t - (n - s), t)))
    # memory: exactly the kept capacity, well below an uncompressed cache of capacity exactly T
    capacities = [int(c) for c in n_keep.max(1)]
    assert kvjax.cache_nbytes(cache) == dense_nbytes(cfg, 2, capacities)
    assert kvjax.cache_nbytes(cache) < 0.85 * dense_nbytes(cfg, 2, [max(lengths)] * cfg.n_layers)

    # generate with the method == first token from the full prefill, then the rest from the compressed cache
    gen = lm.generate(rows, max_new_tokens=N_NEW, method=method, ratio=0.5, stop_at_eos=False)
    assert [len(g) for g in gen.ids] == [N_NEW, N_NEW]
    first = lm.generate(rows, max_new_tokens=1, stop_at_eos=False).ids
    assert [g[:1] for g in gen.ids] == first
    cont = lm.generate([g[:1] for g in gen.ids], max_new_tokens=N_NEW - 1, cache=cache, stop_at_eos=False)
    assert cont.ids == [g[1:] for g in gen.ids]
    np.testing.assert_array_equal(gen.cache.next_pos, np.asarray(cache.next_pos) + N_NEW)


def test_random_method_reproducible_on_the_model(lm):
    rows = [random_ids(n, s).tolist() for n, s in ROWS]
    kept = lambda c: [np.asarray(l.pos) for l in c.layers]  # noqa: E731
    a = kept(lm.prefill(rows, method=Random(seed=0), ratio=0.5))
    b = kept(lm.prefill(rows, method="random", ratio=0.5))
    c = kept(lm.prefill(rows, method=Random(seed=1), ratio=0.5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not np.array_equal(a[0], a[1])  # layers keep different sets


def test_budget_in_tokens_on_the_model(lm):
    rows = [random_ids(n, s).tolist() for n, s in ROWS]
    cache = lm.prefill(rows, method=SnapKV(window=4, kernel=3), budget=16)  # row 0 (13 tokens) keeps all
    for state in cache.layers:
        np.testing.assert_array_equal(state.length, [13, 16])
        np.testing.assert_array_equal(state.pos[0, :, :13], np.broadcast_to(np.arange(13), (2, 13)))
    assert kvjax.cache_nbytes(cache) == dense_nbytes(lm.cfg, 2, [16, 16])


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make", [
    lambda: SnapKV(kernel=4), lambda: SnapKV(kernel=0), lambda: SnapKV(window=0), lambda: SnapKV(window=-1),
    lambda: SnapKV(reduce="max"), lambda: SnapKV(pool="min"), lambda: SnapKV(window=2.5),
    lambda: PyramidKV(beta=0), lambda: PyramidKV(window=0), lambda: PyramidKV(kernel=2),
    lambda: ExpectedAttention(n_future=0), lambda: ExpectedAttention(n_sink=-1), lambda: ExpectedAttention(n_sink=1.5),
    lambda: StreamingLLM(n_sink=-1),
])
def test_method_params_out_of_range(make):
    c0 = compile_seconds()
    with pytest.raises(ValueError):
        make()
    assert compile_seconds() == c0


def test_compression_requests_rejected_before_compiling(lm):
    rows = [random_ids(n, s).tolist() for n, s in ROWS]
    cache = lm.prefill(rows)
    c0 = compile_seconds()
    with pytest.raises(ValueError, match="unknown method 'nope'") as e:
        lm.prefill(rows, method="nope", ratio=0.5)
    for known in methods.registry():
        assert known in str(e.value)
    bad = [
        (dict(ratio=0.5), "method"),
        (dict(budget=4), "method"),
        (dict(method="snapkv"), "ratio"),
        (dict(method="knorm", ratio=1.0), "ratio"),
        (dict(method="knorm", ratio=-0.5), "ratio"),
        (dict(method="knorm", budget=0), "budget"),
        (dict(method="knorm", budget=-2), "budget"),
        (dict(method="knorm", ratio=0.5, budget=4), "exactly one"),
        (dict(method="snapkv", ratio=0.5), "window"),  # default window 64 > 6 kept of 13
        (dict(method=SnapKV(window=8), budget=5), "window"),
        (dict(method=3, ratio=0.5), "method"),
        (dict(method="compose(kivi-2, snapkv)", ratio=0.5), "comes before the method snapkv"),
        (dict(method="compose(snapkv, knorm)", ratio=0.5), "two token methods"),
        (dict(method="compose(snapkv, nope)", ratio=0.5), "unknown method 'nope'"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            lm.prefill(rows, **kw)
        with pytest.raises(ValueError, match=match):
            lm.generate(rows, max_new_tokens=4, **kw)
    with pytest.raises(ValueError, match="cache="):
        lm.generate(rows, max_new_tokens=4, cache=cache, method="knorm", ratio=0.5)
    assert compile_seconds() == c0
