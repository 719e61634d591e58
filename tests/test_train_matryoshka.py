"""MatryoshkaKV (`kvjax.train.matryoshka`) and its inference state `LatentKV` on the tiny model."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.states import DenseKV, QuantKV, tree_nbytes
from kvjax.states.latent import LatentKV
from kvjax.testing import random_ids, tiny_lm
from kvjax.train import MatryoshkaTask, TrainConfig, cayley, load_tokens, pca_basis, token_batches
from kvjax.train.loop import init_state, jit_train_step
from kvjax.train.matryoshka import cross_entropy, kl_divergence
from test_train import corpus


def orthonormal(key, n_kv, d, r):
    return jnp.linalg.qr(jax.random.normal(key, (n_kv, d, d)))[0][:, :, :r]


def test_cayley_is_orthogonal_and_starts_at_identity():
    w = 3.0 * jax.random.normal(jax.random.key(0), (2, 3, 16, 16))
    u = cayley(w)
    np.testing.assert_allclose(u @ jnp.swapaxes(u, -1, -2), np.broadcast_to(np.eye(16), u.shape), atol=2e-5)
    np.testing.assert_array_equal(cayley(jnp.zeros((16, 16))), np.eye(16))
    # only the strict upper triangle matters: the lower one gets zero gradient
    g = jax.grad(lambda w: jnp.sum(cayley(w)[:, :4] ** 3))(w[0, 0])
    assert np.all(np.asarray(g)[np.tril_indices(16)] == 0) and np.abs(g).max() > 0


def test_pca_basis_orders_axes_by_second_moment():
    rng = np.random.default_rng(0)
    axes = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    scales = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1])
    x = (rng.normal(size=(2, 1, 4000, 8)) * scales) @ axes.T  # [B, K, T, D], variance scales^2 along axes
    u = pca_basis(x)[0]
    np.testing.assert_allclose(u.T @ u, np.eye(8), atol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(u * axes, axis=0)), np.ones(8), atol=0.05)  # same axes, same order


@pytest.mark.parametrize("rk, rv", [(8, 8), (4, 6), (2, 1)])
def test_latent_attention_equals_attention_over_reconstructed_kv(rk, rv):
    b, n_kv, g, d, t, s = 2, 2, 3, 8, 5, 16
    keys = jax.random.split(jax.random.key(1), 6)
    uk, uv = orthonormal(keys[0], n_kv, d, rk), orthonormal(keys[1], n_kv, d, rv)
    k, v = (jax.random.normal(kk, (b, n_kv, t, d)) for kk in keys[2:4])
    q = jax.random.normal(keys[4], (b, t, n_kv * g, d))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    n_valid = jnp.array([t, 3], jnp.int32)  # row 1: two padding tokens
    state = LatentKV.init(b, s, uk, uv, jnp.float32).append(k, v, pos, n_valid)
    assert state.ck.shape == (b, n_kv, s, rk) and state.cv.shape == (b, n_kv, s, rv)
    proj = lambda x, u: jnp.einsum("bktd,kdr,ker->bkte", x, u, u)  # noqa: E731  x P P^T
    dense = DenseKV.init(b, n_kv, s, d, jnp.float32).append(proj(k, uk), proj(v, uv), pos, n_valid)
    out, lse = state.attend(q, pos, return_lse=True)
    ref, ref_lse = dense.attend(q, pos, return_lse=True)
    np.testing.assert_allclose(out[0], ref[0], atol=1e-5)
    np.testing.assert_allclose(out[1, :3], ref[1, :3], atol=1e-5)
    np.testing.assert_allclose(lse.reshape(b, n_kv, g, t)[1, :, :, :3], ref_lse.reshape(b, n_kv, g, t)[1, :, :, :3],
                               atol=1e-5)
    assert state.nbytes() == 4 * (b * n_kv * s * (rk + rv) + n_kv * d * (rk + rv) + b * n_kv * s + b)
    grown = state.with_room(20)
    assert grown.capacity == 5 + 20 and tree_nbytes(grown.uk) == tree_nbytes(state.uk)  # longest row: 5
    np.testing.assert_array_equal(grown.positions()[:, :, 5:], np.iinfo(np.int32).max)
    assert bool(grown.has_room(20)) and not bool(grown.has_room(21))


def test_full_rank_pca_init_reproduces_the_model():
    lm = tiny_lm(0)
    task = MatryoshkaTask(lm.cfg, "tiny-0")
    tokens = random_ids(4 * 33, seed=2).reshape(4, 33)
    params, const = task.init(lm.params, jnp.asarray(tokens))
    x = jnp.asarray(random_ids(2 * 24, seed=3).reshape(2, 24))
    d = lm.cfg.head_dim
    np.testing.assert_allclose(task.student_logits(params, const, lm.params, x, d, d),
                               task.teacher_logits(lm.params, x), atol=5e-5)
    uk, _ = task.bases(params, const)
    assert uk.shape == (2, 2, 8, 8)
    # LatentKV in generation: full ranks give the model's own greedy tokens
    full = task.cache(params, const, (d, d), (d, d), batch=1, capacity=16)
    assert lm.generate("hello world", max_new_tokens=10, cache=full).ids == \
        lm.generate("hello world", max_new_tokens=10).ids
    half = task.cache(params, const, (4, 2), (6, 4), batch=1, capacity=16).layers[0]
    assert isinstance(half, LatentKV) and half.ck.shape[-1] == 4 and half.cv.shape[-1] == 6
    with pytest.raises(ValueError, match=r"ranks_k must hold 2 ranks in \[1, 8\]"):
        task.cache(params, const, (4, 9), (4, 4), 1, 16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model's MatryoshkaKV trained 40 steps with the paper's loss and with KL only."""
    lm = tiny_lm(0)
    cfg = TrainConfig(steps=40, batch_size=4, seq_len=32, lr=1e-2, warmup=2)
    text = corpus(tmp_path_factory.mktemp("corpus") / "c.txt")
    batches = token_batches(load_tokens(text, lm.tokenizer), cfg.seq_len, cfg.batch_size, cfg.seed)
    out = {}
    for kl_weight in (0.25, 1.0):
        task = MatryoshkaTask(lm.cfg, "tiny-0", n_levels=4, kl_weight=kl_weight, ce_weight=1 - kl_weight)
        state = init_state(task, lm.params, batches[0], cfg)
        initial = jax.tree_util.tree_map(jnp.copy, state)  # the step donates its input
        step = jit_train_step(task, cfg)
        for s in range(cfg.steps):
            state, _ = step(state, lm.params, jnp.asarray(batches[s]))
        out[kl_weight] = (task, initial, state)
    return lm, batches[10 ** 6], out  # a batch the training never saw


