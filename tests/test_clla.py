"""CLLA by conversion (`kvjax.clla`, `kvjax convert clla`): adjacent layers of a TransMLA conversion share one
latent. Exact when a consumer's keys and values are linear maps of its producer's that commute with RoPE (the
fits recover them); the cache holds one state per group (bytes halved for pairs); the straight-through fake
quantizer rounds forward and passes gradients back; the CLI writes a directory `kvjax.load` opens."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import clla, quantizers, transmla
from kvjax.cli import main
from kvjax.lm import LM
from kvjax.models.deepseek import apply_rope_interleaved
from kvjax.states.mla import fake_quantized, mla_cache
from kvjax.testing import random_ids, tiny_config, tiny_lm, tiny_params, tiny_tokenizer
from test_checkpoints import LLAMA, random_hf_weights, write_hf_dir
from test_train import corpus

PROMPT = random_ids(30, seed=1).tolist()
CALIB = np.asarray(random_ids(96, seed=3))[None]


def linked_lm(n_layers: int = 4) -> LM:
    """A tiny model whose odd layers see their even neighbour's input (the even layer's output projection and
    MLP are zeroed, the norms copied) and compute keys and values linear in the neighbour's: keys mix the
    KV heads by one real 2 x 2 matrix (the same for every dim, so it commutes with RoPE), values by any map."""
    cfg = tiny_config(n_layers=n_layers)
    params = tiny_params(cfg, seed=4)
    rng = np.random.default_rng(0)
    d, k = cfg.head_dim, cfg.n_kv_heads
    for p in range(0, n_layers, 2):
        src, dst = params[f"layers_{p}"], dict(params[f"layers_{p + 1}"])
        src["attn"]["o_proj"]["kernel"] = jnp.zeros_like(src["attn"]["o_proj"]["kernel"])
        src["mlp"]["down_proj"]["kernel"] = jnp.zeros_like(src["mlp"]["down_proj"]["kernel"])
        dst["attn_norm"] = src["attn_norm"]
        mix = rng.normal(size=(k, k))
        wk = np.asarray(src["attn"]["k_proj"]["kernel"]).reshape(-1, k, d)
        dst["attn"]["k_proj"]["kernel"] = jnp.asarray(np.einsum("ebd,ab->ead", wk, mix).reshape(-1, k * d))
        dst["attn"]["v_proj"]["kernel"] = jnp.asarray(np.asarray(src["attn"]["v_proj"]["kernel"])
                                                      @ rng.normal(size=(k * d, k * d)))
        params[f"layers_{p + 1}"] = dst
    return LM(cfg, params, tiny_tokenizer(), name="linked")


def test_linked_layers_share_a_latent_exactly():
    lm = linked_lm()
    cfg, params = clla.convert(lm, CALIB, kv_rank=16, rope_dim=16, group=2)  # every dim kept (TransMLA exact)
    assert cfg.latent_route == (0, 0, 2, 2)
    assert "kv_a_proj_with_mqa" not in params["layers_1"]["attn"] and "kv_a_proj_with_mqa" in params["layers_2"]["attn"]
    model = LM(cfg, params, lm.tokenizer, name="clla")
    np.testing.assert_allclose(model.logits(PROMPT), lm.logits(PROMPT), atol=1e-4)
    assert model.generate(PROMPT, max_new_tokens=8).ids == lm.generate(PROMPT, max_new_tokens=8).ids  # absorbed


def test_a_group_stores_one_latent():
    lm = tiny_lm()
    mla_cfg, _ = transmla.convert(tiny_lm(), CALIB, 12, 8)
    cfg, params = clla.convert(lm, CALIB, kv_rank=12, rope_dim=8, group=2)
    shared = LM(cfg, params, lm.tokenizer, name="clla").prefill(PROMPT)
    assert shared.share == (0, 0) and len(shared.layers) == 1
    held = lambda c: sum(x.nbytes for x in jax.tree_util.tree_leaves(c.layers))  # noqa: E731
    assert held(mla_cache(cfg, 1, 32)) * 2 == held(mla_cache(mla_cfg, 1, 32))
    assert cfg.kv_bytes_per_token() * 2 == mla_cfg.kv_bytes_per_token()
    # quantized like any MLA cache (an int4 latent); the consumer reads the producer's quantized store
    q = LM(cfg, params, lm.tokenizer, name="clla").prefill(PROMPT, quant="per_token(bits=4, group=4)")
    assert len(q.layers) == 1


def test_rope_fit_recovers_a_complex_map_and_commutes_with_rope():
    """k_i = k_p G with G complex per frequency: fit_rope finds it from moments, and G's real form commutes
    with DeepSeek's interleaved rotation."""
    rng = np.random.default_rng(1)
    d, m, kd = 8, 2, 16
    rope = np.zeros((2 * kd, m * d))
    rope[:m * d] = np.eye(m * d)  # u -> the producer's RoPE key: its first m d dims
    g_true = np.zeros((m * d, m * d))
    for f in range(d // 2):
        c = rng.normal(size=(m, m)) + 1j * rng.normal(size=(m, m))
        for a in range(m):
            for b in range(m):
                ra, rb = a * d + 2 * f, b * d + 2 * f
                g_true[ra:ra + 2, rb:rb + 2] = [[c[a, b].real, c[a, b].imag], [-c[a, b].imag, c[a, b].real]]
    u = rng.normal(size=(500, 2 * kd))
    maps = lambda r: transmla.LayerMaps(None, None, None, r, None, None)  # noqa: E731  only rope_key is read
    s_pp, s_pi = u.T @ u, u.T @ (u @ rope @ g_true @ np.linalg.pinv(rope))  # consumer u_i: its key = k_p G
    g = clla.fit_rope(s_pp, s_pi, maps(rope), maps(rope), d)
    np.testing.assert_allclose(g, g_true, atol=1e-5)  # up to the ridge
    x = jnp.asarray(rng.normal(size=(5, m * d)), jnp.float32)
    pos, inv = jnp.arange(5), jnp.asarray(np.tile(1.0 / 10000 ** (np.arange(0, d, 2) / d), m), jnp.float32)
    np.testing.assert_allclose(np.asarray(apply_rope_interleaved(x @ jnp.asarray(g, jnp.float32), pos, inv)),
                               np.asarray(apply_rope_interleaved(x, pos, inv)) @ g, atol=1e-5)


def test_fake_quant_rounds_forward_and_passes_gradients_straight_through():
    q = quantizers.get("per_token(bits=4, group=4)").for_model(tiny_config())
    k = jax.random.normal(jax.random.key(0), (1, 1, 4, 8))
    v = jax.random.normal(jax.random.key(1), (1, 1, 4, 16))
    pos = jnp.arange(4)[None]
    kq, vq = fake_quantized(q, k, v, pos)
    assert len(np.unique(np.asarray(vq[0, 0, 0]))) <= 16 and not np.allclose(vq, v)  # 4-bit codes
    np.testing.assert_allclose(vq, q.dequantize_values(q.quantize_values(v), v.dtype))
    grad = jax.grad(lambda v: jnp.sum(fake_quantized(q, k, v, pos)[1] * 3.0))(v)
    np.testing.assert_allclose(grad, 3.0 * np.ones_like(v))


def test_cli_converts_and_load_opens_it(tmp_path, capsys):
    hf = {**LLAMA, "rope_scaling": None}
    tiny_model_dir = write_hf_dir(tmp_path / "tiny", hf, random_hf_weights(hf, seed=2))
    out = tmp_path / "clla"
    assert main(["convert", "clla", "--model", str(tiny_model_dir), "--kv-rank", "12", "--rope-dim", "8",
                 "--group", "2", "--calib-tokens", "128", "--out", str(out)]) == 0
    lm = kvjax.load(str(out))
    assert lm.cfg.latent_route == (0, 0) and lm.generate([1, 2, 3], max_new_tokens=3).ids
    # healed by distillation through the int4 round trip; the run loads with its consumer's new up-projection
    spec = "per_token(bits=4, group=4)"
    assert main(["train", "distill", "--student", str(out), "--fake-quant", spec, "--data", str(corpus(tmp_path / "c.txt")),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2", "--out", str(tmp_path / "run")]) == 0
    healed = kvjax.load(str(tmp_path / "run"))
    assert not np.allclose(healed.params["layers_1"]["attn"]["kv_b_proj"], lm.params["layers_1"]["attn"]["kv_b_proj"])
    assert healed.generate([1, 2, 3], max_new_tokens=3, quant=spec).ids
    assert main(["convert", "clla", "--model", str(tiny_model_dir), "--kv-rank", "12", "--rope-dim", "8",
                 "--group", "3", "--out", str(tmp_path / "bad")]) == 2  # 3 does not divide 2 layers
    assert "group=3" in capsys.readouterr().err and not (tmp_path / "bad").exists()
