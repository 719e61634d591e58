"""The tiny random model end to end: prefill, logits, the decode loop, sampling, RoPE and input checks.

Greedy decoding is checked against a slow loop that recomputes the full logits of the growing
sequence each step; batched runs against each prompt alone. The model is `kvjax.testing.tiny_lm`.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_llama import hf_inv_freq

import kvjax
from kvjax import generation
from kvjax.generation import Sampler
from kvjax.shapes import bucket
from kvjax.states import init_cache
from kvjax.lm import LM
from kvjax.models import LlamaConfig, rope_inv_freq
from kvjax.models.rope import apply_rope
from kvjax.testing import TINY_VOCAB, random_ids, tiny_config, tiny_lm, tiny_tokenizer
from kvjax.timing import compile_seconds

MAX_NEW = 10  # one decode buffer size (bucket 16) for most tests, so they share compiled programs


@pytest.fixture(scope="module")
def lm() -> LM:
    return tiny_lm(seed=0)


def greedy_reference(lm: LM, prompt, max_new: int, eos=()) -> list[int]:
    """Greedy decoding the slow way: full logits of the whole sequence at every step."""
    seq, out = list(prompt), []
    for _ in range(max_new):
        token = int(np.argmax(lm.logits(seq)[-1]))
        out.append(token)
        seq.append(token)
        if token in eos:
            break
    return out


def rows_of(*specs):
    """Prompts as lists of ints: random_ids(n, seed) for each (n, seed)."""
    return [random_ids(n, seed).tolist() for n, seed in specs]


def test_tiny_lm_is_well_formed(lm):
    assert lm.cfg.vocab_size == lm.tokenizer.vocab_size == TINY_VOCAB
    assert lm.tokenizer.eos_ids == (2,)
    assert lm.decode(lm.encode("hello world")) == "hello world"
    assert set(lm.params) == {"embed", "layers_0", "layers_1", "final_norm", "lm_head"}


def test_bucket():
    assert [bucket(n) for n in (1, 16, 17, 100, 512, 513, 1025)] == [16, 16, 32, 128, 512, 1024, 1536]
    assert bucket(40, chunk=32) == 64


# ------------------------------------------------------------------------------------- forward
def test_logits_batch_equals_each_alone(lm):
    rows = rows_of((3, 1), (20, 2), (11, 3))
    batch = lm.logits(rows)
    assert batch.shape == (3, 20, lm.cfg.vocab_size) and batch.dtype == np.float32
    for i, r in enumerate(rows):
        alone = lm.logits(r)
        assert alone.shape == (len(r), lm.cfg.vocab_size)
        np.testing.assert_allclose(batch[i, : len(r)], alone, rtol=1e-5, atol=1e-5)
    # a 2-D array of equal-length rows, and text
    arr = np.array([rows[1], rows[1][::-1]])
    np.testing.assert_allclose(lm.logits(arr)[0], lm.logits(rows[1]), rtol=1e-5, atol=1e-5)
    assert lm.logits("hello").shape == (len(lm.encode("hello")), lm.cfg.vocab_size)


def test_chunked_prefill_matches_single_pass(lm, monkeypatch):
    """Small PREFILL_CHUNK: several chunks (and attention blocks); rows end in different chunks."""
    rows = rows_of((37, 4), (5, 5), (16, 6))
    tokens, lengths = lm._pad(rows)  # [3, 64]
    assert tokens.shape[1] == 64

    def run(all_logits):
        cache = lm._empty_cache(3, 64)
        return generation.prefill(lm.params, lm.cfg, tokens, lengths, cache, all_logits=all_logits)[:2]

    full_one, cache_one = run(True)
    last_one, _ = run(False)
    calls = []
    with monkeypatch.context() as m:
        m.setattr(generation, "PREFILL_CHUNK", 8)  # read at trace time: drop the compiled programs
        chunk_fn = generation.prefill_chunk
        m.setattr(generation, "prefill_chunk", lambda *a, **k: calls.append(a[1].shape) or chunk_fn(*a, **k))
        jax.clear_caches()
        try:
            full_chunked, cache_chunked = run(True)
            last_chunked, _ = run(False)
        finally:
            jax.clear_caches()
    assert calls == [(3, 8)] * 16  # 64 padded tokens in chunks of 8, twice
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(full_chunked[i, :n], full_one[i, :n], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(last_chunked[i], full_one[i, n - 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last_one, last_chunked, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache_chunked.next_pos, lengths)
    for one, chunked in zip(cache_one.layers, cache_chunked.layers):
        np.testing.assert_array_equal(chunked.length, lengths)
        for i, n in enumerate(lengths):
            np.testing.assert_allclose(chunked.k[i, :, :n], one.k[i, :, :n], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(chunked.v[i, :, :n], one.v[i, :, :n], rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(chunked.pos[i, :, :n], np.broadcast_to(np.arange(n), (2, n)))


# ------------------------------------------------------------------------------------ generate
def test_greedy_generate_matches_slow_loop(lm):
    rows = rows_of((5, 0), (12, 3))
    out = lm.generate(rows, max_new_tokens=MAX_NEW)
    assert out.ids == [greedy_reference(lm, r, MAX_NEW, eos=(2,)) for r in rows]
    assert out.prompt_tokens == [5, 12] and out.new_tokens == sum(len(r) for r in out.ids)
    assert out.text == [lm.decode(r, skip_special_tokens=True) for r in out.ids]
    assert out.cache_bytes == kvjax.cache_nbytes(out.cache)
    single = lm.generate(rows[1], max_new_tokens=MAX_NEW)
    assert single.ids == out.ids[1] and isinstance(single.text, str)
    # the returned cache has seen every prompt token and every generated token
    np.testing.assert_array_equal(out.cache.next_pos, [len(r) + len(g) for r, g in zip(rows, out.ids)])


def test_row_stops_at_eos_while_other_continues(lm):
    rows = rows_of((5, 0), (9, 1))
    free = lm.generate(rows, max_new_tokens=MAX_NEW, stop_at_eos=False).ids
    assert all(len(r) == MAX_NEW for r in free)
    # an id row 0 emits early that row 1 never emits: make it the end-of-sequence token
    j, eos = next((j, t) for j, t in enumerate(free[0][:6]) if j >= 2 and t not in free[1] and t not in free[0][:j])
    lm_eos = LM(lm.cfg, lm.params, tiny_tokenizer(eos_id=eos))
    out = lm_eos.generate(rows, max_new_tokens=MAX_NEW)
    assert out.ids[0] == free[0][: j + 1]  # stops right after emitting eos (which is kept)
    assert out.ids[1] == free[1]  # the other row runs to max_new_tokens
    assert out.ids[0] == greedy_reference(lm, rows[0], MAX_NEW, eos=(eos,))
    np.testing.assert_array_equal(out.cache.next_pos, [5 + j + 1, 9 + MAX_NEW])


def test_generate_continues_a_prefilled_cache(lm):
    ctx = rows_of((7, 10), (3, 11))
    ids = rows_of((5, 12), (9, 13))
    whole = lm.generate([c + i for c, i in zip(ctx, ids)], max_new_tokens=MAX_NEW, stop_at_eos=False)
    cache = lm.prefill(ctx)
    np.testing.assert_array_equal(cache.next_pos, [7, 3])
    cont = lm.generate(ids, max_new_tokens=MAX_NEW, cache=cache, stop_at_eos=False)
    assert cont.ids == whole.ids
    # the caller's cache is not consumed (donation works on a copy): ask again on the same context
    assert lm.generate(ids, max_new_tokens=MAX_NEW, cache=cache, stop_at_eos=False).ids == whole.ids
    np.testing.assert_array_equal(cont.cache.next_pos, [7 + 5 + MAX_NEW, 3 + 9 + MAX_NEW])
    # single prompt
    one = lm.generate(ids[0], max_new_tokens=MAX_NEW, cache=lm.prefill(ctx[0]), stop_at_eos=False)
    assert one.ids == whole.ids[0]
    with pytest.raises(ValueError, match="rows"):
        lm.generate(ids, max_new_tokens=MAX_NEW, cache=lm.prefill(ctx[0]))


def test_decode_skips_ids_the_tokenizer_lacks(lm):
    # a model's embedding table may be larger than its tokenizer (Qwen2); -1 marks "no token"
    wide = kvjax.LM(lm.cfg.replace(vocab_size=lm.tokenizer.vocab_size + 8), lm.params, lm.tokenizer)
    ids = wide.encode("hello")
    assert wide.decode(ids + [wide.tokenizer.vocab_size + 3, -1]) == wide.decode(ids) == "hello"
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        lm.decode(ids + [lm.tokenizer.vocab_size + 3])  # past the model's own vocabulary


def test_stream_grows_to_generate(lm):
    prompt = rows_of((6, 20))[0]
    chunks = list(lm.stream(prompt, max_new_tokens=20, every=4, stop_at_eos=False))
    assert [len(c.ids) for c in chunks] == [4, 8, 12, 16, 20]
    for a, b in zip(chunks, chunks[1:]):
        assert b.ids[: len(a.ids)] == a.ids
    assert chunks[-1].ids == lm.generate(prompt, max_new_tokens=20, stop_at_eos=False).ids
    assert chunks[-1].text == lm.decode(chunks[-1].ids, skip_special_tokens=True)


def test_max_new_tokens_zero(lm):
    out = lm.generate([5, 6, 7], max_new_tokens=0)
    assert out.ids == [] and out.text == ""
    np.testing.assert_array_equal(out.cache.next_pos, [3])


def test_sampling_reproducible_and_top_k_1_is_greedy(lm):
    rows = rows_of((5, 0), (12, 3))
    a = lm.generate(rows, max_new_tokens=MAX_NEW, temperature=1.0, seed=3, stop_at_eos=False).ids
    b = lm.generate(rows, max_new_tokens=MAX_NEW, temperature=1.0, seed=3, stop_at_eos=False).ids
    c = lm.generate(rows, max_new_tokens=MAX_NEW, temperature=1.0, seed=4, stop_at_eos=False).ids
    assert a == b and a != c
    greedy = lm.generate(rows, max_new_tokens=MAX_NEW, stop_at_eos=False).ids
    assert a != greedy
    assert lm.generate(rows, max_new_tokens=MAX_NEW, temperature=1.0, top_k=1, seed=3,
                       stop_at_eos=False).ids == greedy


# ---------------------------------------------------------------------------------------- Sampler
def sample_counts(sampler: Sampler, probs, n=4000, seed=0) -> np.ndarray:
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 1))  # n independent draws
    tokens = np.asarray(sampler(logits, jax.random.key(seed)))
    return np.bincount(tokens, minlength=len(probs)) / n


def test_sampler_top_p_keeps_smallest_prefix():
    # probabilities 0.15, 0.5, 0.05, 0.3 (ids 0..3); sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 0), 0.05 (id 2)
    probs = [0.15, 0.5, 0.05, 0.3]
    # top_p 0.7: 0.5 < 0.7, 0.5 + 0.3 = 0.8 >= 0.7 -> keep ids {1, 3}, renormalized 0.5/0.8 = 0.625, 0.375
    freq = sample_counts(Sampler(temperature=1.0, top_p=0.7), probs)
    assert freq[0] == freq[2] == 0
    np.testing.assert_allclose(freq[[1, 3]], [0.625, 0.375], atol=0.03)
    # top_p 0.9: 0.8 < 0.9, 0.95 >= 0.9 -> keep {1, 3, 0}: 0.5/0.95, 0.3/0.95, 0.15/0.95
    freq = sample_counts(Sampler(temperature=1.0, top_p=0.9), probs)
    assert freq[2] == 0
    np.testing.assert_allclose(freq[[1, 3, 0]], np.array([0.5, 0.3, 0.15]) / 0.95, atol=0.03)
    # top_p 0.4: the top token alone already reaches it -> always id 1
    assert sample_counts(Sampler(temperature=1.0, top_p=0.4), probs)[1] == 1
    # no filter: every id appears, at its probability
    np.testing.assert_allclose(sample_counts(Sampler(temperature=1.0), probs), probs, atol=0.03)
    # top_k 2 -> {1, 3}
    freq = sample_counts(Sampler(temperature=1.0, top_k=2), probs)
    np.testing.assert_allclose(freq, [0, 0.625, 0, 0.375], atol=0.03)
    # temperature 0.5 squares and renormalizes: 0.25, 0.09 over {1, 3} with top_k 2
    freq = sample_counts(Sampler(temperature=0.5, top_k=2), probs)
    np.testing.assert_allclose(freq[[1, 3]], np.array([0.25, 0.09]) / 0.34, atol=0.03)
    # greedy
    assert sample_counts(Sampler(), probs)[1] == 1
    # top_k >= vocabulary filters nothing: the very same draws as no filter
    np.testing.assert_array_equal(sample_counts(Sampler(temperature=1.0, top_k=4), probs, seed=5),
                                  sample_counts(Sampler(temperature=1.0), probs, seed=5))
    np.testing.assert_array_equal(sample_counts(Sampler(temperature=1.0, top_k=1000), probs, seed=5),
                                  sample_counts(Sampler(temperature=1.0), probs, seed=5))


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                dict(temperature=float("nan"))])
def test_sampler_rejects_bad_settings(kw):
    with pytest.raises(ValueError):
        Sampler(**kw)


# ------------------------------------------------------------------------------- decode loop
def test_decode_stops_when_cache_full(lm):
    cfg = lm.cfg
    rows = rows_of((10, 30), (6, 31))
    tokens, lengths = lm._pad(rows)  # [2, 16]
    cache = init_cache(cfg.n_layers, 2, cfg.n_kv_heads, 16, cfg.head_dim, cfg.jnp_dtype)  # 16 slots
    logits, cache, _ = generation.prefill(lm.params, cfg, tokens, lengths, cache)
    out, state = generation.decode(lm.params, cache, logits, jnp.zeros((2,), bool), jax.random.key(0),
                                   jnp.int32(100), cfg=cfg, sampler=Sampler(), eos_ids=(), n_buffer=32)
    out = np.asarray(out)
    # the longest row has 16 - 10 = 6 free slots: six steps, then the loop stops
    assert int(state.step) == 6
    assert np.all(out[:, 6:] == -1) and np.all(out[:, :6] >= 0)
    np.testing.assert_array_equal(state.cache.layers[0].length, [16, 12])
    for r, row in enumerate(rows):
        assert out[r, :6].tolist() == greedy_reference(lm, row, 6)


def test_decode_max_steps_and_rows_done_on_entry(lm):
    cfg = lm.cfg
    rows = rows_of((10, 30), (6, 31))
    tokens, lengths = lm._pad(rows)
    cache = init_cache(cfg.n_layers, 2, cfg.n_kv_heads, 16, cfg.head_dim, cfg.jnp_dtype)
    logits, cache, _ = generation.prefill(lm.params, cfg, tokens, lengths, cache)
    out, state = generation.decode(lm.params, cache, logits, jnp.array([True, False]), jax.random.key(0),
                                   jnp.int32(3), cfg=cfg, sampler=Sampler(), eos_ids=(), n_buffer=32)
    out = np.asarray(out)
    assert int(state.step) == 3
    assert np.all(out[0] == -1) and np.all(out[1, 3:] == -1)
    assert out[1, :3].tolist() == greedy_reference(lm, rows[1], 3)
    np.testing.assert_array_equal(state.cache.layers[0].length, [10, 9])  # the done row got nothing
    np.testing.assert_array_equal(state.cache.next_pos, [10, 9])


# ------------------------------------------------------------------------------------------ RoPE
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def hf_dict(head_dim=64, theta=500000.0, rope_scaling=None):
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": head_dim * 2,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8, "rope_theta": theta,
            "rope_scaling": rope_scaling}


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 4.0}, {"rope_type": "default"},
                                     LLAMA31_SCALING])
def test_rope_inv_freq_matches_hf(scaling):
    hf = hf_dict(rope_scaling=scaling)
    cfg = LlamaConfig.from_hf_config(hf)
    ours = rope_inv_freq(cfg)
    ref = hf_inv_freq(64, 500000.0, scaling)
    assert ours.dtype == np.float32 and ours.shape == (32,)
    np.testing.assert_allclose(ours, ref, rtol=2e-6)
    if scaling is LLAMA31_SCALING:  # the case covers all three llama3 regimes
        base = hf_inv_freq(64, 500000.0)
        wavelen = 2 * np.pi / base
        assert (wavelen < 2048).any() and (wavelen > 8192).any() and ((wavelen > 2048) & (wavelen < 8192)).any()
        np.testing.assert_allclose(ours[wavelen < 2048], base[wavelen < 2048], rtol=1e-6)
        np.testing.assert_allclose(ours[wavelen > 8192], base[wavelen > 8192] / 8, rtol=1e-6)


def test_rope_scaling_rejects_unknown_type():
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.from_hf_config(hf_dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_apply_rope_identity_at_zero_norm_preserving_and_relative():
    rng = np.random.default_rng(0)
    inv = jnp.asarray(rope_inv_freq(tiny_config()))
    x = jnp.asarray(rng.normal(size=(2, 5, 3, 8)), jnp.float32)
    np.testing.assert_allclose(apply_rope(x, jnp.zeros((2, 5, 1), jnp.int32), inv), x, rtol=1e-6, atol=1e-7)
    pos = jnp.asarray(rng.integers(0, 5000, size=(2, 5, 3)), jnp.int32)
    rotated = apply_rope(x, pos, inv)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(apply_rope(rotated, -pos, inv), x, rtol=1e-4, atol=1e-4)  # -pos undoes it
    # q(m) . k(n) depends on m - n only
    q, k = x[:1, :1], x[1:, :1]
    dots = [float(jnp.sum(apply_rope(q, jnp.array([[[m]]]), inv) * apply_rope(k, jnp.array([[[n]]]), inv)))
            for m, n in [(7, 3), (104, 100), (4, 0)]]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)
    # and rotate-half layout: pair (i, i + D/2) rotated by angle m * inv_freq[i]
    m = 3
    angle = m * np.asarray(inv)
    x1, x2 = np.asarray(x[0, 0, 0, :4]), np.asarray(x[0, 0, 0, 4:])
    expected = np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)])
    np.testing.assert_allclose(apply_rope(x[:1, :1], jnp.array([[[m]]]), inv)[0, 0, 0], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ bad input
BAD_GENERATE = [
    ([], {}, "empty"),
    ("", {}, "empty"),
    ([[1, 2], []], {}, "empty"),
    ([1, TINY_VOCAB], {}, "vocabulary"),
    ([1, -1], {}, "vocabulary"),
    ([1, 2.5], {}, "integers"),
    ([1, True], {}, "integers"),
    (["a", 1], {}, "integers"),
    (np.array([1.0, 2.0]), {}, "integer array"),
    (np.zeros((1, 2, 3), np.int32), {}, "integer array"),
    (3, {}, "expected text"),
    ([1, 2], {"max_new_tokens": -1}, "max_new_tokens"),
    ([1, 2], {"max_new_tokens": 2.0}, "max_new_tokens"),
    ([1, 2], {"max_new_tokens": "3"}, "max_new_tokens"),
    ([1, 2], {"max_new_tokens": True}, "max_new_tokens"),
    (list(range(250)), {"max_new_tokens": 10}, "maximum positions"),
    ([1, 2], {"temperature": -1.0}, "temperature"),
    ([1, 2], {"top_p": 0.0}, "top_p"),
    ([1, 2], {"top_k": -2}, "top_k"),
]


@pytest.mark.parametrize("ids,kw,match", BAD_GENERATE)
def test_generate_rejects_bad_input_before_compiling(lm, ids, kw, match):
    c0 = compile_seconds()
    with pytest.raises(ValueError, match=match):
        lm.generate(ids, **kw)
    with pytest.raises(ValueError, match=match):
        next(lm.stream(ids, **kw))
    assert compile_seconds() == c0


def test_logits_and_prefill_reject_bad_input(lm):
    c0 = compile_seconds()
    for bad in ([], [1, TINY_VOCAB], np.array([0.5]), [1] * 300):
        with pytest.raises(ValueError):
            lm.logits(bad)
        with pytest.raises(ValueError):
            lm.prefill(bad)
    assert compile_seconds() == c0


def test_load_rejects_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m") as e:
        kvjax.load("no-such-model")
    assert "no-such-model" in str(e.value)
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ValueError, match="missing.gguf"):
        kvjax.load(str(missing))
    with pytest.raises(ValueError, match="config.json"):
        kvjax.load(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="expected a .gguf"):
        kvjax.load(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="dtype"):
        kvjax.load(str(tmp_path), dtype="int8")
    hf = hf_dict(head_dim=8)
    hf["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        kvjax.load(str(tmp_path))
    assert "LlamaForCausalLM" in str(e.value)  # the supported ones are listed
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config"):
        kvjax.load(str(tmp_path))
