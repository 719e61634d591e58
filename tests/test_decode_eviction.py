"""Decode-time eviction (`generate(..., method=m, capacity=C)`, `kvjax.states.rolling.RollingKV`) on the
tiny model: the cache stays at C tokens per layer and KV head for the whole generation, and greedy
tokens match a slow reference loop written here.

The reference runs the model one token at a time on a plain `DenseKV` (the model's forward only) and
does everything else itself in numpy, float64: the prefill scores of each rule from the prompt's
attention (queries captured from `q_proj`, RoPE applied with the independent `numpy_llama`), which
tokens the prompt keeps, the attention of every decode query, the scores, and which token each KV head
evicts before the next token is written. Semantics (issue "decode-time eviction"):

* a prompt longer than C is first compressed to C by the method's prefill score (kvpress);
* when a row's cache is full, each KV head evicts one token *before* the new token is written; the new
  token then attends over the cache including itself;
* streaming_llm: evict the oldest position that is not one of the 4 sinks;
* h2o: evict the lowest attention accumulated over all steps (prompt column sums, then each decode
  query's probabilities, mean over the KV group), never one of the recent window: positions
  > (the sequence's latest position) - recent, recent = C // 2; a new token starts at 0 and then gets
  its own query's attention;
* tova: evict the lowest attention of the newest query, mean over all H heads (one choice for every
  KV head); after attending, the scores become the new query's attention. At the first eviction after
  a compressed prompt the scores are the last prompt query's attention (no protection).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_llama import apply_rope as np_rope
from numpy_llama import hf_inv_freq

import kvjax
from kvjax import methods
from kvjax.states import EMPTY_POS, DenseKV, KVCache
from kvjax.models import model_for
from kvjax.states.rolling import RollingKV
from kvjax.testing import random_ids, tiny_lm
from kvjax.timing import compile_seconds

C = 12  # capacity
N = 40  # new tokens: much more than C
N_SINK = 4
RULES = {"streaming_llm": "streaming", "h2o": "h2o", "tova": "tova"}
PROMPTS = ((16, 4), (6, 12))  # (length, seed): one longer than C (compressed first), one shorter (fills, then rolls)


@pytest.fixture(scope="module", autouse=True)
def exact_matmuls():
    """float32 matmuls in full precision on GPU too (TF32 by default there): the rules' choices can hinge
    on score gaps of ~1e-4, which TF32 rounding flips (library and reference then diverge)."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(seed=0)


@pytest.fixture(scope="module")
def prompts():
    return [random_ids(n, seed).tolist() for n, seed in PROMPTS]


@functools.lru_cache(maxsize=None)
def _batch_run(method: str):
    """(generation after N tokens, cache right after the prefill compression) for the batch of PROMPTS."""
    lm_, rows = tiny_lm(seed=0), [random_ids(n, seed).tolist() for n, seed in PROMPTS]
    fresh = lm_.generate(rows, method=method, capacity=C, max_new_tokens=0, stop_at_eos=False).cache
    fresh = jax.tree_util.tree_map(np.asarray, fresh)  # generate donates its cache: keep a host copy
    out = lm_.generate(rows, method=method, capacity=C, max_new_tokens=N, stop_at_eos=False)
    return out, fresh


def rolling_nbytes(cfg, batch: int, capacity: int) -> int:
    """Bytes of a cache of `RollingKV` layers by formula: k, v [B, K, C, D] in the model dtype, int32 pos,
    float32 score [B, K, C], int32 length [B] per layer, plus int32 next_pos [B]."""
    itemsize = np.dtype(cfg.dtype).itemsize
    slots = batch * cfg.n_kv_heads * capacity
    per_layer = 2 * slots * cfg.head_dim * itemsize + slots * 4 + slots * 4 + batch * 4
    return cfg.n_layers * per_layer + batch * 4


def held_positions(layer, row: int) -> np.ndarray:
    """int [K, n] positions a `RollingKV` row holds, sorted per head."""
    n = int(np.asarray(layer.length)[row])
    return np.sort(np.asarray(layer.pos)[row, :, :n], axis=-1)


