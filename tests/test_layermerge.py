"""MiniCache (`minicache`) and xKV (`xkv`), issue 19: groups of layers merged into one state each
(`kvjax.states.merged`), on tiny random models.

The SLERP / magnitude math on a hand-computed pair; both retention rules on hand-made distances; a member's
attention over its rebuilt K/V against numpy; decoding equal to the full model where the merge is lossless
(MiniCache retaining every token, xKV at full rank); bytes equal to the abstract shapes the eval counts; the
composition with a quantizer; bad groups refused in one line before any compile."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import methods
from kvjax.eval import runner
from kvjax.methods.minicache import retained_fraction
from kvjax.models.family import model_for
from kvjax.states import DenseKV, EMPTY_POS
from kvjax.states.merged import SharedBasisKV, SlerpKV, factor_group, merge_pair, slerp
from kvjax.timing import compile_seconds
from numpy_llama import forward
from test_checkpoints import LLAMA, random_hf_weights, write_hf_dir

HF = {**LLAMA, "num_hidden_layers": 4, "rope_scaling": None}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    weights = random_hf_weights(HF, seed=3)
    return kvjax.load(str(write_hf_dir(tmp_path_factory.mktemp("merge"), HF, weights)), dtype="float32"), weights


def ids(seed: int, n: int = 21) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, HF["vocab_size"], n)


def dense(k, v, length=None) -> DenseKV:
    b, n_kv, s, _ = k.shape
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, n_kv, s))
    return DenseKV(k=jnp.asarray(k, jnp.float32), v=jnp.asarray(v, jnp.float32), pos=jnp.asarray(pos),
                   length=jnp.full((b,), s if length is None else length, jnp.int32))


# ------------------------------------------------------------------------------------------- MiniCache math
def test_slerp_of_a_hand_computed_pair():
    # a = 2 e1, b = 3 e2: W = pi/2, distance 1/2, direction sin(0.4 W) e1 + sin(0.6 W) e2 (t = 0.6 towards b)
    e, na, nb, d = slerp(jnp.array([2.0, 0.0]), jnp.array([0.0, 3.0]), 0.6)
    np.testing.assert_allclose(e, [np.sin(0.2 * np.pi), np.sin(0.3 * np.pi)], atol=1e-6)
    assert float(na) == 2 and float(nb) == 3 and abs(float(d) - 0.5) < 1e-6
    # parallel vectors: the direction itself, distance 0 (the W -> 0 limit, no division by sin 0)
    e, _, _, d = slerp(jnp.array([1.0, 1.0]), jnp.array([2.0, 2.0]), 0.6)
    np.testing.assert_allclose(e, [2 ** -0.5] * 2, atol=1e-6) and abs(float(d)) < 1e-3


def pair_with_distances():
    """One row, one head, 10 tokens in 2 dims: layer b equals layer a except token 3 (orthogonal, distance 1/2)
    and token 7 (opposite, distance 1); keys and values alike."""
    rng = np.random.default_rng(0)
    ang = rng.uniform(0, 2 * np.pi, 10)
    a = np.stack([np.cos(ang), np.sin(ang)], -1) * rng.uniform(1, 2, (10, 1))
    b = a * 1.5
    b[3] = np.array([-a[3, 1], a[3, 0]])
    b[7] = -a[7]
    return dense(a[None, None], a[None, None]), dense(b[None, None], b[None, None])


@pytest.mark.parametrize("rule, want", [("distinct", {7, 3}), ("threshold", None)])
def test_retention_rules(rule, want):
    a, b = pair_with_distances()
    state = merge_pair(a, b, t=0.6, gamma=0.2, rule=rule, tail=0)  # R = ceil(0.2 * 10) = 2 slots
    kept = set(np.asarray(state.kept[0].pos)[0, 0][np.asarray(state.kept[0].pos)[0, 0] != EMPTY_POS].tolist())
    if rule == "distinct":  # the 2 most distant tokens
        assert kept == want
    else:  # eq. 5: distance < 0 + (1 - 0) * 0.2: the 8 identical tokens qualify, 2 (the cap) are retained
        assert len(kept) == 2 and not kept & {3, 7}
    assert int(state.retained()[0, 0]) == 2
    # retained tokens are held exactly for both layers and hidden in the merged store
    for j, src in enumerate((a, b)):
        for slot, p in enumerate(np.asarray(state.kept[j].pos)[0, 0]):
            np.testing.assert_allclose(state.kept[j].k[0, 0, slot], src.k[0, 0, p], atol=1e-6)
    assert (np.asarray(state.store.pos)[0, 0][sorted(kept)] == EMPTY_POS).all()


def np_attention(q, k, v):
    """q [H, D] at the last position over k, v [K, S, D] (all visible), GQA."""
    g = q.shape[0] // k.shape[0]
    out = []
    for h in range(q.shape[0]):
        s = k[h // g] @ q[h] / np.sqrt(q.shape[1])
        p = np.exp(s - s.max())
        out.append((p / p.sum()) @ v[h // g])
    return np.stack(out)


@pytest.mark.parametrize("gamma", [0.0, 0.25])
def test_a_member_attends_to_its_magnitudes_times_the_merged_direction(gamma):
    rng = np.random.default_rng(1)
    ka, va, kb, vb = (rng.normal(size=(1, 2, 12, 8)) for _ in range(4))
    state = merge_pair(dense(ka, va), dense(kb, vb), t=0.6, gamma=gamma, rule="distinct", tail=0)
    q = rng.normal(size=(1, 1, 4, 8)).astype(np.float32)
    kept = np.asarray(state.kept[0].pos)[0]  # [K, R]
    for j, (k, v) in enumerate(((ka, va), (kb, vb))):
        out = state.reading(j).attend(jnp.asarray(q), jnp.full((1, 1), 20, jnp.int32))
        dk, _, _, _ = slerp(jnp.asarray(ka), jnp.asarray(kb), 0.6)
        dv, _, _, _ = slerp(jnp.asarray(va), jnp.asarray(vb), 0.6)
        rk = np.asarray(dk)[0] * np.linalg.norm(k[0], axis=-1, keepdims=True)
        rv = np.asarray(dv)[0] * np.linalg.norm(v[0], axis=-1, keepdims=True)
        for h in range(2):  # retained tokens: exact
            for p in kept[h][kept[h] != EMPTY_POS]:
                rk[h, p], rv[h, p] = k[0, h, p], v[0, h, p]
        np.testing.assert_allclose(np.asarray(out)[0, 0], np_attention(q[0, 0], rk, rv), atol=2e-5)
    if gamma:
        assert (kept != EMPTY_POS).sum() == 2 * 3  # ceil(0.25 * 12) per head


# ----------------------------------------------------------------------------------------- xKV math
def test_low_rank_group_rebuilds_exactly_at_full_rank_and_rope_is_reapplied():
    rng = np.random.default_rng(2)
    inv = tuple(1.0 / 10000 ** (np.arange(0, 8, 2) / 8))
    from kvjax.models.rope import apply_rope
    pre = [rng.normal(size=(1, 12, 2, 8)).astype(np.float32) for _ in range(2)]
    pos = jnp.arange(12)[None, :, None]
    states = [dense(np.asarray(apply_rope(jnp.asarray(k), pos, jnp.asarray(inv))).transpose(0, 2, 1, 3),
                    rng.normal(size=(1, 2, 12, 8))) for k in pre]
    full = factor_group(states, inv, rank_k=32, rank_v=32, tail=0)  # G K D = 2 * 2 * 8 = 32
    for j in range(2):
        k, v, _ = full.rebuild(j, full.store.k, full.store.v, full.store.pos)
        np.testing.assert_allclose(k, states[j].k, atol=1e-4)
        np.testing.assert_allclose(v, states[j].v, atol=1e-4)
    # rank r: the best rank-r fit of the group's pre-RoPE keys (Eckart-Young): the error is the tail singular values
    low = factor_group(states, inv, rank_k=4, rank_v=4, tail=0)
    x = np.concatenate([p.reshape(12, 16) for p in pre], -1)
    s = np.linalg.svd(x, compute_uv=False)
    k0, _, _ = low.rebuild(0, low.store.k, low.store.v, low.store.pos)
    k1, _, _ = low.rebuild(1, low.store.k, low.store.v, low.store.pos)
    err = sum(float(np.sum((np.asarray(apply_rope(jnp.asarray(kk).transpose(0, 2, 1, 3), -pos, jnp.asarray(inv)))
                            - p) ** 2)) for kk, p in zip((k0, k1), pre))
    np.testing.assert_allclose(err, np.sum(s[4:] ** 2), rtol=1e-3)
    assert low.store.k.shape == (1, 1, 12, 4) and low.basis_k.shape == (2, 1, 4, 16)


# -------------------------------------------------------------------------------------------- on a model
def decode_logits(lm, method, x, n_prompt):
    """Logits of x[n_prompt:] fed one at a time after a prefill of x[:n_prompt] under `method`."""
    cache = lm.prefill(x[:n_prompt], method=method)
    cache = cache.with_room(len(x) - n_prompt, lambda c: c)
    step = jax.jit(lambda p, tok, pos, c: model_for(lm.cfg)(lm.cfg).apply({"params": p}, tok, pos, c))
    out = []
    for t in range(n_prompt, len(x)):
        logits, cache = step(lm.params, jnp.asarray([[x[t]]], jnp.int32), cache.next_pos[:, None], cache)
        out.append(np.asarray(logits)[0, 0])
    return np.stack(out), cache


@pytest.mark.parametrize("method", ["minicache(gamma=1.0)", "xkv(group=2, rank_k=32, rank_v=32)"])
def test_lossless_settings_decode_as_the_full_model(model, method):
    lm, weights = model
    x = ids(0, 24)
    got, cache = decode_logits(lm, method, x, 18)
    want = forward(weights, HF, x)[18:]
    np.testing.assert_allclose(got, want, atol=5e-4, rtol=1e-3)
    # the merged states hold the prompt once per group; decode tokens went to each member's own tail
    merged = [s for s in cache.layers if isinstance(s, (SlerpKV, SharedBasisKV))]
    assert merged and all(int(t.length[0]) == 6 for s in merged for t in s.tails)


def test_minicache_merges_the_upper_half_in_pairs_and_logs_what_it_retains(model):
    lm, _ = model
    x = ids(1, 40)
    cache = lm.prefill(x, method="minicache")
    assert cache.share == (0, 1, 2, 2) and isinstance(cache.layers[2], SlerpKV)
    assert retained_fraction(cache) == pytest.approx(2 / 40)  # ceil(0.05 * 40) per head, "distinct"
    threshold = lm.prefill(x, method="minicache(retention=threshold)")
    assert 0 < retained_fraction(threshold) <= 2 / 40
    assert methods.get("minicache").groups(30) == [(i, i + 1) for i in range(15, 29, 2)]


@pytest.mark.parametrize("method", ["minicache(retention=threshold)", "xkv",
                                    "compose(minicache, kivi-4(group=8, residual=8))",
                                    "compose(xkv(group=2, rank_k=8, rank_v=8), kivi-4(group=8, residual=8))"])
def test_bytes_are_what_the_eval_counts(model, method):
    lm, _ = model
    x = ids(2, 40)
    cache = lm.prefill(x, method=method)
    assert kvjax.cache_nbytes(cache) == runner.cache_bytes(lm.cfg, runner.Config(method), 40)
    assert runner.make_configs([method], ratios=[0.5]) == [runner.Config(method)]  # no ratio: every token kept
    # (attention over quantized decode tails: tests/test_states_table.py, the SlerpKV / SharedBasisKV rows)


def test_what_the_states_hold(model):
    lm, _ = model
    x = ids(3, 40)
    full = kvjax.cache_nbytes(lm.prefill(x)) // 4  # 4 layers, each K/V 2 x 40 x 2 heads x 8 + positions + length
    c = lm.prefill(x, method="xkv(group=2, rank_k=8, rank_v=16)")
    s = c.layers[0]
    # per group: coefficients 40 x (8 + 16), positions 40, length; bases 2 layers x (8 + 16) x 16; 2 empty tails
    # (their lengths)
    assert s.nbytes() == 4 * (40 * 24 + 40 + 1 + 2 * 24 * 16 + 2)
    m = lm.prefill(x, method="minicache")
    pair = m.layers[2]
    # directions 2 x 40 x 2 x 8, positions, length; magnitudes 2 members x 2 x 2 x 40; retained 2 x (2 x 2 x 2 x 8
    # + positions 2 x 2 + length); 2 empty tails (their lengths)
    assert pair.nbytes() == 4 * (2 * 40 * 16 + 80 + 1 + 2 * 2 * 80 + 2 * (2 * 2 * 2 * 8 + 4 + 1) + 2)
    assert pair.nbytes() < 2 * full
    quant = lm.prefill(x, method="compose(minicache, kivi-4(group=8, residual=8))")
    assert kvjax.cache_nbytes(quant) < kvjax.cache_nbytes(m)
    assert type(quant.layers[2].store).__name__ == "QuantKV"


@pytest.mark.parametrize("spec, n_layers, match", [
    ("xkv(group=3, remainder=None)", 4, "group=3 does not divide the 4 layers"),
    ("xkv(group=8)", 4, "more than the model's 4 layers"),
    ("minicache(start=3)", 4, "leaves no pair"),
])
def test_bad_groups_are_one_line_errors_before_any_compile(model, spec, n_layers, match):
    lm, _ = model
    before = compile_seconds()
    with pytest.raises(ValueError, match=match) as err:
        lm.prefill(ids(0), method=spec)
    assert "\n" not in str(err.value) and compile_seconds() == before
    with pytest.raises(ValueError, match="keeps every token"):
        lm.prefill(ids(0), method="minicache", ratio=0.5)


def test_xkv_groups_and_names(model):
    assert methods.get("xkv").groups(30) == [tuple(range(i, i + 4)) for i in range(2, 30, 4)]
    assert methods.get("xkv(remainder=short)").groups(30)[0] == (0, 1)
    assert methods.get("xkv").ranks(3, 64, 4) == (96, 160)  # SmolLM2: G K D = 768 -> 768/8, 3*768/16 -> x32
    for spec in ("xkv(group=4, rank_k=48, rank_v=96)", "minicache(retention=threshold, gamma=0.1)"):
        assert methods.get(methods.spec_of(methods.get(spec))) == methods.get(spec)
