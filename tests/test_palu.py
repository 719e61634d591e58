"""Palu (`kvjax.methods.palu`, `kvjax.states.palu.PaluKV`): latents of the pre-RoPE keys and the values,
RoPE re-applied after reconstruction; exact at full rank, exact at rank r when the projections have rank
r, bytes of the latents only; `kvjax convert palu` writes a directory `kvjax.load` opens.
"""
from __future__ import annotations

import numpy as np
import pytest
from flax import traverse_util

from kvjax.cli import main
from kvjax.eval.runner import Config, cache_bytes
from kvjax.lm import LM
from kvjax.methods import palu
from kvjax.states import PaluKV, cache_nbytes
from kvjax.testing import random_ids, tiny_config, tiny_lm, tiny_params, tiny_tokenizer

IDS = random_ids(40, seed=1).tolist()


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.mark.parametrize("spec", ["palu", "palu(group=2)"])
def test_full_rank_is_exact(lm, spec):
    logits, cache = lm.prefill(IDS, method=spec, ratio=0.0, return_logits=True)
    assert isinstance(cache.layers[0], PaluKV)
    np.testing.assert_allclose(np.asarray(logits)[0], lm.logits(IDS)[-1], atol=1e-5)
    assert lm.generate(IDS, max_new_tokens=8, method=spec, ratio=0.0).ids == lm.generate(IDS, max_new_tokens=8).ids


def low_rank_lm(rank: int) -> LM:
    """The tiny model with every k_proj and v_proj of rank `rank` per KV head (E x D blocks A_h B_h)."""
    cfg = tiny_config()
    flat = traverse_util.flatten_dict(tiny_params(cfg))
    rng = np.random.default_rng(5)
    for path in flat:
        if path[-2] in ("k_proj", "v_proj"):
            e, kd = flat[path].shape
            blocks = [rng.normal(size=(e, rank)) @ rng.normal(size=(rank, cfg.head_dim)) / np.sqrt(e * rank)
                      for _ in range(kd // cfg.head_dim)]
            flat[path] = np.concatenate(blocks, axis=1).astype(np.float32)
    return LM(cfg, traverse_util.unflatten_dict(flat), tiny_tokenizer(), name=f"tiny-rank{rank}")


def test_keys_of_rank_r_are_exact_at_rank_r_and_not_below():
    """Each head's keys and values lie in an r-dim subspace: the calibrated bases find it, so r latent
    dims per token reproduce the model exactly; r - 1 cannot."""
    lm = low_rank_lm(3)
    want = lm.logits(IDS)[-1]
    exact, cache = lm.prefill(IDS, method="palu(rank_k=3, rank_v=3)", return_logits=True)
    np.testing.assert_allclose(np.asarray(exact)[0], want, atol=1e-4)
    short = lm.prefill(IDS, method="palu(rank_k=2, rank_v=2)", return_logits=True)[0]
    assert np.abs(np.asarray(short)[0] - want).max() > 1e-3
    layer = cache.layers[0]
    assert layer.store.k.shape[-1] == layer.store.v.shape[-1] == 3


def test_bytes_are_the_latents_plus_the_bases(lm):
    cache = lm.prefill(IDS, method="palu", ratio=0.5)
    layer = cache.layers[0]
    cfg = lm.cfg
    b, n, s, r = layer.store.k.shape
    assert (n, r) == (cfg.n_kv_heads, cfg.head_dim // 2)
    latents = 2 * b * n * s * r * 4  # h_k, h_v float32
    bases = 2 * n * cfg.head_dim * r * 4
    metadata = b * n * s * 4 + b * 4 + cfg.head_dim // 2 * 4  # positions, lengths, RoPE frequencies
    assert layer.nbytes() == latents + bases + metadata
    dense = lm.prefill(IDS)
    assert cache_nbytes(cache) < 0.6 * cache_nbytes(dense)
    # the eval's byte count (abstract shapes, no model at hand) finds the bases this process calibrated
    assert cache_bytes(lm.cfg, Config("palu", ratio=0.5), len(IDS)) == cache_nbytes(cache)


def test_bad_input_is_one_line(lm, tmp_path):
    with pytest.raises(ValueError, match="exceeds the group's 8 dims"):
        lm.prefill(IDS, method="palu(rank_k=9)", ratio=None)
    with pytest.raises(ValueError, match="group=3 does not divide the model's 2 KV heads"):
        lm.prefill(IDS, method="palu(group=3)", ratio=0.5)
    with pytest.raises(ValueError, match="needs a rank"):
        lm.prefill(IDS, method="palu")
    with pytest.raises(ValueError, match="does not exist"):
        lm.prefill(IDS, method=f"palu(calib={tmp_path / 'missing.txt'})", ratio=0.5)
    with pytest.raises(ValueError, match="not a `kvjax convert palu` directory"):
        lm.prefill(IDS, method=f"palu(checkpoint={tmp_path})", ratio=0.5)


def test_a_converted_directory_checks_its_model(lm, tmp_path):
    out = palu.save(tmp_path / "conv", lm, group=1, rank_k=4, rank_v=4, calib=None, tokens=512)
    cache = lm.prefill(IDS, method=f"palu(checkpoint={out})")
    assert cache.layers[0].store.k.shape[-1] == 4  # the directory's rank
    other = tiny_lm(n_layers=3)
    with pytest.raises(ValueError, match="converted from tiny-0, not this model"):
        other.prefill(IDS, method=f"palu(checkpoint={out})")


def test_convert_palu_on_the_real_model(smollm2, tmp_path, capsys):
    """`kvjax convert palu` at full rank (64 = the head dim) opens with kvjax.load and reproduces the model;
    the converted model refuses another method; a rank above the head dim fails before loading anything big."""
    import kvjax
    out = tmp_path / "palu64"
    assert main(["convert", "palu", "--model", "smollm2-135m", "--rank", "64", "--calib-tokens", "512",
                 "--out", str(out)]) == 0
    converted = kvjax.load(str(out))
    ids = smollm2.encode("The quick brown fox jumps over the lazy dog because it")
    logits, cache = converted.prefill(ids, return_logits=True)
    assert isinstance(cache.layers[0], PaluKV)
    np.testing.assert_allclose(np.asarray(logits)[0], smollm2.logits(ids)[-1], atol=2e-4)
    with pytest.raises(ValueError, match="converted model with its own cache"):
        converted.prefill(ids, method="snapkv", ratio=0.5)
    assert main(["convert", "palu", "--rank", "65", "--calib-tokens", "512", "--out", str(tmp_path / "x")]) == 2
    assert "exceeds the group's 64 dims" in capsys.readouterr().err
