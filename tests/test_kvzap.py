"""KVzap (kvpress KVzapPress): the scorer's forward on hand cases, the training task (loss falls, exact
resume), the targets from kvjax's KVzip and the hidden-state observation, deploying by ratio and by
threshold (exactly the pairs at or above it, and the recent window), and the bad-input errors."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from scipy.special import erf

from kvjax import generation, methods, pipeline
from kvjax.methods.kvzap import KVzap, log_target, predict
from kvjax.methods.kvzip import KVzip
from kvjax.observe import LayerObs, ObsSpec
from kvjax.shapes import bucket
from kvjax.states.cache import model_cache
from kvjax.testing import random_ids, tiny_lm
from kvjax.train.kvzap import KVzapTask, RowBatches, collect, correlations, load_or_collect
from kvjax.train.loop import TrainConfig, train

LM = tiny_lm(0, max_positions=2048)  # 2 layers, width 32, 4 query heads, 2 KV heads


def test_linear_and_mlp_scorers_on_hand_numbers():
    h = jnp.asarray([[1.0, 2.0]])
    linear = {"w": jnp.asarray([[1.0, 0.0, -1.0], [0.5, 2.0, 1.0]]), "b": jnp.asarray([0.0, 1.0, -2.0])}
    np.testing.assert_allclose(predict(linear, h), [[2.0, 5.0, -1.0]])  # [1+1, 4+1, -1+2-2]
    mlp = {"w1": jnp.asarray([[1.0, -1.0], [0.0, 1.0]]), "b1": jnp.asarray([0.0, -1.0]),  # pre-GELU [1, 0]
           "w": jnp.asarray([[2.0], [3.0]]), "b": jnp.asarray([0.5])}
    gelu1 = 0.5 * (1 + 0.6826894921370859)  # exact GELU(1) = Phi(1) = 0.8413..., GELU(0) = 0
    np.testing.assert_allclose(predict(mlp, h), [[2.0 * gelu1 + 0.5]], rtol=1e-6)
    np.testing.assert_allclose(log_target(jnp.asarray([1.0, np.e, 0.0])), [0.0, 1.0, np.log(1e-30)], rtol=1e-6)


def test_score_reads_the_layers_weights_and_the_hidden_states(monkeypatch):
    w = np.zeros((2, 3, 2), np.float32)
    w[1, 0, 0], w[1, 2, 1] = 1.0, -2.0  # layer 1: head 0 = h0, head 1 = -2 h2 + 1
    weights = {"w": w, "b": np.asarray([[9.0, 9.0], [0.0, 1.0]], np.float32)}
    method = KVzap(checkpoint="x")
    monkeypatch.setattr(KVzap, "weights", lambda self, cfg, name="": weights)
    hidden = jnp.asarray([[[1.0, 5.0, 2.0], [3.0, 5.0, 0.0]]])  # [B=1, S=2, E=3]
    obs = LayerObs(q_win=None, win_pos=None, col_sum=None, q_sum=None, q_sq=None, q_cnt=None, hidden=hidden)
    ctx = methods.ScoreContext(k=jnp.zeros((1, 2, 2, 4)), v=None, pos=None, length=None, n_tokens=None, obs=obs,
                               layer=1, n_layers=2, cfg=None)
    np.testing.assert_allclose(method.score(ctx), [[[1.0, 3.0], [-3.0, 1.0]]])  # [B, K, S]
    assert method.observations() == ObsSpec(hidden=True)


def synthetic_table(n=64, seed=0):
    """Rows whose targets are a fixed linear function of the inputs (a linear scorer can fit them)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, LM.cfg.n_layers, LM.cfg.d_model)).astype(np.float32)
    true = rng.normal(size=(LM.cfg.n_layers, LM.cfg.d_model, LM.cfg.n_kv_heads)).astype(np.float32) * 0.3
    return {"x": x, "y": np.einsum("nle,lek->nlk", x, true) - 5.0}


