"""DuoAttention (`kvjax.methods.duo`, `kvjax.states.duo`, `kvjax.train.duo`) on tiny random models: the gate
mix and the streaming heads' kept set by hand, real bytes, names and quantization, training (the loss
falls, resume is exact) and bad input.

Legend: B batch, T tokens, H query heads, K KV heads, D head dim.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import methods, pipeline
from kvjax.cli import main
from kvjax.methods.base import ScoreContext
from kvjax.methods.duo import DuoAttention, load_gates, on_the_fly_scores, streaming_mask
from kvjax.models.rope import apply_rope, rope_inv_freq
from kvjax.states import DuoKV, cache_nbytes, kept_positions, memory_report
from kvjax.testing import tiny_lm
from kvjax.train import DuoTask, PasskeyBatches, TrainConfig, train
from kvjax.train.duo import GateMixKV
from test_kv_state import naive_attention

F32 = jnp.float32
PROMPT = "hello world " * 30  # 60 tokens of the tiny tokenizer ("hello", " world", " ")


def test_gate_mix_by_hand():
    # one KV head, one query head, D = 1, keys 0 (uniform attention over what is visible), v[s] = s.
    # Query at position 5, sink 1, recent 2: full attention averages v over {0..5} = 2.5; streaming over
    # the sink {0} and the window {4, 5} = 3.0; gate 0.25: 0.25 * 2.5 + 0.75 * 3.0 = 2.875.
    state = GateMixKV.init(1, 1, 8, 1, F32, jnp.asarray([0.25]), sink=1, recent=2)
    k = jnp.zeros((1, 1, 6, 1), F32)
    v = jnp.arange(6, dtype=F32).reshape(1, 1, 6, 1)
    state = state.append(k, v, jnp.arange(6, dtype=jnp.int32)[None], jnp.asarray([6], jnp.int32))
    out = state.attend(jnp.ones((1, 1, 1, 1), F32), jnp.asarray([[5]], jnp.int32))
    np.testing.assert_allclose(np.asarray(out).ravel(), [2.875], rtol=1e-6)
    # a query at position 2 sees {0, 1, 2} both ways (window {1, 2} + sink {0}): 1.0 whatever the gate
    out = state.attend(jnp.ones((1, 1, 1, 1), F32), jnp.asarray([[2]], jnp.int32))
    np.testing.assert_allclose(np.asarray(out).ravel(), [1.0], rtol=1e-6)


def test_streaming_head_keeps_sinks_and_recent_while_retrieval_heads_grow():
    # KV head 1 streams with 2 sinks and 3 recent slots; head 0 keeps everything
    rng = np.random.default_rng(0)
    b, n_kv, h, d = 1, 2, 4, 4
    state = DuoKV.init(b, n_kv, 32, d, F32, streaming=(1,), sink=2, recent=3)
    k, v = (jnp.asarray(rng.normal(size=(b, n_kv, 20, d)), F32) for _ in range(2))
    state = jax.jit(lambda s: s.append(k, v, jnp.arange(20, dtype=jnp.int32)[None], jnp.asarray([20])))(state)
    pos = state.positions()
    assert pos[0][0].tolist() == list(range(20)) and pos[1][0].tolist() == [0, 1, 17, 18, 19]
    for p in (20, 21):  # decode steps: the oldest non-sink token leaves
        kk, vv = (jnp.asarray(rng.normal(size=(b, n_kv, 1, d)), F32) for _ in range(2))
        state = state.append(kk, vv, jnp.asarray([[p]], jnp.int32), jnp.asarray([1]))
        k, v = jnp.concatenate([k, kk], 2), jnp.concatenate([v, vv], 2)
    pos = state.positions()
    assert pos[0][0].tolist() == list(range(22)) and pos[1][0].tolist() == [0, 1, 19, 20, 21]
    # attention: query heads 0, 1 read KV head 0 (all 22 tokens), heads 2, 3 read KV head 1 (its 5)
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), F32)
    out = np.asarray(state.attend(q, jnp.asarray([[21]], jnp.int32)))
    all_pos = np.arange(22)[None, None].repeat(2, 1)
    want0 = naive_attention(q[:, :, :2], [[21]], k[:, :1], v[:, :1], all_pos[:, :1], [22])
    kept = np.array([0, 1, 19, 20, 21])
    want1 = naive_attention(q[:, :, 2:], [[21]], k[:, 1:, kept], v[:, 1:, kept], kept[None, None], [5])
    np.testing.assert_allclose(out, np.concatenate([want0, want1], axis=2), atol=1e-5)


def test_streaming_mask_by_sparsity_and_threshold():
    gates = np.array([[0.9, 0.1, 0.5], [0.3, 0.3, 1.0]])
    # the round(0.5 * 6) = 3 lowest: 0.1, then the two 0.3 (ties by index)
    assert streaming_mask(gates, sparsity=0.5).tolist() == [[False, True, False], [True, True, False]]
    assert streaming_mask(gates, sparsity=0.0).sum() == 0 and streaming_mask(gates, sparsity=1.0).all()
    assert streaming_mask(gates, threshold=0.5).tolist() == [[False, True, True], [True, True, False]]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(0, head_dim=32)  # KIVI's groups of 32 fit a head


def gate_file(tmp_path, gates) -> str:
    path = tmp_path / "gates.npy"
    np.save(path, np.asarray(gates, np.float32))
    return str(path)


def test_trained_gates_store_real_bytes_and_compose_with_kivi(lm, tmp_path):
    # layer 0: KV head 1 streams; layer 1: both stream (sparsity 0.75 of 4 heads = the 3 lowest gates)
    path = gate_file(tmp_path, [[0.9, 0.2], [0.1, 0.3]])
    ids = lm.encode(PROMPT)
    n = len(ids)
    spec = f"duo(gates={path}, sparsity=0.75, sink=4, recent=8)"
    duo = lm.prefill(ids, method=spec)
    assert [type(s).__name__ for s in duo.layers] == ["DuoKV", "DuoKV"]
    pos = kept_positions(duo)
    tail = list(range(4)) + list(range(n - 8, n))
    assert pos[0][0][0].tolist() == list(range(n)) and pos[0][1][0].tolist() == tail
    assert pos[1][0][0].tolist() == tail and pos[1][1][0].tolist() == tail
    # bytes: 1 of 4 heads holds the prompt's slots, 3 hold 12; exactly what the plan predicts, nothing run
    abstract = lambda method: cache_nbytes(pipeline.abstract(lm.cfg, pipeline.plan(lm.cfg, [n], method), n))  # noqa: E731
    assert cache_nbytes(duo) == abstract(spec) < 0.3 * abstract(None)
    assert memory_report(duo)["total"] == cache_nbytes(duo)
    # KIVI-4 stores both kinds (its residual of 32 tokens stays in full precision), and decodes
    wide = f"duo(gates={path}, sparsity=0.75, sink=32, recent=32)"
    out = lm.generate(ids, method=f"compose({wide}, kivi-4(residual=32))", max_new_tokens=4, stop_at_eos=False)
    quant = out.cache
    assert [type(s.full).__name__ if s.full else None for s in quant.layers] == ["QuantKV", None]
    assert all(s.stream.quant is not None for s in quant.layers)
    assert len(out.ids) == 4 and abstract(f"compose({wide}, kivi-4(residual=32))") < 0.6 * abstract(wide)


def test_no_streaming_head_is_the_full_model_and_on_the_fly_runs_by_name(lm):
    ids = lm.encode(PROMPT)
    ref = lm.generate(ids, max_new_tokens=6)
    assert lm.generate(ids, method="duo(sparsity=0.0)", max_new_tokens=6).ids == ref.ids
    # every token (150 + 6) within sink + recent: streaming heads hold them all: the full model's output
    assert lm.generate(ids, method="duo(sparsity=0.5, sink=100, recent=100)", max_new_tokens=6).ids == ref.ids
    assert methods.spec_of(methods.get("duo(sparsity=0.5, sink=64)")) == "duo(sparsity=0.5,sink=64)"
    assert pipeline.plan(lm.cfg, [len(ids)], "duo", ratio=0.5).method == DuoAttention(sparsity=0.5)
    small = lm.prefill(ids, method="duo", ratio=0.5)
    for state in small.layers:  # on the fly: round(0.5 * 2) = 1 streaming head per layer
        assert state.stream.k.shape[1] == 1 and state.full.k.shape[1] == 1 and state.stream.capacity == 150


@pytest.mark.parametrize("kw, message", [
    (dict(method="duo(sparsity=1.5)"), r"sparsity must be in \[0, 1\], got 1.5"),
    (dict(method="duo(sparsity=0.5, threshold=0.3)"), "not both"),
    (dict(method="duo(sparsity=0.5)", ratio=0.5), "give one"),
    (dict(method="duo"), "duo needs sparsity= or threshold="),
    (dict(method="duo(threshold=0.3)"), "pass gates= too"),
    (dict(method="duo(sparsity=0.5)", budget=8), "not budget="),
    (dict(method="duo(sparsity=0.5)", capacity=32), "bounds its cache itself"),
    (dict(method="adakv:duo(sparsity=0.5)"), "wraps a plain scorer"),
])
def test_bad_input_is_one_line_before_compiling(lm, kw, message):
    with pytest.raises(ValueError, match=message) as e:
        pipeline.plan(lm.cfg, [40], **kw)
    assert "\n" not in str(e.value)


def test_gate_file_for_another_model(lm, tmp_path):
    with pytest.raises(ValueError, match=r"shape \[3, 2\], this model has 2 layers x 2 KV heads") as e:
        pipeline.plan(lm.cfg, [40], f"duo(gates={gate_file(tmp_path, np.ones((3, 2)))}, sparsity=0.5)")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="run directory or a .npy"):
        load_gates(str(tmp_path / "missing.npy"), lm.cfg)


def passkey_data(lm, seq_len=96, batch=4, seed=0):
    rng = np.random.default_rng(0)
    words = "the king and queen of hello world walk over a bridge to meet their old friend".split()
    tokens = np.asarray(lm.tokenizer.encode(" ".join(rng.choice(words, 2000))), np.int32)
    return PasskeyBatches(tokens, lm.tokenizer, seq_len, batch, seed, n_keys=2, digits=3)


def test_passkey_windows_end_with_their_answer():
    lm = tiny_lm(0)
    data = passkey_data(lm)
    batch = data[3]
    assert batch.shape == (4, 97) and np.array_equal(batch, data[3]) and not np.array_equal(batch, data[4])
    text = lm.decode(batch[0])
    keys = [text.split(f"Pass key {i} is ")[1][:3] for i in (1, 2)]
    assert text.endswith(f" The pass keys are:{keys[0]}, {keys[1]}, ")
    assert lm.decode(batch[0][-data.answer_len:]) == f"{keys[0]}, {keys[1]}, "
    with pytest.raises(ValueError, match="leaves no haystack"):
        PasskeyBatches(data.tokens, lm.tokenizer, 20, 4, n_keys=2, digits=3)


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path):
    lm = tiny_lm(0)
    data = passkey_data(lm)
    task = DuoTask(lm.cfg, "tiny-0", answer_len=data.answer_len, sink=2, recent=8)
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=96, lr=0.02, warmup=0, save_every=4, log_every=1)
    ref = train(task, lm.params, data, cfg, tmp_path / "ref", progress=False)
    gates = np.asarray(ref.state.params["gates"])
    assert ref.log[-1]["loss"] < ref.log[0]["loss"] and (gates < 1).all() and (gates >= 0).all()

    def crash(step, metrics):
        if step == 6:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(task, lm.params, data, cfg, tmp_path / "cut", on_step=crash, progress=False)
    resumed = train(task, lm.params, data, cfg, tmp_path / "cut", resume=True, progress=False)
    assert [r["step"] for r in resumed.log] == [5, 6, 7, 8]
    assert [r["loss"] for r in resumed.log] == [r["loss"] for r in ref.log[4:]]
    np.testing.assert_array_equal(np.asarray(resumed.state.params["gates"]), gates)
    # the run directory is a gate file for this model, and for no other
    np.testing.assert_array_equal(load_gates(str(tmp_path / "ref"), lm.cfg), gates)
    other = tiny_lm(0, d_ff=48)
    with pytest.raises(ValueError, match="checkpoint mismatch") as e:
        pipeline.plan(other.cfg, [40], f"duo(gates={tmp_path / 'ref'}, sparsity=0.5)")
    assert "\n" not in str(e.value)
    assert DuoAttention(gates=str(tmp_path / "ref"), sparsity=0.5).bind(lm.cfg).gates == str(tmp_path / "ref")


def test_on_the_fly_scores_match_kvpress():
    # kvpress's duo_attention_on_the_fly arithmetic on given means (tests/golden/make_duo_reference.py); here the
    # means come from a prompt: keys stored post-RoPE at positions 0..15 (rotated back), the query sum observed
    ref = np.load(Path(__file__).parent / "golden" / "duo" / "on_the_fly.npz")
    cfg = tiny_lm(0).cfg
    s = 16
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (1, 2, s))
    k = apply_rope(jnp.broadcast_to(jnp.asarray(ref["mu_k"])[None, :, None], (1, 2, s, 8)), pos,
                   jnp.asarray(rope_inv_freq(cfg)))
    obs = SimpleNamespace(q_sum=3 * jnp.asarray(ref["mu_q"])[None], q_cnt=jnp.asarray([3.0]))
    ctx = ScoreContext(k=k, v=k, pos=pos, length=jnp.asarray([s]), n_tokens=jnp.asarray([s]), obs=obs, layer=0,
                       n_layers=2, cfg=cfg)
    np.testing.assert_allclose(np.asarray(on_the_fly_scores(ctx, int(ref["q_len"])))[0], ref["scores"], rtol=1e-4)


def one_error(capsys) -> str:
    """The one error line on stderr (compile-time notes may precede it)."""
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kvjax: error")]
    assert len(errors) == 1, errors
    return errors[0]


def test_cli_trains_gates_and_generates_with_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("kvjax.load", lambda name, dtype=None: tiny_lm(0))
    words = "the king and queen of hello world walk over a bridge".split()
    (tmp_path / "text.txt").write_text(" ".join(np.random.default_rng(0).choice(words, 2000)))
    args = ["train", "duo", "--model", "tiny", "--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "run"),
            "--batch-size", "2", "--save-every", "2", "--log-every", "1", "--sink", "2", "--recent", "8",
            "--n-keys", "2", "--key-digits", "3"]
    assert main([*args, "--steps", "2", "--seq-len", "20"]) == 2  # too short for the needles: one line
    assert one_error(capsys).endswith("(66 tokens of needles, question and answer)")
    assert main([*args, "--steps", "2", "--seq-len", "96"]) == 0
    assert main([*args, "--steps", "2", "--seq-len", "96", "--n-keys", "3", "--resume"]) == 2  # other data
    assert "n_keys 2 → 3" in one_error(capsys)
    spec = f"duo(gates={tmp_path / 'run'}, sparsity=0.5, sink=2, recent=8)"
    assert main(["generate", "--prompt", "hello world " * 10, "--method", spec, "--max-new-tokens", "2"]) == 0
    assert main(["generate", "--prompt", "hello", "--method", "duo(sparsity=2)"]) == 2
    assert one_error(capsys) == "kvjax: error: duo: sparsity must be in [0, 1], got 2"
