"""Layers sharing one state (`KVCache.share`): the seam cross-layer methods (CLA, MiniCache, KVSharer,
CLLA) build on. A toy plan in which layers 2k and 2k+1 share: bytes are halved, and the logits equal an
independent numpy model in which layer 2k+1 attends to the keys and values layer 2k computed."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import generation, pipeline
from kvjax.compress import compress, resolve_keep
from kvjax.states import KVCache, init_cache, tree_nbytes
from numpy_llama import forward
from test_checkpoints import LLAMA, random_hf_weights, write_hf_dir

HF = {**LLAMA, "num_hidden_layers": 4, "rope_scaling": None}
PAIRS = (0, 0, 1, 1)  # layers 2k and 2k+1 read state k


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    weights = random_hf_weights(HF, seed=3)
    lm = kvjax.load(str(write_hf_dir(tmp_path_factory.mktemp("cla"), HF, weights)), dtype="float32")
    return lm, weights


def shared_cache(lm, batch, capacity, share=PAIRS) -> KVCache:
    c = lm.cfg
    return init_cache(c.n_layers, batch, c.n_kv_heads, capacity, c.head_dim, c.jnp_dtype, share=share)


def test_shared_states_halve_the_bytes_and_count_once(model):
    lm, _ = model
    full, shared = shared_cache(lm, 2, 64, None), shared_cache(lm, 2, 64)
    assert len(shared.layers) == 2 and [shared.writes(i) for i in range(4)] == [True, False, True, False]
    assert tree_nbytes(shared.layers) * 2 == tree_nbytes(full.layers)
    assert kvjax.cache_nbytes(shared) == tree_nbytes(shared.layers) + tree_nbytes(shared.next_pos)


def test_shared_prefill_logits_equal_a_model_reusing_the_producers_kv(model):
    lm, weights = model
    ids = np.random.default_rng(0).integers(0, lm.cfg.vocab_size, 21)
    cache = shared_cache(lm, 1, 32)
    logits, cache, _ = generation.prefill(lm.params, lm.cfg, ids[None].astype(np.int32), np.array([21]), cache,
                                          all_logits=True)
    want = forward(weights, HF, ids, share=PAIRS)
    np.testing.assert_allclose(np.asarray(logits)[0, :21], want, atol=2e-4, rtol=1e-4)
    assert not np.allclose(want, forward(weights, HF, ids), atol=1e-2)  # sharing changes the model
    assert [int(s.length[0]) for s in cache.layers] == [21, 21]  # each state holds the prompt once


def test_shared_decode_steps_continue_the_prefill(model):
    # prefill 12 tokens, then feed 5 one at a time through the decode path: logits at every step equal
    # the full-sequence reference (the consumer layers read the producer's newly appended token too)
    lm, weights = model
    ids = np.random.default_rng(1).integers(0, lm.cfg.vocab_size, 17)
    cache = shared_cache(lm, 1, 32)
    _, cache, _ = generation.prefill(lm.params, lm.cfg, ids[None, :12].astype(np.int32), np.array([12]), cache)
    model_fn = jax.jit(lambda p, tok, pos, c: kvjax.models.model_for(lm.cfg)(lm.cfg).apply({"params": p}, tok, pos, c))
    want = forward(weights, HF, ids, share=PAIRS)
    for t in range(12, 17):
        logits, cache = model_fn(lm.params, jnp.asarray([[ids[t]]], jnp.int32), cache.next_pos[:, None], cache)
        np.testing.assert_allclose(np.asarray(logits)[0, 0], want[t], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("share", [(0, 1), (0, 0, 2, 2), (1, 0, 0, 1)])
def test_bad_share_maps_are_refused(model, share):
    lm, _ = model
    with pytest.raises(ValueError, match="share"):
        shared_cache(lm, 1, 16, share)


def test_a_shared_state_is_compressed_and_quantized_once_by_its_producer(model):
    # PyramidKV budgets differ by layer: state k follows its producer layer 2k's budget
    lm, _ = model
    ids = np.random.default_rng(2).integers(0, lm.cfg.vocab_size, 40)
    method = kvjax.methods.PyramidKV(window=4, kernel=3)
    n_keep = resolve_keep(method, kvjax.methods.Budget(ratio=0.5), [40], lm.cfg.n_layers)  # [L, 1]
    assert len({int(n) for n in n_keep[:, 0]}) > 1
    _, cache, obs = generation.prefill(lm.params, lm.cfg, ids[None].astype(np.int32), np.array([40]),
                                       shared_cache(lm, 1, 64), observe=method.observations())
    capacities = tuple(int(n) for n in n_keep[:, 0])
    out = compress(cache, obs, jnp.asarray(n_keep), method=method, cfg=lm.cfg, capacities=capacities)
    assert out.share == PAIRS and len(out.layers) == 2
    assert [int(s.length[0]) for s in out.layers] == [int(n_keep[0, 0]), int(n_keep[2, 0])]
    quantized = pipeline.quantize_states(out, quantizer=kvjax.quantizers.get("int8(residual=4)"), tokens=capacities,
                                         room=0)
    assert [s.capacity for s in quantized.layers] == [-(-capacities[0] // 4) * 4, -(-capacities[2] // 4) * 4]
    assert kvjax.cache_nbytes(quantized) < kvjax.cache_nbytes(out)