# ------------------------------------------------------------------------------ fixed memory
@pytest.mark.parametrize("method", list(RULES))
def test_cache_stays_at_capacity(lm, prompts, method):
    out, fresh = _batch_run(method)
    rule, n_sink, recent = methods.get(method).decode_rule(C)
    assert rule == RULES[method]
    # right after the prefill compression: RollingKV of C slots in every layer, rows hold min(T, C)
    for layer in fresh.layers:
        assert isinstance(layer, RollingKV) and (layer.rule, layer.n_sink, layer.recent) == (rule, n_sink, recent)
        assert layer.k.shape == (2, lm.cfg.n_kv_heads, C, lm.cfg.head_dim)
        assert np.asarray(layer.length).tolist() == [min(len(p), C) for p in prompts]
    # after N >> C new tokens: same shapes, dtypes and bytes; every layer and row full
    assert jax.tree_util.tree_structure(out.cache) == jax.tree_util.tree_structure(fresh)
    for a, b in zip(jax.tree_util.tree_leaves(out.cache), jax.tree_util.tree_leaves(fresh)):
        assert a.shape == b.shape and a.dtype == b.dtype
    expected = rolling_nbytes(lm.cfg, 2, C)
    assert kvjax.cache_nbytes(out.cache) == kvjax.cache_nbytes(fresh) == out.cache_bytes == expected
    assert [len(r) for r in out.ids] == [N, N]
    assert np.asarray(out.cache.next_pos).tolist() == [len(p) + N for p in prompts]
    for layer in out.cache.layers:
        assert np.asarray(layer.length).tolist() == [C, C]
        for row, prompt in enumerate(prompts):
            end = len(prompt) + N  # the last sampled token is fed too: positions 0 .. end - 1
            pos = held_positions(layer, row)
            assert pos.shape == (lm.cfg.n_kv_heads, C)
            for head in pos:
                assert len(set(head.tolist())) == C and head.min() >= 0 and head.max() == end - 1
            if rule == "streaming":  # exactly the sinks and the most recent C - n_sink positions
                want = list(range(n_sink)) + list(range(end - (C - n_sink), end))
                assert (pos == np.array(want)[None]).all()
            if rule == "h2o":  # the recent window is always held
                assert np.isin(np.arange(end - recent, end), pos).all()
            if rule == "tova":  # one choice shared by every KV head
                assert (pos == pos[:1]).all()


@pytest.mark.parametrize("method", list(RULES))
def test_prompt_shorter_than_capacity_fills_then_rolls(lm, method):
    prompt = random_ids(6, 5).tolist()
    n_new = 30
    fresh = lm.generate(prompt, method=method, capacity=C, max_new_tokens=0).cache
    assert [np.asarray(layer.length).tolist() for layer in fresh.layers] == [[6]] * lm.cfg.n_layers
    nbytes = kvjax.cache_nbytes(fresh)
    assert nbytes == rolling_nbytes(lm.cfg, 1, C)
    for n in (C - 6 - 1, C - 6, C - 6 + 1, n_new):  # not yet full, just full, first eviction, long after
        out = lm.generate(prompt, method=method, capacity=C, max_new_tokens=n, stop_at_eos=False)
        assert len(out.ids) == n and out.cache_bytes == nbytes
        for layer in out.cache.layers:
            assert layer.k.shape[2] == C
            held = min(C, 6 + n)
            assert np.asarray(layer.length).tolist() == [held]
            pos = held_positions(layer, 0)
            assert all(len(set(h.tolist())) == held for h in pos)
            if n < C - 6:  # nothing evicted yet: every position so far
                assert (pos == np.arange(6 + n)[None]).all()
            if method == "streaming_llm":
                assert (pos == np.array(list(range(N_SINK)) + list(range(6 + n - (held - N_SINK), 6 + n)))).all()


# --------------------------------------------------------------------------- reference loop
def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


@functools.lru_cache(maxsize=None)
def _forward_fn(cfg):
    """Jitted single forward of the model on a DenseKV cache, capturing each layer's q_proj output."""
    def fwd(params, tokens, positions, cache):
        (logits, cache), inter = model_for(cfg)(cfg).apply({"params": params}, tokens, positions, cache,
                                                           capture_intermediates=True, mutable=["intermediates"])
        qs = [inter["intermediates"][f"layers_{i}"]["attn"]["q_proj"]["__call__"][0] for i in range(cfg.n_layers)]
        return logits, cache, qs

    return jax.jit(fwd)


