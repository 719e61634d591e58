"""Compression while the cache fills (`kvjax.recompress`) on the tiny model, against reference loops written
here in numpy:

* decode-time compression (kvpress 0.5.5 DecodingPress semantics): the reference feeds one token at a time
  through the model's forward on a plain `DenseKV` of the tokens it holds, keeps the post-RoPE queries of
  the decode steps since the last compression (RoPE from the independent `numpy_llama`), and every
  `compression_interval` tokens scores every layer's held tokens with SnapKV (kvpress: the last `window`
  queries' softmax over all held keys, causal, mean over the window, window columns zeroed, avg-pool
  kernel 5 with zero padding, mean over the KV group, window keys get max + 1) and keeps the top
  `target_size` per KV head. The greedy tokens and the kept positions must match, row by row.
* chunked compression: after every prefill chunk the reference scores what it holds with that chunk's
  last `window` queries the same way and keeps the budget rule at the tokens seen so far.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_llama import apply_rope as np_rope
from numpy_llama import hf_inv_freq
from test_decode_eviction import RefLayer, _forward_fn, _softmax

import kvjax
from kvjax import methods
from kvjax.recompress import DecodeCompression
from kvjax.states import DenseKV, KVCache
from kvjax.testing import random_ids, tiny_lm
from kvjax.timing import compile_seconds

W, KERNEL = 4, 5
SNAP = f"snapkv(window={W})"
N_NEW = 32
REF_SLOTS = 96  # the reference's dense cache (one compiled forward per fed length)


@pytest.fixture(scope="module", autouse=True)
def exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(seed=0)


# --------------------------------------------------------------------------------- reference
def snap_scores(layer: RefLayer, queries: np.ndarray, q_pos: np.ndarray, n_tokens: int, group: int) -> np.ndarray:
    """kvpress SnapKV scores [K, n] of a layer's held tokens (in position order) from window queries
    [W, H, D] (post-RoPE) at positions q_pos [W]; `n_tokens` the tokens seen (the window: the last W)."""
    d = queries.shape[-1]
    kk = np.repeat(layer.k, group, axis=0)  # [H, n, D]
    sc = np.einsum("whd,hsd->hws", queries, kk) / np.sqrt(d)
    visible = layer.pos[np.arange(kk.shape[0]) // group][:, None, :] <= q_pos[None, :, None]  # [H, W, n]
    attn = _softmax(np.where(visible, sc, -np.inf)).mean(1)  # [H, n]
    in_window = layer.pos >= n_tokens - W  # [K, n]
    attn = np.where(np.repeat(in_window, group, axis=0), 0.0, attn)
    pad = np.pad(attn, [(0, 0), (KERNEL // 2, KERNEL // 2)])
    pooled = np.stack([pad[:, i:i + attn.shape[1]] for i in range(KERNEL)]).sum(0) / KERNEL
    scores = pooled.reshape(layer.k.shape[0], group, -1).mean(1)  # [K, n]
    top = np.where(in_window, -np.inf, scores).max(initial=0.0)
    return np.where(in_window, top + 1.0, scores)


def keep_top(layer: RefLayer, scores: np.ndarray, n_keep: int) -> None:
    """The layer keeps its top `n_keep` tokens per KV head (ties: the earlier slot), in position order."""
    keep = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :n_keep], axis=1)
    take = lambda x: np.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), 1)  # noqa: E731
    layer.pos, layer.k, layer.v, layer.score = take(layer.pos), take(layer.k), take(layer.v), take(layer.score)


class Reference:
    """One row fed through the model's forward on a `DenseKV` of what each layer holds (numpy)."""

    def __init__(self, lm, capacity: int):
        self.lm, self.cfg, self.capacity = lm, lm.cfg, capacity
        cfg = lm.cfg
        self.group, self.inv_freq = cfg.n_heads // cfg.n_kv_heads, hf_inv_freq(cfg.head_dim, cfg.rope_theta)
        n_kv, d = cfg.n_kv_heads, cfg.head_dim
        self.layers = [RefLayer(np.zeros((n_kv, 0), np.int64), np.zeros((n_kv, 0, d)), np.zeros((n_kv, 0, d)),
                                np.zeros((n_kv, 0))) for _ in range(cfg.n_layers)]
        self.seen = 0

    def feed(self, ids) -> tuple[np.ndarray, list[np.ndarray]]:
        """Feed `ids` at the next positions: (logits of the last [V], post-RoPE queries per layer [T, H, D])."""
        cfg, t = self.cfg, len(ids)
        pos = np.arange(self.seen, self.seen + t)
        cache = KVCache(layers=tuple(x.dense(self.capacity, cfg.jnp_dtype) for x in self.layers),
                        next_pos=jnp.asarray([self.seen], jnp.int32))
        logits, cache, qs = _forward_fn(cfg)(self.lm.params, jnp.asarray([ids], jnp.int32),
                                             jnp.asarray(pos[None], jnp.int32), cache)
        queries = []
        for i, layer in enumerate(self.layers):
            n = layer.n
            for j in range(t):
                layer.append(int(pos[j]), np.asarray(cache.layers[i].k, np.float64)[0, :, n + j],
                             np.asarray(cache.layers[i].v, np.float64)[0, :, n + j])
            q = np.asarray(qs[i], np.float64)[0].reshape(t, cfg.n_heads, cfg.head_dim)
            queries.append(np_rope(q, pos, self.inv_freq))
        self.seen += t
        return np.asarray(logits)[0, -1], queries

    def compress(self, window_queries: list[np.ndarray], n_keep: int) -> None:
        """Every layer keeps its top `n_keep` by SnapKV with its last W queries (positions seen - W ..)."""
        q_pos = np.arange(self.seen - W, self.seen)
        for layer, q in zip(self.layers, window_queries):
            if layer.n > n_keep:
                keep_top(layer, snap_scores(layer, q[-W:], q_pos, self.seen, self.group), n_keep)

    def held(self) -> list[np.ndarray]:
        return [np.sort(x.pos, axis=1) for x in self.layers]