@pytest.mark.parametrize("hidden", [0, 16])
def test_training_lowers_the_loss_and_resumes_exactly(tmp_path, hidden):
    table = synthetic_table()
    task = KVzapTask(LM.cfg, "tiny-0", hidden=hidden)
    cfg = TrainConfig(steps=40, batch_size=2, seq_len=15, lr=3e-2, warmup=0, save_every=20, log_every=10)
    batches = RowBatches(64, cfg.seq_len, cfg.batch_size, seed=0)
    full = train(task, table, batches, cfg, tmp_path / "a", progress=False)
    assert full.log[-1]["loss"] < 0.3 * full.log[0]["loss"]
    def crash(step, metrics):
        if step == 25:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):  # the last checkpoint: step 20
        train(task, table, batches, cfg, tmp_path / "b", on_step=crash, progress=False)
    resumed = train(task, table, batches, cfg, tmp_path / "b", resume=True, progress=False)
    for name, value in full.state.params.items():
        np.testing.assert_array_equal(value, resumed.state.params[name])  # bit for bit
    assert [r["loss"] for r in resumed.log] == [r["loss"] for r in full.log][-len(resumed.log):]
    assert np.array_equal(batches[7], RowBatches(64, cfg.seq_len, cfg.batch_size, seed=0)[7])


@pytest.fixture(scope="module")
def table():
    """Targets from kvjax's KVzip on the tiny model: 3 windows of 48 random tokens, 24 rows each."""
    return collect(LM.params, LM.cfg, LM.tokenizer, random_ids(300, 1), n_windows=3, context=48, sample=24, batch=3)


def test_targets_are_the_log_of_kvzips_replay_and_the_hidden_states_the_attention_input(table):
    ids = np.concatenate([LM.tokenizer.encode(LM.tokenizer.chat_frame()[0], add_special_tokens=False),
                          random_ids(300, 1)[:48]])[None].astype(np.int32)
    cache = model_cache(LM.cfg, 1, bucket(ids.shape[1]))
    _, cache, _ = generation.prefill(LM.params, LM.cfg, ids, np.asarray([ids.shape[1]]), cache)
    kvzip = KVzip()
    prompt = kvzip.replay_prompt(LM.tokenizer)
    _, obs = kvzip.replay(LM.params, LM.cfg, cache, ids, np.asarray([ids.shape[1]]), prompt)
    rows = table["window"] == 0
    emb = np.asarray(LM.params["embed"]["embedding"])[ids[0]]
    scale = np.asarray(LM.params["layers_0"]["attn_norm"]["scale"])
    normed = emb / np.sqrt(np.mean(emb ** 2, -1, keepdims=True) + LM.cfg.rms_eps) * scale  # [S, E]
    for x, y, slot in zip(table["x"][rows], table["y"][rows], table["slot"][rows]):
        np.testing.assert_allclose(x[0], normed[slot], rtol=1e-5, atol=1e-6)  # layer 0's input: RMSNorm(embedding)
        assert prompt.prefix <= slot < ids.shape[1]
        want = [np.log(np.asarray(o.replay)[0, :, slot]) for o in obs]
        np.testing.assert_allclose(y, want, rtol=1e-5)
    assert table["x"].shape == (72, 2, 32) and table["y"].shape == (72, 2, 2)


@pytest.fixture(scope="module")
def run(table, tmp_path_factory):
    out = tmp_path_factory.mktemp("kvzap") / "run"
    cfg = TrainConfig(steps=4, batch_size=2, seq_len=7, lr=1e-2, warmup=0, save_every=4)
    train(KVzapTask(LM.cfg, "tiny-0", hidden=8), {"x": table["x"], "y": table["y"]},
          RowBatches(len(table["y"]), 7, 2), cfg, out, progress=False)
    return out


def test_threshold_keeps_exactly_the_pairs_at_or_above_it_and_the_window(run):
    ids = random_ids(120, 7)
    window = 16
    # independently: the attention inputs of a plain prefill, through the trained weights in numpy
    method = methods.get(f"kvzap(checkpoint={run})").bind(LM.cfg, ratio=0.5, model_name=LM.name)
    weights = method.weights(LM.cfg, LM.name)
    base = model_cache(LM.cfg, 1, bucket(len(ids)))
    _, _, obs = generation.prefill(LM.params, LM.cfg, ids[None], np.asarray([len(ids)]), base,
                                   observe=ObsSpec(hidden=True))
    scores = []
    for layer, o in enumerate(obs):
        h = np.asarray(o.hidden[0, :len(ids)], np.float64)
        a = h @ np.asarray(weights["w1"][layer], np.float64) + np.asarray(weights["b1"][layer])
        scores.append((0.5 * a * (1 + erf(a / np.sqrt(2)))) @ np.asarray(weights["w"][layer])
                      + np.asarray(weights["b"][layer]))  # [T, K]
    thr = float(np.round(np.median(scores), 3))  # about half the pairs fall below it
    cache = LM.prefill(ids, method=f"kvzap(checkpoint={run}, threshold={thr}, window={window})")
    total = 0
    for layer, (state, s) in enumerate(zip(cache.layers, scores)):
        for head in range(LM.cfg.n_kv_heads):
            want = set(np.flatnonzero((s[:, head] >= thr) | (np.arange(len(ids)) >= len(ids) - window)).tolist())
            lo, n = int(state.start[0, head]), int(state.length[0, head])
            assert set(np.asarray(state.pos[0, lo:lo + n]).tolist()) == want, (layer, head)
            total += len(want)
    assert 0.4 < total / (len(ids) * LM.cfg.n_layers * LM.cfg.n_kv_heads) < 0.8


