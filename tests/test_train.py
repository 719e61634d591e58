"""The training loop (`kvjax.train.loop`, `kvjax.train.data`, `kvjax train`) on the tiny model:
exact resume after a crash, corrupted-checkpoint fallback, data order, sharded step, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from kvjax.cli import main
from kvjax.testing import tiny_lm
from kvjax.train import MatryoshkaTask, TrainConfig, load_tokens, token_batches, train
from kvjax.train.loop import make_mesh

WORDS = ("the king and queen of hello world walk over a bridge to meet their old friend who "
         "sings loud songs about rivers stones and birds").split()
CFG = TrainConfig(steps=6, batch_size=4, seq_len=16, lr=1e-2, warmup=1, save_every=2, keep=3, log_every=1)


def corpus(path: Path, n_words: int = 3000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text(" ".join(rng.choice(WORDS, n_words)) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(lm, task, batches, reference run dir, reference result): 6 uninterrupted steps."""
    tmp = tmp_path_factory.mktemp("train")
    lm = tiny_lm(0)
    task = MatryoshkaTask(lm.cfg, "tiny-0", n_levels=4)
    batches = token_batches(load_tokens(corpus(tmp / "corpus.txt"), lm.tokenizer), CFG.seq_len, CFG.batch_size,
                            CFG.seed)
    result = train(task, lm.params, batches, CFG, tmp / "ref", progress=False)
    return lm, task, batches, tmp / "ref", result


def assert_same_state(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}


def test_reference_run_logs_and_checkpoints(setup, capsys):
    _, _, _, ref, result = setup
    assert sorted(int(p.name) for p in (ref / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]
    assert [r["step"] for r in result.log] == [1, 2, 3, 4, 5, 6] and int(result.state.step) == 6
    rec = result.log[0]
    assert set(rec) >= {"loss", "grad_norm", "lr", "kl", "ce", "tokens_per_s"}
    assert rec["lr"] == pytest.approx(CFG.lr / 2) and result.log[1]["lr"] == pytest.approx(CFG.lr)  # warmup 1
    assert rec["loss"] == pytest.approx(0.25 * rec["kl"] + 0.75 * rec["ce"], rel=1e-5)
    assert losses(ref) == {r["step"]: r["loss"] for r in result.log}


def test_resume_after_crash_is_exact(setup, tmp_path):
    lm, task, batches, _, ref = setup

    def crash(step, metrics):
        if step == 5:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(task, lm.params, batches, CFG, tmp_path, on_step=crash, progress=False)
    assert max(losses(tmp_path)) == 5  # the crashed run logged step 5, its last checkpoint is step 4
    resumed = train(task, lm.params, batches, CFG, tmp_path, resume=True, progress=False)
    assert [r["step"] for r in resumed.log] == [5, 6]
    assert losses(tmp_path) == {r["step"]: r["loss"] for r in ref.log}  # the same curve, bit for bit
    assert_same_state(resumed.state, ref.state)


def test_corrupted_latest_checkpoint_falls_back(setup, tmp_path):
    lm, task, batches, ref_dir, ref = setup
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    for f in (run / "checkpoints" / "6").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning, match="checkpoint at step 6 is unreadable"):
        resumed = train(task, lm.params, batches, CFG, run, resume=True, progress=False)
    assert [r["step"] for r in resumed.log] == [5, 6]
    assert_same_state(resumed.state, ref.state)