def objective(task, state, lm, tokens, rank):
    x, y = jnp.asarray(tokens)[:, :-1], jnp.asarray(tokens)[:, 1:]
    student = task.student_logits(state.params, state.const, lm.params, x, rank, rank)
    kl = kl_divergence(task.teacher_logits(lm.params, x), student)
    return float(task.kl_weight * kl + task.ce_weight * cross_entropy(student, y))


@pytest.mark.parametrize("kl_weight", [0.25, 1.0])
def test_training_lowers_the_held_out_loss_at_every_truncated_rank(trained, kl_weight):
    lm, held_out, runs = trained
    task, initial, final = runs[kl_weight]
    for rank in (2, 4, 6):
        before, after = objective(task, initial, lm, held_out, rank), objective(task, final, lm, held_out, rank)
        assert after < before - 0.004, (rank, before, after)
    assert objective(task, final, lm, held_out, 8) == pytest.approx(objective(task, initial, lm, held_out, 8),
                                                                    abs=1e-4)  # full rank: still the model
    u = task.bases(final.params, final.const)[0]
    np.testing.assert_allclose(u @ jnp.swapaxes(u, -1, -2), np.broadcast_to(np.eye(8), u.shape), atol=1e-5)


def test_rank_search_meets_the_budget(trained):
    lm, held_out, runs = trained
    task, _, state = runs[1.0]
    found = {}
    for fraction in (1.0, 0.5, 0.25):
        ranks_k, ranks_v, kl = task.search_ranks(state.params, state.const, lm.params, held_out, fraction)
        assert all(r in (2, 4, 6, 8) for r in ranks_k + ranks_v)
        assert sum(ranks_k) + sum(ranks_v) == fraction * 2 * 2 * 8  # budgets on the level grid: met exactly
        found[fraction] = kl
        if fraction == 0.5:  # the cache really is half the K/V bytes
            cache = task.cache(state.params, state.const, ranks_k, ranks_v, batch=1, capacity=64)
            kv = sum(tree_nbytes((layer.ck, layer.cv)) for layer in cache.layers)
            assert kv == 0.5 * 2 * 2 * 2 * 64 * 8 * 4
    assert found[1.0] == pytest.approx(0, abs=1e-6) and found[1.0] < found[0.5] < found[0.25]
    with pytest.raises(ValueError, match=r"cache fraction must be in \[1/4, 1\]"):
        task.search_ranks(state.params, state.const, lm.params, held_out, 0.2)


def test_generate_loads_a_trained_run(tmp_path):
    """`method="matryoshka", checkpoint=DIR, ratio=r`: uniform rank (1 - r)·D from the newest checkpoint,
    the same cache `MatryoshkaTask.cache` builds; ratio 0 is the model itself."""
    from kvjax.train import train

    lm = tiny_lm(0)
    task = MatryoshkaTask(lm.cfg, "tiny-0", n_levels=4)
    batches = [np.stack([random_ids(17, i) for i in range(4)]).astype(np.int32)] * 3
    state = train(task, lm.params, batches, TrainConfig(steps=2, batch_size=4, seq_len=16, lr=1e-2), tmp_path / "run",
                  progress=False).state
    ids = random_ids(100, 3).tolist()
    full = lm.generate(ids, max_new_tokens=6)
    assert lm.generate(ids, max_new_tokens=6, method="matryoshka", checkpoint=tmp_path / "run", ratio=0.0).ids == full.ids
    half = lm.generate(ids, max_new_tokens=6, method="matryoshka", checkpoint=tmp_path / "run", ratio=0.5)
    assert all(isinstance(layer, LatentKV) and layer.ck.shape[-1] == 4 for layer in half.cache.layers)
    cache = task.cache(state.params, state.const, (4, 4), (4, 4), 1, 128)
    assert lm.generate(ids, max_new_tokens=6, cache=cache).ids == half.ids
    with pytest.raises(ValueError, match="give ratio="):
        lm.generate(ids, method="matryoshka", checkpoint=tmp_path / "run", budget=10)
    quantized = lm.generate(ids, max_new_tokens=6, method="matryoshka", checkpoint=tmp_path / "run", ratio=0.5,
                            quant="int8")  # the projections stored quantized (`LatentKV.quantize`)
    assert all(isinstance(layer, LatentKV) and isinstance(layer.store, QuantKV) for layer in quantized.cache.layers)
    assert quantized.cache_bytes < half.cache_bytes
    with pytest.raises(ValueError, match="matryoshka needs trained projections"):
        lm.generate(ids, method="matryoshka", ratio=0.5)
