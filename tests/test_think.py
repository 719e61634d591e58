"""ThinK (arXiv 2407.21018): channel scores by hand, real bytes saved, composition after SnapKV."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import kvjax.testing
from kvjax import methods
from kvjax.methods import Compose, SnapKV
from kvjax.methods.think import ThinK, channel_scores, kept_channels
from kvjax.states import ChannelKV, DenseKV, cache_nbytes


def test_channel_scores_by_hand():
    """One KV head, G = 2 query heads, D = 3, a window of 2 queries (plus one padding slot), 3 keys
    (the third slot unused).

    Query head 0: rows (3, 0, 1), (4, 0, 0) -> column norms (5, 0, 1).
    Query head 1: rows (0, 1, 0), (0, 0, 0) -> column norms (0, 1, 0); summed over the group: (5, 1, 1).
    Keys: (1, 2, 2), (0, 0, 1), unused (9, 9, 9) -> column norms (1, 2, sqrt 5).
    Scores (5 * 1, 1 * 2, 1 * sqrt 5) = (5, 2, 2.236): with one channel kept, channel 0; with two, 0 and 2.
    """
    q = np.zeros((1, 3, 2, 3), np.float32)  # [B, W, H, D]; window slot 0 is padding (position -1)
    q[0, 0] = 100.0
    q[0, 1, 0], q[0, 2, 0] = (3, 0, 1), (4, 0, 0)
    q[0, 1, 1] = (0, 1, 0)
    win_pos = jnp.asarray([[-1, 0, 1]], jnp.int32)
    k = np.asarray([[[[1, 2, 2], [0, 0, 1], [9, 9, 9]]]], np.float32)  # [B, K, S, D]
    scores = channel_scores(jnp.asarray(q), win_pos, jnp.asarray(k), jnp.asarray([2]), n_kv=1)
    np.testing.assert_allclose(np.asarray(scores)[0, 0], [5.0, 2.0, np.sqrt(5.0)], rtol=1e-6)
    assert np.asarray(kept_channels(scores, 1)).tolist() == [[[0]]]
    assert np.asarray(kept_channels(scores, 2)).tolist() == [[[0, 2]]]


def test_specs_compose_after_a_token_method():
    want = ThinK(press=SnapKV(window=16), key_ratio=0.25)
    assert methods.get("compose(snapkv(window=16), think(key_ratio=0.25))") == Compose(parts=(want,))
    assert methods.get("think(key_ratio=0.25):snapkv(window=16)") == want
    assert methods.spec_of(want) == "think(key_ratio=0.25):snapkv(window=16)"
    token, quant = methods.split("compose(snapkv, think, kivi-4)")
    assert token == ThinK(press=SnapKV()) and quant.bits == 4
    with pytest.raises(ValueError, match="think follows a token method"):
        methods.get("compose(think, snapkv)")
    with pytest.raises(ValueError, match="key_ratio must be in"):
        methods.get("think(key_ratio=1.5):snapkv")
    with pytest.raises(ValueError, match="think: wraps a plain scorer"):  # Ada-KV's pools are not dense rows
        methods.get("compose(adakv:snapkv, think)")


@pytest.fixture(scope="module")
def tiny():
    return kvjax.testing.tiny_lm(seed=0)


def _prompt(lm, n=48):
    return np.random.default_rng(0).integers(0, lm.cfg.vocab_size, n).tolist()


def test_keys_stored_in_fewer_channels_real_bytes(tiny):
    """compose(snapkv, think(key_ratio=0.5)) keeps SnapKV's tokens and half of each head's key channels:
    the cache is smaller by exactly the pruned key channels, minus the channel indices it stores."""
    cfg, ids = tiny.cfg, _prompt(tiny)
    snap = tiny.prefill(ids, method="snapkv(window=8)", ratio=0.5)
    think = tiny.prefill(ids, method="compose(snapkv(window=8), think(key_ratio=0.5, window=8))", ratio=0.5)
    layer = think.layers[0]
    assert isinstance(layer, ChannelKV) and layer.store.k.shape[-1] == cfg.head_dim // 2
    s = layer.capacity
    pruned = cfg.n_layers * cfg.n_kv_heads * s * (cfg.head_dim // 2) * 4  # float32 key channels gone
    indices = cfg.n_layers * cfg.n_kv_heads * (cfg.head_dim // 2) * 4  # int32 channel ids held
    assert cache_nbytes(snap) - cache_nbytes(think) == pruned - indices
    for a, b in zip(snap.layers, think.layers):  # the same tokens were kept
        np.testing.assert_array_equal(np.asarray(a.pos), np.asarray(b.store.pos))


def test_nothing_pruned_decodes_exactly_like_the_token_method(tiny):
    ids = _prompt(tiny)
    a = tiny.generate(ids, max_new_tokens=6, stop_at_eos=False, method="snapkv(window=8)", ratio=0.5)
    b = tiny.generate(ids, max_new_tokens=6, stop_at_eos=False,
                      method="compose(snapkv(window=8), think(key_ratio=0.0, window=8))", ratio=0.5)
    assert a.ids == b.ids


def test_pruned_keys_attend_as_masked_keys_after_quantization(tiny):
    """think, then int8: a `ChannelKV` over a quantized store; decoding on top runs and the channels
    chosen are the same as without the quantizer."""
    ids = _prompt(tiny)
    spec = "compose(snapkv(window=8), think(key_ratio=0.5, window=8), int8(residual=2))"
    cache = tiny.prefill(ids, method=spec, ratio=0.5)
    plain = tiny.prefill(ids, method="compose(snapkv(window=8), think(key_ratio=0.5, window=8))", ratio=0.5)
    assert not isinstance(cache.layers[0].store, DenseKV)
    np.testing.assert_array_equal(np.asarray(cache.layers[1].channels), np.asarray(plain.layers[1].channels))
    out = tiny.generate(ids, max_new_tokens=4, stop_at_eos=False, method=spec, ratio=0.5)
    assert len(out.ids) == 4