def test_checkpoint_of_another_model_or_method(setup, tmp_path):
    lm, task, batches, ref_dir, _ = setup
    other_model = MatryoshkaTask(lm.cfg.replace(rope_theta=5000.0), "tiny-0", n_levels=4)
    with pytest.raises(ValueError, match=r"trained with other settings \(model \"tiny-0 \(\w+\)\" → \"tiny-0 "):
        train(other_model, lm.params, batches, CFG, ref_dir, resume=True, progress=False)

    class OtherMethod(MatryoshkaTask):
        name = "other"

    with pytest.raises(ValueError, match=r"trained with other settings \(method \"matryoshka\" → \"other\"; saved in"):
        train(OtherMethod(lm.cfg, "tiny-0", n_levels=4), lm.params, batches, CFG, ref_dir, resume=True,
              progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(task, lm.params, batches, CFG, ref_dir, progress=False)


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(16 * 16 + 1, dtype=np.int32)  # 16 windows of 16 + 1 tokens, each starting at 16 w
    a, b = token_batches(tokens, 16, 4, seed=0), token_batches(tokens, 16, 4, seed=0)
    for step in (0, 3, 5):  # step 5: the second epoch
        np.testing.assert_array_equal(a[step], b[step])
        assert a[step].shape == (4, 17) and a[step].dtype == np.int32
    assert not np.array_equal(a[0], token_batches(tokens, 16, 4, seed=1)[0])
    epochs = [np.concatenate([a[s] for s in range(e * 4, e * 4 + 4)]) for e in (0, 1)]
    for rows in epochs:  # every window once per epoch: L + 1 consecutive tokens from a multiple of L
        np.testing.assert_array_equal(rows - rows[:, :1], np.broadcast_to(np.arange(17), rows.shape))
        assert sorted(rows[:, 0].tolist()) == list(range(0, 256, 16))
    assert not np.array_equal(epochs[0][:, 0], epochs[1][:, 0])  # reshuffled every epoch


def test_data_sources(tmp_path):
    lm = tiny_lm(0)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("world")
    (tmp_path / "docs" / "a.txt").write_text("hello")
    eos = lm.tokenizer.eos_ids[0]
    ids = load_tokens(tmp_path / "docs", lm.tokenizer)
    assert ids.tolist() == lm.encode("hello") + [eos] + lm.encode("world") + [eos]
    np.save(tmp_path / "ids.npy", ids.astype(np.int64))
    np.testing.assert_array_equal(load_tokens(tmp_path / "ids.npy", lm.tokenizer), ids)
    np.save(tmp_path / "bad.npy", np.array([0, 10 ** 6]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        load_tokens(tmp_path / "bad.npy", lm.tokenizer)


def test_bad_input_errors(tmp_path):
    lm = tiny_lm(0)
    with pytest.raises(ValueError, match="no such file or directory"):
        load_tokens(tmp_path / "missing.txt", lm.tokenizer)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds 0 tokens: not one window"):
        token_batches(load_tokens(tmp_path / "empty.txt", lm.tokenizer), 16, 4, 0)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"mesh size 2 outside \[1, 1\]"):
        make_mesh(2)
    with pytest.raises(ValueError, match="n_levels must be an integer >= 1 dividing head_dim 8"):
        MatryoshkaTask(lm.cfg, "tiny-0", n_levels=3)


@pytest.mark.parametrize("argv, message", [
    (["--data", "{tmp}/missing.txt", "--steps", "5"], "--data: no such file or directory"),
    (["--data", "{tmp}/empty.txt", "--steps", "5"], "holds 0 tokens: not one window"),
    (["--data", "{tmp}/corpus.txt", "--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["--data", "{tmp}/corpus.txt", "--steps", "5", "--devices", "4"], "mesh size 4 outside [1, 1]"),
    (["--data", "{tmp}/corpus.txt", "--steps", "5", "--cache-fraction", "0.01"], "--cache-fraction must be in"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr("kvjax.load", lambda name, dtype=None: tiny_lm(0))
    corpus(tmp_path / "corpus.txt")
    (tmp_path / "empty.txt").write_text("")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["train", "matryoshka", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvjax: error: ") and message in err and err.count("\n") == 1


def test_cli_trains_resumes_and_searches_ranks(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("kvjax.load", lambda name, dtype=None: tiny_lm(0))
    args = ["train", "matryoshka", "--model", "tiny", "--data", str(corpus(tmp_path / "corpus.txt")),
            "--out", str(tmp_path / "run"), "--batch-size", "4", "--seq-len", "16", "--save-every", "2",
            "--log-every", "1", "--n-levels", "4"]
    assert main([*args, "--steps", "2"]) == 0
    assert main([*args, "--steps", "2"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main([*args, "--steps", "3", "--resume", "--cache-fraction", "0.5"]) == 0
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
    report = json.loads((tmp_path / "run" / "ranks.json").read_text())
    assert report["step"] == 3 and len(report["ranks_k"]) == 2
    assert sum(report["ranks_k"]) + sum(report["ranks_v"]) == 0.5 * 2 * 2 * 8  # half the K/V columns
    assert report["kv_bytes_per_token"] * 2 == report["full_kv_bytes_per_token"]


SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from kvjax.testing import tiny_lm, random_ids
    from kvjax.train import MatryoshkaTask, TrainConfig
    from kvjax.train.locret import LocretTask
    from kvjax.train.loop import check_mesh, init_state, jit_train_step, make_mesh, replicate, shard_batch

    assert len(jax.devices()) == 8
    lm = tiny_lm(0)
    cfg = TrainConfig(steps=4, batch_size=8, seq_len=16, lr=1e-2, warmup=0)
    tokens = random_ids(8 * 17, seed=1).reshape(8, 17)
    for task in (MatryoshkaTask(lm.cfg, "tiny-0", n_levels=4), LocretTask(lm.cfg, "tiny-0", hidden=16)):
        out = {}
        for n in (1, 8):
            mesh = make_mesh(n)
            state, backbone = replicate(mesh, (init_state(task, lm.params, tokens, cfg), lm.params))
            batch = shard_batch(mesh, tokens)
            grads = jax.jit(jax.grad(lambda p, c, b, t: task.loss(p, c, b, t, jax.random.key(0))[0]))(
                state.params, state.const, backbone, batch)
            step = jit_train_step(task, cfg)
            state, first = step(state, backbone, batch)
            state, second = step(state, backbone, batch)
            out[n] = (jax.device_get(grads), jax.device_get(first), float(second["loss"]),
                      len(second["loss"].sharding.device_set))
        assert out[8][3] == 8 and out[1][3] == 1
        for a, b in zip(jax.tree_util.tree_leaves(out[1][0]), jax.tree_util.tree_leaves(out[8][0])):
            np.testing.assert_allclose(a, b, atol=1e-6)
        for name in out[1][1]:
            np.testing.assert_allclose(out[1][1][name], out[8][1][name], rtol=1e-5, err_msg=(task.name, name))
        # Parameters after an update are not compared entry by entry: rotations inside the kept (or the
        # dropped) subspace leave MatryoshkaKV's loss unchanged, their gradients are rounding noise (~1e-9),
        # and Adam's first step, g / (|g| + eps), turns noise of either sign into steps of up to lr.
        np.testing.assert_allclose(out[1][2], out[8][2], rtol=1e-3)
    try:
        check_mesh(make_mesh(8), 4 + 2)
    except ValueError as e:
        assert "batch size 6 is not a multiple of the mesh's data axis (8 devices)" in str(e)
    else:
        raise AssertionError("no error for a batch of 6 on 8 devices")
    print("OK")
""")


def test_sharded_step_equals_single_device_step():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