class RefLayer:
    """One layer of one row: per KV head the held positions, keys, values and scores (numpy, any order)."""

    def __init__(self, pos, k, v, score):
        self.pos, self.k, self.v, self.score = pos, k, v, score  # [K, n], [K, n, D], [K, n, D], [K, n]

    @property
    def n(self) -> int:
        return self.pos.shape[1]

    def evict(self, rule: str, recent: int, newest: int) -> None:
        victims = []
        for h in range(self.pos.shape[0]):
            pos, score = self.pos[h], self.score[h]
            if rule == "streaming":
                cand = np.where(pos >= N_SINK, pos, np.inf)
            else:
                protected = pos > newest - recent if rule == "h2o" else np.zeros_like(pos, bool)
                cand = np.where(protected, np.inf, score)
            victims.append(int(np.argmin(cand)))
        keep = lambda x: np.stack([np.delete(x[h], victims[h], axis=0) for h in range(len(victims))])  # noqa: E731
        self.pos, self.k, self.v, self.score = keep(self.pos), keep(self.k), keep(self.v), keep(self.score)

    def append(self, pos, k, v) -> None:
        n_kv = self.pos.shape[0]
        self.pos = np.concatenate([self.pos, np.full((n_kv, 1), pos)], 1)
        self.k = np.concatenate([self.k, k[:, None]], 1)
        self.v = np.concatenate([self.v, v[:, None]], 1)
        self.score = np.concatenate([self.score, np.zeros((n_kv, 1))], 1)

    def attention(self, q, group: int) -> np.ndarray:
        """Probabilities [H, n] of one query q [H, D] over the held tokens (all at or before it)."""
        kk = np.repeat(self.k, group, axis=0)  # query head h reads KV head h // group
        return _softmax(np.einsum("hd,hsd->hs", q, kk) / np.sqrt(q.shape[-1]))

    def dense(self, capacity: int, dtype) -> DenseKV:
        n_kv, n, d = self.k.shape
        pad = capacity - n
        k = np.pad(self.k, [(0, 0), (0, pad), (0, 0)])[None]
        v = np.pad(self.v, [(0, 0), (0, pad), (0, 0)])[None]
        pos = np.pad(self.pos, [(0, 0), (0, pad)], constant_values=EMPTY_POS)[None]
        return DenseKV(k=jnp.asarray(k, dtype), v=jnp.asarray(v, dtype), pos=jnp.asarray(pos, jnp.int32),
                       length=jnp.asarray([n], jnp.int32))


