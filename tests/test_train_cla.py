"""Healing a CLA conversion (`kvjax train cla`, `kvjax.train.cla.CLATask`) on a tiny random model: the held-out
distillation loss falls, resume is exact, and the healed run loads as a model (`kvjax.load(run_dir)`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cli import main
from kvjax.train import TrainConfig, load_tokens, token_batches, train
from kvjax.train.cla import CLATask
from test_checkpoints import LLAMA, random_hf_weights, write_hf_dir
from test_train import corpus

HF = {**LLAMA, "num_hidden_layers": 4, "rope_scaling": None}
SPEC = "cla(layers=all)"  # layers 1 and 3 read layers 0 and 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cla")
    path = write_hf_dir(root / "model", HF, random_hf_weights(HF, seed=5))
    lm = kvjax.load(str(path), dtype="float32")
    text = corpus(root / "c.txt")
    cfg = TrainConfig(steps=30, batch_size=4, seq_len=32, lr=1e-2, warmup=2, save_every=10, log_every=5)
    batches = token_batches(load_tokens(text, lm.tokenizer), cfg.seq_len, cfg.batch_size, cfg.seed)
    task = CLATask(lm.cfg, str(path), spec=SPEC)
    result = train(task, lm.params, batches, cfg, root / "run", progress=False)
    return lm, task, batches, cfg, root, result


def held_out_kl(task, lm, params, tokens) -> float:
    return float(task.loss(params, {}, lm.params, jnp.asarray(tokens), None)[0])


def test_healing_lowers_the_held_out_distillation_loss(setup):
    lm, task, batches, _, _, result = setup
    assert task.consumers() == [1, 3] and sorted(result.state.params) == ["layers_1", "layers_3"]
    initial = task.init(lm.params, batches[0])[0]
    held_out = batches[10 ** 6]  # a batch the training never saw
    before, after = held_out_kl(task, lm, initial, held_out), held_out_kl(task, lm, result.state.params, held_out)
    assert before > 0.01 and after < 0.8 * before, (before, after)


def test_resume_is_exact(setup, tmp_path):
    lm, task, batches, cfg, root, result = setup
    def crash(step, metrics):  # the run dies after step 23 (its last checkpoint: step 20)
        if step == 23:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        train(task, lm.params, batches, cfg, tmp_path / "run", on_step=crash, progress=False)
    resumed = train(task, lm.params, batches, cfg, tmp_path / "run", resume=True, progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.state.params, result.state.params)
    reference = {r["step"]: r["loss"] for r in result.log}
    assert [r["step"] for r in resumed.log] == [25, 30]
    assert all(r["loss"] == reference[r["step"]] for r in resumed.log)


def test_the_healed_run_loads_as_a_model_with_its_conversion(setup):
    lm, task, batches, _, root, result = setup
    healed = kvjax.load(str(root / "run"), dtype="float32")
    x = np.asarray(batches[10 ** 6])[:1, :-1]
    logits, cache = healed.prefill(x[0], method=SPEC, return_logits=True)
    want = task.student_logits(result.state.params, lm.params, jnp.asarray(x))[0, -1]
    np.testing.assert_allclose(np.asarray(logits)[0], np.asarray(want), atol=1e-4, rtol=1e-4)
    assert cache.share == (0, 0, 1, 1)
    untouched = [k for k in healed.params if k not in ("layers_1", "layers_3")]
    assert all(healed.params[k] is lm.params[k] or jax.tree_util.tree_all(jax.tree_util.tree_map(
        np.array_equal, healed.params[k], lm.params[k])) for k in untouched)
    with pytest.raises(ValueError, match=r"was healed for cla\(layers=all\)"):
        healed.prefill(x[0], method="cla")


def test_kvjax_train_cla_command(setup, tmp_path, capsys):
    _, _, _, _, root, _ = setup
    args = ["train", "cla", "--model", str(root / "model"), "--data", str(root / "c.txt"), "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path / "run"), "--spec", SPEC]
    assert main(args) == 0
    assert main(["generate", "--model", str(tmp_path / "run"), "--method", SPEC, "--prompt", "hello",
                 "--max-new-tokens", "2"]) == 0
    assert main(["train", "cla", "--model", str(root / "model"), "--steps", "1", "--out", str(tmp_path / "r2"),
                 "--spec", "cla(press=snapkv)"]) == 2
    assert "heals a cla(...) conversion without press=" in capsys.readouterr().err
