"""KVzip (kvpress KVzipPress): the reconstruction attention, the global top-k and the replay pass, on hand
cases and a tiny random Llama checked against an independent numpy reconstruction (kvpress's formulas)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import generation, pipeline
from kvjax.eval import runner
from kvjax.methods import Budget
from kvjax.methods.kvzip import KVzip
from kvjax.models.rope import apply_rope, rope_inv_freq
from kvjax.observe import ObsSpec, ReplaySpec, init_layer_obs, reconstruction_attention
from kvjax.shapes import bucket
from kvjax.states import tree_nbytes
from kvjax.states.cache import model_cache
from kvjax.states.dense import DenseKV
from kvjax.timing import compile_seconds

from test_checkpoints import LLAMA, random_hf_weights, write_hf_dir

HF = {**LLAMA, "num_hidden_layers": 3, "rope_scaling": None, "max_position_embeddings": 2048}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return kvjax.load(str(write_hf_dir(tmp_path_factory.mktemp("kvzip"), HF, random_hf_weights(HF, seed=5))),
                      dtype="float32")


def kvpress_scores(q, keys, n_sink, start, end):
    """kvpress `KVzipPress.score_kvzip` for one layer in float64: q [R, H, D] post-RoPE replay queries, keys
    [K, T + R, D] (context, then the replay's own); softmax over sinks | chunk | replay (causal), columns of
    the chunk, max over the queries and the G heads of each group -> [K, end - start]."""
    r, h, d = q.shape
    n_kv = keys.shape[0]
    sink = min(n_sink, start)
    sub = np.concatenate([keys[:, :sink], keys[:, start:end], keys[:, -r:]], 1)  # [K, W, D]
    logits = np.einsum("rkgd,kwd->kgrw", q.reshape(r, n_kv, h // n_kv, d), sub) / np.sqrt(d)
    logits[..., -r:] += np.triu(np.full((r, r), -np.inf), 1)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p[..., sink:sink + end - start].max(axis=(1, 2))


def test_reconstruction_attention_is_kvpress_formula_and_splits_over_query_chunks():
    rng = np.random.default_rng(0)
    n_kv, g, d, t, r = 2, 2, 4, 10, 6  # prompt of 10 tokens, a replay of 6 at positions 10..15
    k = rng.normal(size=(1, n_kv, t + r, d)).astype(np.float32)
    q = rng.normal(size=(1, r, n_kv * g, d)).astype(np.float32)
    pos = np.broadcast_to(np.arange(t + r, dtype=np.int32), (1, n_kv, t + r))
    span = jnp.asarray([[2, 4, 8]], jnp.int32)  # 2 sinks, the chunk [4, 8)
    spec = ReplaySpec(sink=3, chunk=4, length=8)  # static widths: at least the sinks, chunk and replay

    def run(rows, acc):  # the replay queries `rows`, the state holding the tokens up to the last of them
        state = DenseKV(k=jnp.asarray(k), v=jnp.asarray(k), pos=jnp.asarray(pos), length=jnp.asarray([t + rows.stop]))
        positions = jnp.asarray(t + np.arange(rows.start, rows.stop, dtype=np.int32))[None]
        return reconstruction_attention(jnp.asarray(q[:, rows]), positions, jnp.ones(positions.shape, bool), state,
                                        span, jnp.asarray([t]), acc, spec)

    acc = jnp.zeros((1, n_kv, t + r), jnp.float32)
    whole = np.asarray(run(slice(0, r), acc))[0]
    split = np.asarray(run(slice(3, r), run(slice(0, 3), acc)))[0]
    want = kvpress_scores(q[0].astype(np.float64), k[0].astype(np.float64), 2, 4, 8)
    np.testing.assert_allclose(whole[:, 4:8], want, rtol=1e-5)
    np.testing.assert_array_equal(np.delete(whole, np.s_[4:8], axis=1), 0)  # only the span is scored
    np.testing.assert_allclose(split, whole, rtol=1e-6)


def hand_obs(replay):
    """Observations of L layers holding hand-set reconstruction scores replay [L, B, K, S]."""
    l, b, n_kv, s = replay.shape
    base = init_layer_obs(ObsSpec(replay=ReplaySpec(1, 1, 1)), np.full(b, s), n_kv, 4, s, jnp.float32, n_kv)
    return tuple(dataclasses.replace(base, replay=jnp.asarray(x, jnp.float32)) for x in replay)


def test_one_top_k_over_all_layers_hand_case():
    # 2 layers, 1 KV head, 6 tokens, 1 sink. ratio 0.5: int(2 * 6 * 0.5) = 6 lowest pairs go, over both layers:
    # .10 .20 .30 .50 (layer 0) and .45 .52 (layer 1); the sinks score above everything.
    replay = np.array([[[[.9, .1, .5, .2, .8, .3]]], [[[.7, .6, .55, .45, .65, .52]]]])
    obs = hand_obs(replay)
    method = KVzip(n_sink=1)
    assert method.layer_pairs(obs, [6], Budget(ratio=0.5)).tolist() == [[2], [4]]
    assert KVzip(n_sink=1, layerwise=True).layer_pairs(obs, [6], Budget(ratio=0.5)).tolist() == [[3], [3]]
    assert method.layer_pairs(obs, [6], Budget(tokens=4)).tolist() == [[3], [5]]  # 2 * 1 * 4 pairs kept in all
    assert method.total_pairs(type("C", (), dict(n_layers=2, n_kv_heads=1)), 6, Budget(ratio=0.5)) == 6
    kept = []
    for layer, n in ((0, 2), (1, 4)):
        state = DenseKV(k=jnp.zeros((1, 1, 6, 4)), v=jnp.zeros((1, 1, 6, 4)),
                        pos=jnp.arange(6, dtype=jnp.int32)[None, None], length=jnp.asarray([6]))
        scores = method.importance(obs[layer].replay)
        kept.append(method.select(None, state, scores, jnp.asarray([n]), 6).positions()[0][0].tolist())
    assert kept == [[0, 4], [0, 1, 2, 4]]


def independent_replay_scores(lm, ids, method, n_sink):
    """[L, K, T] KVzip scores from scratch: the model over context + each replay prompt in one forward
    (`pipeline.forward`, its sown pre-RoPE q/k), RoPE, and kvpress's formula per chunk. The prompt pieces are
    kvpress's strings; this model has no chat template (prefix 0, the suffix "\\n")."""
    enc = lambda s: lm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    cfg, t = lm.cfg, len(ids)
    h, n_kv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out = np.zeros((cfg.n_layers, n_kv, t))
    cs = method.chunk_size
    for i, start in enumerate(range(0, t, cs)):
        chunk = ids[start:start + cs]
        head = (enc("\n\nRepeat the previous context exactly.") if i == 0 else
                enc("\n\nRepeat the part of the previous context exactly, starting with") + ids[start - 8:start])
        seq = ids + head + enc("\n") + chunk
        _, _, inter = pipeline.forward(lm.params, cfg, jnp.asarray([seq]), capture=True)
        for layer in range(cfg.n_layers):
            qkv = np.asarray(inter[f"layers_{layer}"]["attn"]["qkv"][0][0], np.float64)  # [T + R, (H + 2K) D]
            inv = rope_inv_freq(cfg, layer)
            pos = np.arange(len(seq))
            q = np.asarray(apply_rope(jnp.asarray(qkv[:, :h * d].reshape(-1, h, d)), jnp.asarray(pos)[:, None], inv))
            k = np.asarray(apply_rope(jnp.asarray(qkv[:, h * d:(h + n_kv) * d].reshape(-1, n_kv, d)),
                                      jnp.asarray(pos)[:, None], inv))
            r = len(seq) - t
            out[layer][:, start:start + len(chunk)] = kvpress_scores(q[t:].astype(np.float64),
                                                                     k.transpose(1, 0, 2).astype(np.float64),
                                                                     n_sink, start, start + len(chunk))
            assert r > len(chunk)
    out[..., :n_sink] = 2.0
    return out


def test_replay_matches_an_independent_reconstruction_and_compresses(tiny):
    lm = tiny
    ids = np.random.default_rng(1).integers(0, lm.cfg.vocab_size - 1, 100).tolist()
    method = KVzip(chunk_size=40)  # three chunks: the later two start with the previous chunk's last 8 tokens
    p = pipeline.plan(lm.cfg, [100], method, ratio=0.5, tokenizer=lm.tokenizer)
    tokens = np.asarray([ids + [0] * (bucket(100) - 100)], np.int32)
    _, cache, _ = generation.prefill(lm.params, lm.cfg, tokens, np.asarray([100]), model_cache(lm.cfg, 1, bucket(100)))
    cache, obs = pipeline.replay(lm.params, lm.cfg, p, cache, tokens, np.asarray([100]))
    ours = np.stack([np.asarray(method.importance(o.replay))[0, :, :100] for o in obs])
    want = independent_replay_scores(lm, ids, method, 4)
    np.testing.assert_allclose(ours, want, rtol=2e-4, atol=1e-6)
    assert int(cache.next_pos[0]) == 100 and all(int(layer.length[0]) == 100 for layer in cache.layers)  # rewound

    # LM.prefill: one top-k over all layers into ragged pools, sinks kept, bytes as `pipeline.abstract` says;
    # the eval runner's branch of a shared prefill keeps the same pairs
    compressed = lm.prefill(ids, method=method, ratio=0.5)
    kept = kvjax.kept_positions(compressed)
    n_l, n_kv = lm.cfg.n_layers, lm.cfg.n_kv_heads
    assert sum(len(kept[lay][hd][0]) for lay in range(n_l) for hd in range(n_kv)) == n_l * n_kv * 100 // 2  # int(L K T 0.5) evicted
    assert all({0, 1, 2, 3} <= set(kept[lay][hd][0].tolist()) for lay in range(n_l) for hd in range(n_kv))
    assert len({len(kept[lay][hd][0]) for lay in range(n_l) for hd in range(n_kv)}) > 1  # budgets differ
    assert kvjax.cache_nbytes(compressed) == tree_nbytes(pipeline.abstract(lm.cfg, p, 100))
    flat = ours.reshape(-1)
    assert np.sort(flat)[300] > np.sort(flat)[299]  # no tie at the cut: the kept set is unique
    want_kept = ours > np.sort(flat)[299]
    for lay in range(n_l):
        for hd in range(n_kv):
            assert kept[lay][hd][0].tolist() == np.nonzero(want_kept[lay, hd])[0].tolist()
    shared = model_cache(lm.cfg, 1, bucket(100 + 16))
    _, shared, _ = generation.prefill(lm.params, lm.cfg, tokens, np.asarray([100]), shared)
    state = runner.branch(lm, shared, None, runner.Config("kvzip(chunk_size=40)", ratio=0.5), 100, 16, [ids])
    assert [[x[0].tolist() for x in layer] for layer in kvjax.kept_positions(state)] == \
        [[x[0].tolist() for x in layer] for layer in kept]
    assert kvjax.methods.spec_of(method) == "kvzip(chunk_size=40)"

    # one compressed cache answers any later question (fed on top of it, which stays usable)
    a = lm.generate(ids[:5], cache=compressed, max_new_tokens=4)
    b = lm.generate(ids[5:12], cache=compressed, max_new_tokens=4)
    assert len(a.ids) == 4 and len(b.ids) == 4
    assert lm.generate(ids[:5], cache=compressed, max_new_tokens=4).ids == a.ids


@pytest.mark.parametrize("bad, match", [
    (dict(method="kvzip(chunk_size=0)", ratio=0.5), "chunk_size must be an integer >= 1"),
    (dict(method="kvzip(chunk_size=-3)", ratio=0.5), "chunk_size must be an integer >= 1"),
    (dict(method="kvzip(n_sink=-1)", ratio=0.5), "n_sink must be an integer >= 0"),
    (dict(method="kvzip(layerwise=1)", ratio=0.5), "layerwise must be True or False"),
    (dict(method="kvzip(kvzip_plus_normalization=True)", ratio=0.5), "KVzip\\+"),
    (dict(method="kvzip", capacity=32), "no decode-time eviction rule"),
    (dict(method="adakv:kvzip", ratio=0.5), "wraps a plain scorer"),
    (dict(method="kvzip", ratio=0.5, budget=8), "exactly one of ratio"),
    (dict(method="kvzip", ratio=0.995), "always keeps 4 tokens"),
])
def test_bad_input_is_one_line_before_compiling(tiny, bad, match):
    c0 = compile_seconds()
    with pytest.raises(ValueError, match=match) as e:
        tiny.generate(list(range(1, 60)), max_new_tokens=2, **bad)
    assert "\n" not in str(e.value) and compile_seconds() == c0


def test_a_plan_without_the_tokenizer_is_refused_before_replaying(tiny):
    p = pipeline.plan(tiny.cfg, [20], "kvzip", ratio=0.5)
    with pytest.raises(ValueError, match="tokenizer="):
        pipeline.replay(tiny.params, tiny.cfg, p, None, np.zeros((1, 32), np.int32), np.asarray([20]))