def test_ratio_keeps_each_heads_top_and_generates(run):
    ids = random_ids(100, 3)
    cache = LM.prefill(ids, method=f"kvzap(checkpoint={run})", ratio=0.5)
    assert all(int(layer.length[0]) == 50 for layer in cache.layers)
    out = LM.generate(ids.tolist(), max_new_tokens=3, method="kvzap", checkpoint=run, ratio=0.5)
    assert len(out.ids) == 3


def test_bad_input_is_one_line_before_compiling(run, tmp_path):
    ids = random_ids(60, 2).tolist()
    with pytest.raises(ValueError, match=r"kvzap: threshold=-3 and ratio= both set what is evicted; give one"):
        pipeline.plan(LM.cfg, [60], f"kvzap(checkpoint={run}, threshold=-3)", ratio=0.5, model_name=LM.name)
    with pytest.raises(ValueError, match="threshold=-3 and budget="):
        LM.generate(ids, method=f"kvzap(checkpoint={run}, threshold=-3)", budget=20)
    with pytest.raises(ValueError, match="kvzap needs a trained scorer: pass checkpoint="):
        LM.generate(ids, method="kvzap", ratio=0.5)
    other = tiny_lm(0, n_layers=3)
    with pytest.raises(ValueError, match="checkpoint mismatch: the checkpoint was written for model 'tiny-0"):
        other.generate(ids, method=f"kvzap(checkpoint={run})", ratio=0.5)
    with pytest.raises(ValueError, match="kvzap: threshold must be a number"):
        methods.get("kvzap(threshold=high)")
    with pytest.raises(ValueError, match="targets of other settings"):
        load_or_collect(run.parent, "a", lambda: {"y": np.zeros(1)}) and load_or_collect(run.parent, "b", None)


def test_correlations_on_hand_cases():
    t = np.arange(12, dtype=np.float64).reshape(6, 1, 2)
    same = correlations(2 * t + 1, t, np.repeat([0, 1], 3))
    assert same["pearson"] == pytest.approx(1) and same["spearman"] == pytest.approx(1)
    flipped = correlations(-(t ** 3), t, np.repeat([0, 1], 3))
    assert flipped["spearman"] == pytest.approx(-1) and -1 < flipped["pearson"] < -0.9


def test_cli_trains_on_kvzip_targets_and_resumes_on_the_saved_table(tmp_path, capsys, monkeypatch):
    from kvjax.cli import main
    monkeypatch.setattr("kvjax.load", lambda name, dtype=None: LM)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} is here" for i in range(300)))
    args = ["train", "kvzap", "--model", "tiny-0", "--data", str(text), "--out", str(tmp_path / "run"),
            "--windows", "2", "--context", "32", "--hidden", "0", "--batch-size", "2",
            "--seq-len", "3", "--save-every", "2", "--log-every", "1", "--sample"]
    assert main([*args, "8", "--steps", "2"]) == 0
    with np.load(tmp_path / "run" / "targets.npz") as f:
        assert f["y"].shape == (16, 2, 2) and f["x"].shape == (16, 2, 32)
    monkeypatch.setattr("kvjax.train.kvzap.collect", lambda *a, **k: pytest.fail("the saved targets are reused"))
    assert main([*args, "8", "--steps", "3", "--resume"]) == 0
    assert main([*args, "9", "--steps", "4", "--resume"]) == 2  # another table: refused, the saved one kept
    assert "targets of other settings" in capsys.readouterr().err
    cache = LM.prefill(random_ids(40, 0), method=f"kvzap(checkpoint={tmp_path / 'run'})", ratio=0.5)
    assert int(cache.layers[0].length[0]) == 20
