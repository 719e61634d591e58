"""TransMLA (`kvjax.transmla`, `kvjax convert mla`): a Llama-family model converted to MLA and served by the
DeepSeek model. Exact with every dim kept; RoRoPE's rotation across heads concentrates correlated heads into
the RoPE head (then exact with one RoPE head); the interleaved RoPE layout; bad input before anything runs."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import kvjax
from kvjax import transmla
from kvjax.cli import main
from kvjax.lm import LM
from kvjax.methods.palu import kv_moments
from kvjax.models.deepseek import DeepSeekConfig, apply_rope_interleaved
from kvjax.models.rope import apply_rope
from kvjax.states import MLAKV
from kvjax.testing import random_ids, tiny_config, tiny_lm, tiny_params, tiny_tokenizer

PROMPT = random_ids(30, seed=1).tolist()
CALIB = np.asarray(random_ids(64, seed=3))[None]


def converted(lm, kv_rank, rope_dim) -> LM:
    cfg, params = transmla.convert(lm, CALIB, kv_rank, rope_dim)
    return LM(cfg, params, lm.tokenizer, name="mla")


def test_every_dim_kept_is_exact():
    lm = tiny_lm()  # K = 2 KV heads of D = 8
    mla = converted(lm, kv_rank=16, rope_dim=16)
    assert isinstance(mla.cfg, DeepSeekConfig) and not mla.cfg.latent_norm and mla.cfg.rope_period == 8
    np.testing.assert_allclose(mla.logits(PROMPT), lm.logits(PROMPT), atol=2e-5)
    assert isinstance(mla.prefill(PROMPT).layers[0], MLAKV)
    # decode runs the absorbed form
    assert mla.generate(PROMPT, max_new_tokens=10).ids == lm.generate(PROMPT, max_new_tokens=10).ids


def correlated_lm() -> LM:
    """The tiny model with KV head 1's keys = 2 x head 0's, per dim: RoRoPE puts all key energy in one head."""
    cfg = tiny_config()
    flat = traverse_util.flatten_dict(tiny_params(cfg))
    for path in flat:
        if path[-2] == "k_proj":
            w = np.asarray(flat[path])
            flat[path] = jnp.asarray(np.concatenate([w[:, :8], 2 * w[:, :8]], axis=1))
    return LM(cfg, traverse_util.unflatten_dict(flat), tiny_tokenizer(), name="correlated")


def test_rorope_moves_correlated_heads_into_the_rope_head():
    lm = correlated_lm()
    u = transmla.rotations(_key_moment(lm), 2, 8)
    # every frequency's leading direction is (1, 2) / sqrt(5) across the two heads (up to sign)
    np.testing.assert_allclose(np.abs(u[:, :, 0]), np.broadcast_to([1, 2] / np.sqrt(5), (4, 2)), atol=1e-6)
    exact = converted(lm, kv_rank=24, rope_dim=8)  # one RoPE head; the NoPE head holds zeros
    np.testing.assert_allclose(exact.logits(PROMPT), lm.logits(PROMPT), atol=2e-5)
    assert converted(tiny_lm(), kv_rank=24, rope_dim=8).logits(PROMPT).shape == (30, 266)


def _key_moment(lm) -> np.ndarray:
    return kv_moments(lm, CALIB)[0][:16, :16]


def test_the_interleaved_layout_is_the_same_rotation():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8)), jnp.float32)
    pos = jnp.arange(5)
    inv = 1.0 / (10000.0 ** (np.arange(0, 8, 2) / 8))
    order = transmla.interleave(8)
    np.testing.assert_allclose(np.asarray(apply_rope_interleaved(x[:, order], pos, jnp.asarray(inv, jnp.float32))),
                               np.asarray(apply_rope(x, pos, jnp.asarray(inv, jnp.float32)))[:, order], atol=1e-6)


def test_bad_input_is_one_line():
    cfg = tiny_config()
    for rank, rope, match in ((8, 12, "multiple|rotated heads of 8"), (8, 24, "from 8 to 16"), (25, 8, r"\[1, 24\]")):
        with pytest.raises(ValueError, match=match):
            transmla.check(cfg, rank, rope)
    with pytest.raises(ValueError, match="q/k/v biases"):
        transmla.check(cfg.replace(qkv_bias=True), 8, 8)
    mla = converted(tiny_lm(), 16, 16)
    with pytest.raises(ValueError, match="converts Llama-family models"):
        transmla.check(mla.cfg, 8, 8)


def test_convert_mla_on_the_real_model(smollm2, tmp_path, capsys):
    out = tmp_path / "mla"
    assert main(["convert", "mla", "--kv-rank", "192", "--rope-dim", "192", "--calib-tokens", "256",
                 "--out", str(out)]) == 0
    mla = kvjax.load(str(out))
    ids = smollm2.encode("The quick brown fox jumps over the lazy dog because it")
    np.testing.assert_allclose(mla.logits(ids), smollm2.logits(ids), atol=3e-4)
    assert main(["convert", "mla", "--kv-rank", "400", "--out", str(tmp_path / "x")]) == 2
    assert "--kv-rank 400" in capsys.readouterr().err