def reference_decoding(lm, prompt, d: DecodeCompression, n_new: int, prompt_keep: int | None = None):
    """(greedy tokens, held positions per layer) of DecodingPress over `prompt` (with `prompt_keep`: the
    prompt compressed first to that many tokens by SnapKV, PrefillDecodingPress)."""
    ref = Reference(lm, REF_SLOTS)
    logits, qs = ref.feed(prompt)
    if prompt_keep is not None:
        ref.compress(qs, prompt_keep)
    tokens, buffer, count = [], [[] for _ in ref.layers], 0
    for _ in range(n_new):
        token = int(np.argmax(logits))
        tokens.append(token)
        logits, qs = ref.feed([token])
        count += 1
        for b, q in zip(buffer, qs):
            b.append(q[0])
        if count >= d.compression_interval:
            assert all(len(b) >= W for b in buffer)
            target = d.target(ref.seen)
            ref.compress([np.stack(b) for b in buffer], target)
            buffer, count = [[] for _ in ref.layers], 0
        buffer = [b[-d.hidden_states_buffer_size:] if d.hidden_states_buffer_size else [] for b in buffer]
    return tokens, ref.held()


def lib_held(layer, row: int) -> np.ndarray:
    n = int(np.asarray(layer.length)[row])
    return np.sort(np.asarray(layer.pos)[row, :, :n], axis=1)


# ------------------------------------------------------------------------------- decode-time
PROMPTS = ((14, 3), (9, 7))  # one longer than the target, one shorter


@pytest.mark.parametrize("case", ["target_size", "ratio", "prefill_ratio"])
def test_decoding_matches_reference_loop(lm, case):
    rows = [random_ids(n, seed).tolist() for n, seed in PROMPTS]
    if case == "ratio":  # CompressionRatioDecodingPress
        d, kw, prompt_keep = DecodeCompression(compression_interval=7, target_compression_ratio=0.6,
                                               hidden_states_buffer_size=4), {}, None
    else:
        d = DecodeCompression(compression_interval=6, target_size=10, hidden_states_buffer_size=4)
        kw, prompt_keep = ({}, None) if case == "target_size" else (dict(ratio=0.5), 0.5)
    out = lm.generate(rows, method=SNAP, max_new_tokens=N_NEW, stop_at_eos=False, decoding=d, **kw)
    for r, prompt in enumerate(rows):
        keep = None if prompt_keep is None else max(1, int(len(prompt) * (1 - prompt_keep)))
        tokens, held = reference_decoding(lm, prompt, d, N_NEW, keep)
        assert out.ids[r] == tokens, f"{case} row {r}"
        for i, layer in enumerate(out.cache.layers):
            np.testing.assert_array_equal(lib_held(layer, r), held[i], err_msg=f"{case} row {r} layer {i}")
    # the cache never grew: one dense state of max(kept) + interval slots (rounded) for the whole generation
    assert {layer.k.shape[2] for layer in out.cache.layers} == {64}
    assert np.asarray(out.cache.next_pos).tolist() == [len(p) + N_NEW for p in rows]