def reference_generate(lm, prompt, method: str, capacity: int, n_new: int):
    """Greedy tokens of a capacity-bounded cache, the slow way (one row, see the module docstring).

    Returns (tokens, kept, states): kept[i] int [K, min(T, C)] the positions layer i keeps of the prompt
    (sorted); states[s] the per-layer `RefLayer`s after s + 1 tokens were fed.
    """
    cfg = lm.cfg
    rule, _, recent = methods.get(method).decode_rule(capacity)
    fwd = _forward_fn(cfg)
    n_kv, n_h, d = cfg.n_kv_heads, cfg.n_heads, cfg.head_dim
    group = n_h // n_kv
    inv_freq = hf_inv_freq(d, cfg.rope_theta)
    rope = lambda q, pos: np_rope(q, np.asarray(pos), inv_freq)  # noqa: E731  q [T, H, D] float64

    # prefill: the whole prompt on an uncompressed cache, then each layer keeps C tokens by the rule
    t = len(prompt)
    cache = kvjax.init_cache(cfg.n_layers, 1, n_kv, t, d, cfg.jnp_dtype)
    logits, cache, qs = fwd(lm.params, jnp.asarray([prompt], jnp.int32), jnp.arange(t, dtype=jnp.int32)[None], cache)
    logits = np.asarray(logits)[0, -1]
    layers = []
    for i in range(cfg.n_layers):
        k = np.asarray(cache.layers[i].k, np.float64)[0]  # [K, T, D] post-RoPE
        v = np.asarray(cache.layers[i].v, np.float64)[0]
        q = rope(np.asarray(qs[i], np.float64)[0].reshape(t, n_h, d), np.arange(t))
        sc = np.einsum("thd,hsd->hts", q, np.repeat(k, group, axis=0)) / np.sqrt(d)
        attn = _softmax(np.where(np.tril(np.ones((t, t), bool))[None], sc, -np.inf))  # [H, T, T]
        pos = np.arange(t)
        if rule == "streaming":  # sinks and the most recent
            prefill = np.broadcast_to(np.where(pos < N_SINK, 1e9, pos), (n_kv, t)).astype(np.float64)
            init = np.zeros((n_kv, t))
        elif rule == "h2o":  # kvpress ObservedAttention: column sums / queries that see the key
            col = attn.sum(1).reshape(n_kv, group, t).mean(1)  # [K, T]
            prefill, init = col / (t - pos), col
        else:  # tova: the last query's attention, mean over all heads; kvpress keeps the last token
            last = attn[:, -1].mean(0)
            prefill = np.broadcast_to(np.where(pos == t - 1, last[:-1].max(initial=0) + 1, last), (n_kv, t))
            init = np.broadcast_to(last, (n_kv, t))  # decode starts from the raw attention (no protection)
        keep = np.sort(np.argsort(-prefill, axis=1, kind="stable")[:, :capacity], axis=1)  # [K, min(T, C)]
        take = lambda x: np.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), 1)  # noqa: E731
        layers.append(RefLayer(take(np.broadcast_to(pos, (n_kv, t))), take(k), take(v), take(init.copy())))
    kept = [layer.pos.copy() for layer in layers]

    tokens, states = [], []
    for step in range(n_new):
        token = int(np.argmax(logits))
        tokens.append(token)
        p = t + step
        for layer in layers:
            if layer.n >= capacity:
                layer.evict(rule, recent, p - 1)
        cache = KVCache(layers=tuple(layer.dense(capacity, cfg.jnp_dtype) for layer in layers),
                        next_pos=jnp.asarray([p], jnp.int32))
        logits, cache, qs = fwd(lm.params, jnp.asarray([[token]], jnp.int32), jnp.asarray([[p]], jnp.int32), cache)
        logits = np.asarray(logits)[0, 0]
        for i, layer in enumerate(layers):
            n = layer.n
            layer.append(p, np.asarray(cache.layers[i].k, np.float64)[0, :, n],
                         np.asarray(cache.layers[i].v, np.float64)[0, :, n])
            q = rope(np.asarray(qs[i], np.float64)[0].reshape(1, n_h, d), [p])[0]  # [H, D]
            probs = layer.attention(q, group)  # [H, n + 1]
            if rule == "h2o":
                layer.score = layer.score + probs.reshape(n_kv, group, -1).mean(1)
            elif rule == "tova":
                assert (layer.pos == layer.pos[:1]).all()  # every KV head holds the same positions
                layer.score = np.broadcast_to(probs.mean(0), layer.score.shape).copy()
        states.append([RefLayer(x.pos.copy(), x.k, x.v, x.score.copy()) for x in layers])
    return tokens, kept, states


@pytest.mark.parametrize("method", list(RULES))
def test_greedy_matches_reference_loop(lm, prompts, method):
    out, fresh = _batch_run(method)
    for row, prompt in enumerate(prompts):
        tokens, kept, states = reference_generate(lm, prompt, method, C, N)
        # the prompt's compression: the reference's own prefill scores keep the same tokens
        for i, layer in enumerate(fresh.layers):
            np.testing.assert_array_equal(held_positions(layer, row), kept[i], err_msg=f"{method} row {row} layer {i}")
        assert out.ids[row] == tokens, f"{method} row {row} (prompt {len(prompt)} tokens)"
        # the final caches hold the same positions in every layer and KV head
        for i, layer in enumerate(out.cache.layers):
            np.testing.assert_array_equal(held_positions(layer, row), np.sort(states[-1][i].pos, axis=1),
                                          err_msg=f"{method} row {row} layer {i}")
            if RULES[method] != "streaming":  # and the same scores, slot for slot
                order = np.argsort(np.asarray(layer.pos)[row], axis=1)
                lib = np.take_along_axis(np.asarray(layer.score)[row], order, axis=1)
                ref = np.take_along_axis(states[-1][i].score, np.argsort(states[-1][i].pos, axis=1), axis=1)
                np.testing.assert_allclose(lib, ref, rtol=1e-4, atol=1e-5, err_msg=f"{method} row {row} layer {i}")


