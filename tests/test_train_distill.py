"""Healing a converted model by distillation (`kvjax train distill`, `kvjax.train.distill.DistillTask`) on a
tiny random model converted by Palu at low rank: the held-out KL falls, resume is exact, the healed run loads
as the converted model with its projections (`kvjax.load(run_dir)`), and bad input is one line."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cli import main
from kvjax import transmla
from kvjax.methods import palu
from kvjax.models.deepseek import DeepSeekConfig
from kvjax.states import MLAKV, PaluKV
from kvjax.train import TrainConfig, load_tokens, token_batches, train
from kvjax.train.distill import DistillTask
from test_checkpoints import LLAMA, random_hf_weights, write_hf_dir
from test_train import corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_distill")
    path = write_hf_dir(root / "model", LLAMA, random_hf_weights(LLAMA, seed=7))
    teacher = kvjax.load(str(path), dtype="float32")
    conv = palu.save(root / "palu", teacher, group=1, rank_k=3, rank_v=3, calib=None, tokens=256)
    student = kvjax.load(str(conv), dtype="float32")
    text = corpus(root / "c.txt")
    cfg = TrainConfig(steps=30, batch_size=4, seq_len=32, lr=1e-2, warmup=2, save_every=10, log_every=5)
    batches = token_batches(load_tokens(text, teacher.tokenizer), cfg.seq_len, cfg.batch_size, cfg.seed)
    task = DistillTask(student.cfg, str(conv), student_method=student.method, teacher=str(path))
    backbone = {"student": student.params, "teacher": teacher.params}
    result = train(task, backbone, batches, cfg, root / "run", progress=False)
    return teacher, student, task, backbone, batches, cfg, root, result


def held_out_kl(task, backbone, params, const, tokens) -> float:
    return float(task.loss(params, const, backbone, jnp.asarray(tokens), None)[0])


def test_distillation_lowers_the_held_out_kl(setup):
    _, _, task, backbone, batches, _, _, result = setup
    initial, const = task.init(backbone, batches[0])
    assert sorted(initial["layers_0"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    held_out = batches[10 ** 6]  # a batch the training never saw
    before = held_out_kl(task, backbone, initial, const, held_out)
    after = held_out_kl(task, backbone, result.state.params, const, held_out)
    assert before > 0.01 and after < 0.8 * before, (before, after)


def test_resume_is_exact(setup, tmp_path):
    _, _, task, backbone, batches, cfg, _, result = setup

    def crash(step, metrics):  # the run dies after step 23 (its last checkpoint: step 20)
        if step == 23:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        train(task, backbone, batches, cfg, tmp_path / "run", on_step=crash, progress=False)
    resumed = train(task, backbone, batches, cfg, tmp_path / "run", resume=True, progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.state.params, result.state.params)


def test_the_healed_run_loads_as_the_converted_model(setup):
    _, student, task, backbone, batches, _, root, result = setup
    healed = kvjax.load(str(root / "run"), dtype="float32")
    x = np.asarray(batches[10 ** 6])[:1, :-1]
    logits, cache = healed.prefill(x[0], return_logits=True)  # its own Palu cache, by default
    assert isinstance(cache.layers[0], PaluKV) and cache.layers[0].store.k.shape[-1] == 3
    want = task.student_logits(result.state.params, result.state.const, backbone["student"], jnp.asarray(x))[0, -1]
    np.testing.assert_allclose(np.asarray(logits)[0], np.asarray(want), atol=1e-4, rtol=1e-4)
    before = student.prefill(x[0], return_logits=True)[0]
    assert np.abs(np.asarray(before) - np.asarray(logits)).max() > 1e-3  # the projections did change


def test_kvjax_train_distill_command_and_bad_input(setup, tmp_path, capsys):
    teacher, student, task, _, _, _, root, _ = setup
    args = ["train", "distill", "--student", str(root / "palu"), "--data", str(root / "c.txt"), "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert main(["generate", "--model", str(tmp_path / "run"), "--prompt", "hello", "--max-new-tokens", "2"]) == 0
    assert main(["train", "distill", "--student", str(root / "model"), "--steps", "1", "--out", str(tmp_path / "r2")]) == 2
    assert "not a converted model directory" in capsys.readouterr().err
    assert main(["train", "cla", "--student", str(root / "palu"), "--steps", "1", "--out", str(tmp_path / "r3")]) == 2
    assert "--student / --teacher / --fake-quant are for `kvjax train distill`" in capsys.readouterr().err
    with pytest.raises(ValueError, match="teacher and student vocabularies differ"):
        dataclasses.replace(task, teacher_cfg=teacher.cfg.replace(vocab_size=teacher.cfg.vocab_size + 1))


def test_an_mla_conversion_heals_and_loads(setup, tmp_path):
    """`kvjax convert mla` then `kvjax train distill`: the MLA student's attention projections train over
    its own MLA cache; the run loads as the DeepSeek-format model with them."""
    root = setup[6]
    hf = {**LLAMA, "rope_scaling": None}  # TransMLA keeps the base's RoPE: no scaling
    teacher = kvjax.load(str(write_hf_dir(tmp_path / "model", hf, random_hf_weights(hf, seed=3))), dtype="float32")
    conv = transmla.save(tmp_path / "mla", teacher, palu.calibration_ids(teacher, None, 128), kv_rank=8, rope_dim=8)
    assert main(["train", "distill", "--student", str(conv), "--data", str(root / "c.txt"), "--steps", "3",
                 "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2", "--out", str(tmp_path / "run")]) == 0
    student, healed = kvjax.load(str(conv), dtype="float32"), kvjax.load(str(tmp_path / "run"), dtype="float32")
    assert isinstance(healed.cfg, DeepSeekConfig) and isinstance(healed.prefill([5, 6, 7]).layers[0], MLAKV)
    attn, before = healed.params["layers_0"]["attn"], student.params["layers_0"]["attn"]
    assert not np.allclose(np.asarray(attn["kv_b_proj"]), np.asarray(before["kv_b_proj"]))
    np.testing.assert_array_equal(np.asarray(healed.params["layers_0"]["mlp"]["up_proj"]["kernel"]),
                                  np.asarray(student.params["layers_0"]["mlp"]["up_proj"]["kernel"]))