def test_decoding_compresses_every_interval(lm):
    """Right after the interval-th token the cache holds target_size; one token later target_size + 1."""
    prompt = random_ids(20, 11).tolist()
    d = DecodeCompression(compression_interval=5, target_size=12, hidden_states_buffer_size=4)
    for n, held in ((4, 24), (5, 12), (6, 13), (10, 12), (13, 15)):
        out = lm.generate(prompt, method="knorm", max_new_tokens=n, stop_at_eos=False, decoding=d)
        assert [int(np.asarray(x.length)[0]) for x in out.cache.layers] == [held] * lm.cfg.n_layers, n


# ------------------------------------------------------------------------------- chunked prefill
@pytest.mark.parametrize("chunk,length,ratio", [(12, 37, 0.6)])  # the last chunk: 1 token (its window: 3 before)
def test_chunked_prefill_matches_reference(lm, chunk, length, ratio):
    prompt = random_ids(length, 5).tolist()
    logits, cache = lm.prefill(prompt, method=SNAP, ratio=ratio, chunked_compression=chunk, return_logits=True)
    ref = Reference(lm, REF_SLOTS)
    budget = methods.Budget(ratio=ratio)
    seen_q = None
    for start in range(0, length, chunk):
        last, qs = ref.feed(prompt[start:start + chunk])
        seen_q = qs if seen_q is None else [np.concatenate([a, b]) for a, b in zip(seen_q, qs)]
        ref.compress(seen_q, budget.keep(ref.seen))
    for i, layer in enumerate(cache.layers):
        np.testing.assert_array_equal(lib_held(layer, 0), ref.held()[i], err_msg=f"layer {i}")
        assert int(np.asarray(layer.length)[0]) == budget.keep(length)
    np.testing.assert_allclose(np.asarray(logits)[0], last, rtol=1e-4, atol=1e-4)


def test_chunked_bound_and_one_chunk_equals_after_prefill(lm):
    prompt = random_ids(60, 2).tolist()
    plan = lm._plan([prompt], SNAP, 0.5, chunked_compression=16)
    from kvjax.recompress import slots_for
    assert slots_for(plan) == 30 + 16  # budget + chunk per layer and head, never more
    assert plan.chunk_keep[:, 0, 0].tolist() == [8, 16, 24, 30]
    # a chunk holding the whole prompt: exactly compress-after-prefill
    one = lm.prefill(prompt, method=SNAP, ratio=0.5, chunked_compression=64)
    after = lm.prefill(prompt, method=SNAP, ratio=0.5)
    for a, b in zip(one.layers, after.layers):
        np.testing.assert_array_equal(lib_held(a, 0), lib_held(b, 0))
    # rows of different lengths in one batch: each as alone (a finished row keeps what it holds)
    short = random_ids(37, 4).tolist()
    both = lm.prefill([prompt, short], method=SNAP, ratio=0.5, chunked_compression=16)
    alone = lm.prefill(short, method=SNAP, ratio=0.5, chunked_compression=16)
    for a, b in zip(both.layers, alone.layers):
        np.testing.assert_array_equal(lib_held(a, 1), lib_held(b, 0))
    # generate takes the switch too, and continues from the bounded cache
    out = lm.generate(prompt, method=SNAP, ratio=0.5, chunked_compression=16, max_new_tokens=5, stop_at_eos=False)
    assert len(out.ids) == 5 and all(int(np.asarray(x.length)[0]) == 35 for x in out.cache.layers)


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_before_compiling(lm):
    prompt = random_ids(30, 1).tolist()
    c0 = compile_seconds()
    for bad in (0, -4, 2.5):
        with pytest.raises(ValueError, match="chunk size must be a positive integer"):
            lm.prefill(prompt, method=SNAP, ratio=0.5, chunked_compression=bad)
    with pytest.raises(ValueError, match="after chunk 1 .8 tokens. snapkv always keeps 4"):
        lm.prefill(prompt, method=SNAP, ratio=0.6, chunked_compression=8)  # keeps 3 of the first 8
    with pytest.raises(ValueError, match="shorter than"):
        lm.prefill(random_ids(130, 1).tolist(), method="snapkv", ratio=0.5, chunked_compression=32)  # window 64
    with pytest.raises(ValueError, match="always keeps 4"):  # the protected window
        lm.generate(prompt, method=SNAP, decoding=DecodeCompression(compression_interval=8, target_size=3))
    with pytest.raises(ValueError, match="always keeps 6"):  # ExpectedAttention's sinks
        lm.generate(prompt, method="expected_attention(n_sink=6)", decoding=DecodeCompression(
            compression_interval=8, target_size=5))
    with pytest.raises(ValueError, match="query window is 4"):
        lm.generate(prompt, method=SNAP, decoding=DecodeCompression(compression_interval=8, target_size=8,
                                                                    hidden_states_buffer_size=2))
    with pytest.raises(ValueError, match="compression_interval must be an integer >= 1"):
        DecodeCompression(compression_interval=0)
    with pytest.raises(ValueError, match="not both"):
        DecodeCompression(target_size=8, target_compression_ratio=0.5)
    with pytest.raises(ValueError, match="plain score method"):
        lm.generate(prompt, method="adakv:snapkv", decoding=DecodeCompression(compression_interval=8, target_size=8))
    with pytest.raises(ValueError, match="without quant="):
        lm.prefill(prompt, method="knorm", ratio=0.5, quant="int8", chunked_compression=8)
    with pytest.raises(ValueError, match="needs a score method"):
        lm.prefill(prompt, chunked_compression=8)
    assert compile_seconds() == c0
    assert isinstance(DenseKV, type) and kvjax is not None