def test_finished_rows_do_not_evict(prompts):
    """A row that emits end-of-sequence stops evicting: its cache is frozen at the step it finished."""
    method = "h2o"
    base = tiny_lm(seed=0)
    free, _ = _batch_run(method)
    # an id that row 0 emits at a step s > C while row 1 never emits it: make it the end of sequence
    s, eos = next((s, t) for s, t in enumerate(free.ids[0])
                  if s > C and t not in free.ids[1] and t not in free.ids[0][:s])
    lm_eos = tiny_lm(seed=0, eos_id=eos)
    out = lm_eos.generate(prompts, method=method, capacity=C, max_new_tokens=N)
    assert out.ids[0] == free.ids[0][: s + 1] and out.ids[1] == free.ids[1]
    _, _, states = reference_generate(base, prompts[0], method, C, s + 1)  # the eos token is fed, then the row stops
    for i, layer in enumerate(out.cache.layers):
        np.testing.assert_array_equal(held_positions(layer, 0), np.sort(states[-1][i].pos, axis=1))
        assert int(np.asarray(layer.length)[0]) == C
    assert np.asarray(out.cache.next_pos).tolist() == [len(prompts[0]) + s + 1, len(prompts[1]) + N]


# ------------------------------------------------------------------------------- bad input
def test_capacity_rejects_bad_input_before_compiling(lm, prompts):
    prompt = prompts[0]
    prefilled = lm.prefill(prompt)
    c0 = compile_seconds()
    # a method without a decode-time rule: the error lists the ones that have one
    with pytest.raises(ValueError, match="no decode-time eviction rule") as e:
        lm.generate(prompt, method="snapkv", capacity=C)
    for name in ("streaming_llm", "observed_attention", "tova"):
        assert name in str(e.value)
    for name in ("snapkv", "pyramidkv", "knorm", "expected_attention", "random"):
        assert repr(name) not in str(e.value).split("use one of")[1]
    for bad in (1, 0, -3, 2.5, 12.0, "12", True, [12]):
        with pytest.raises(ValueError, match="capacity must be an integer >= 2"):
            lm.generate(prompt, method="h2o", capacity=bad)
    with pytest.raises(ValueError, match="do not combine it with ratio= or budget="):
        lm.generate(prompt, method="h2o", capacity=C, ratio=0.5)
    with pytest.raises(ValueError, match="do not combine it with ratio= or budget="):
        lm.generate(prompt, method="tova", capacity=C, budget=8)
    for cap in (2, 3, 4):  # StreamingLLM protects 4 sinks
        with pytest.raises(ValueError, match="no evictable slot"):
            lm.generate(prompt, method="streaming_llm", capacity=cap)
    with pytest.raises(ValueError, match="no evictable slot"):
        lm.generate(prompt, method=methods.StreamingLLM(n_sink=8), capacity=8)
    with pytest.raises(ValueError, match="original positions"):
        lm.generate(prompt, method=methods.StreamingLLM(rerotate=True), capacity=C)
    with pytest.raises(ValueError, match="use the scorer alone"):
        lm.generate(prompt, method="adakv:h2o", capacity=C)
    for method in (None, "full"):
        with pytest.raises(ValueError, match="need a method="):
            lm.generate(prompt, method=method, capacity=C)
    with pytest.raises(ValueError, match="cache="):
        lm.generate(prompt, method="h2o", capacity=C, cache=prefilled)
    with pytest.raises(ValueError, match="capacity must be"):
        next(lm.stream(prompt, method="tova", capacity=1))
    assert compile_seconds() == c0
    # numpy integers are integers
    out = lm.generate(prompt, method="streaming_llm", capacity=np.int64(C), max_new_tokens=2)
    assert all(layer.capacity == C for layer in out.cache.layers)
