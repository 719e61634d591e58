"""Palu (`kvjax.methods.palu`, `kvjax.states.palu.PaluKV`): latents of the pre-RoPE keys and the values,
RoPE re-applied after reconstruction; exact at full rank, exact at rank r when the projections have rank
r, bytes of the latents only; `kvjax convert palu` writes a directory `kvjax.load` opens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from kvjax.cli import main
from kvjax.eval.runner import Config, cache_bytes
from kvjax.lm import LM
from kvjax.methods import palu
from kvjax.states import PaluKV, cache_nbytes
from kvjax.states.palu import DECODE_BLOCK
from kvjax.testing import random_ids, tiny_config, tiny_lm, tiny_params, tiny_tokenizer
from test_kv_state import naive_attention

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


def _palu_state(group: int, positions: np.ndarray, n_valid, seed: int = 0):
    """A `PaluKV` (batch 2, 4 KV heads of 16 dims, 8 query heads, ranks 5 / 6 per group) holding random
    tokens at `positions` [2, n], the second row `n_valid[1]` of them (padding past)."""
    b, n = positions.shape
    k, h, d = 4, 8, 16
    rng = np.random.default_rng(seed)
    basis = lambda r: jnp.asarray(np.linalg.qr(rng.normal(size=(k // group, group * d, group * d)))[0][..., :r],  # noqa: E731
                                  jnp.float32)
    state = PaluKV.init(b, n + 8, basis(5), basis(6), 1.0 / 10000.0 ** (np.arange(0, d, 2) / d), jnp.float32)
    features = jnp.asarray(rng.normal(size=(b, n, (h + 2 * k) * d)), jnp.float32)
    v = features[..., (h + k) * d:].reshape(b, n, k, d).transpose(0, 2, 1, 3)
    return state.append(v, v, jnp.asarray(positions, jnp.int32), jnp.asarray(n_valid), features=features)


def _whole_cache_attention(state, q, q_pos):
    """Every key rebuilt at once (`PaluKV.keys`), the values mapped back per head: float64 reference."""
    g, d = state.group, state.head_dim
    n_kv = state.uk.shape[0] * g
    uv = np.asarray(state.uv).reshape(state.uv.shape[0], g, d, -1).reshape(n_kv, d, -1)
    values = np.einsum("bksr,kdr->bksd", np.repeat(np.asarray(state.store.v, np.float64), g, axis=1), uv)
    return naive_attention(q, q_pos, state.keys(), values, state.positions(), state.length)


@pytest.mark.parametrize("group, layout", [(1, "consecutive"), (2, "gaps")])
def test_blockwise_keys_equal_the_whole_cache_reconstruction(group, layout):
    """Keys rebuilt a block at a time inside the online softmax (decode: `DECODE_BLOCK` slots, the last block
    overlapping; a prefill chunk: `block`) give the attention of the whole-cache reconstruction, batch 2 with
    padding: in blocks of consecutive positions (the rotation from one sin/cos per row and block), and in a
    first block with gaps and a slot out of order (tokens evicted or refilled: the per-key rotation) followed
    by a consecutive one."""
    n = DECODE_BLOCK + 150
    positions = np.broadcast_to(np.arange(n), (2, n)).copy()
    if layout == "gaps":
        positions[:, 40:] += 25
        positions[1, 3] = 900
    state = _palu_state(group, positions, [n, n - 60])
    for t, block in ((1, None), (5, 64)):
        q = jax.random.normal(jax.random.key(t), (2, t, 8, 16))
        q_pos = jnp.asarray(np.full((2, t), 1000) - np.arange(t)[::-1], jnp.int32)
        got = jax.jit(lambda st, q, q_pos: st.attend_jnp(q, q_pos, block))(state, q, q_pos)
        np.testing.assert_allclose(np.asarray(got), _whole_cache_attention(state, q, q_pos), rtol=1e-4, atol=2e-5)