def test_eval_configs_prefill_alone_when_chunked(lm):
    from kvjax.eval import runner
    full, snap = runner.make_configs(["full", SNAP], [0.5], chunk=16)
    assert full.chunk is None and snap.chunk == 16 and snap.key() == runner.Config(SNAP, ratio=0.5).key()
    assert runner.own_prefill(snap) and not runner.own_prefill(full)
    contexts = [random_ids(40, 9).tolist()]
    cache = runner.prefill_alone(lm, contexts, snap, 8)[1]
    want = lm.prefill(contexts, method=SNAP, ratio=0.5, chunked_compression=16)
    for a, b in zip(cache.layers, want.layers):
        np.testing.assert_array_equal(lib_held(a, 0), lib_held(b, 0))
    assert runner.cache_bytes(lm.cfg, snap, 40) == runner.cache_bytes(lm.cfg, runner.Config(SNAP, ratio=0.5), 40)


def test_observations_come_from_the_buffered_steps_only(lm):
    """kvpress's buffer: a compression is scored by the last min(interval, hidden_states_buffer_size + 1) decode
    steps. With interval 10 and buffer 3, steps 7-10 are observed: after 8 steps the column sums hold exactly the
    attention of 2 queries (each query's probabilities sum to 1 per head); at step 10 the cache is compressed and
    the observations start empty again."""
    import dataclasses
    from kvjax import generation, recompress
    prompt = random_ids(20, 3).tolist()
    d = DecodeCompression(compression_interval=10, target_size=16, hidden_states_buffer_size=3)
    plan = lm._plan([prompt], "observed_attention", decoding=d)
    slots = recompress.decode_slots(plan, 20, 10)
    comp = recompress.Compressor(plan.method, d, slots)
    logits, cache = lm._prefill([prompt], slots, None, plan)
    cache = dataclasses.replace(cache, layers=tuple(recompress.resized(x, slots) for x in cache.layers))
    carry, done = comp.init(lm.cfg, cache), jnp.zeros((1,), bool)
    run = lambda cache, logits, carry, n: generation.decode(  # noqa: E731
        lm.params, cache, logits, done, jax.random.key(0), jnp.int32(n), carry, cfg=lm.cfg,
        sampler=generation.Sampler(), eos_ids=(), n_buffer=16, compressor=comp)[1]
    state = run(cache, logits, carry, 8)
    assert int(state.carry.count) == 8
    for obs in state.carry.obs:
        np.testing.assert_allclose(float(obs.col_sum.sum()), 2 * lm.cfg.n_heads, rtol=1e-5)
    assert [int(x.length[0]) for x in state.cache.layers] == [28] * lm.cfg.n_layers
    state = run(state.cache, state.logits, state.carry, 2)
    assert int(state.carry.count) == 0 and all(float(o.col_sum.sum()) == 0 for o in state.carry.obs)
    assert [int(x.length[0]) for x in state.cache.layers] == [16] * lm.cfg.n_layers
