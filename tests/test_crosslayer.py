"""Cross-layer methods (issue 19): CLA by conversion (`cla`) and KVSharer (`kvsharer`), on tiny random models.

CLA and KVSharer logits equal the independent numpy model (`numpy_llama.forward(share=route)`) in which a
consumer layer attends to its producer's K/V; the routed forward (share map as data) equals the static
share; the KVSharer search accepts and rejects by the threshold on a hand-made case and on a real model;
plans round-trip through files; bad plans are one-line errors before any compile."""
from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import generation, methods, pipeline
from kvjax.cli import main
from kvjax.eval import runner
from kvjax.methods import kvsharer
from kvjax.methods.crosslayer import CLA
from kvjax.models.family import model_for
from kvjax.states.cache import model_cache, route_share
from kvjax.timing import compile_seconds
from numpy_llama import forward
from test_checkpoints import LLAMA, random_hf_weights, write_hf_dir

HF = {**LLAMA, "num_hidden_layers": 4, "rope_scaling": None}
SEARCH = dict(sentences=4, tokens=16, threshold=0.5, n_shared=2)  # a small calibration for the tiny model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    weights = random_hf_weights(HF, seed=3)
    path = write_hf_dir(tmp_path_factory.mktemp("crosslayer"), HF, weights)
    return kvjax.load(str(path), dtype="float32"), weights, path


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "kvjax_cache"))


def ids(seed: int, n: int = 21) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, HF["vocab_size"], n)


# ------------------------------------------------------------------------------------------------ CLA
@pytest.mark.parametrize("spec, n_layers, route", [
    ("cla", 4, (0, 1, 2, 2)),                                   # the deep half, pairs
    ("cla", 30, tuple(range(16)) + tuple(16 + 2 * (i // 2) for i in range(14))),  # 15 deep layers: 7 pairs
    ("cla(layers=all)", 4, (0, 0, 2, 2)),
    ("cla(group=3, layers=all, remainder=own)", 8, (0, 1, 2, 2, 2, 5, 5, 5)),
    ("cla(group=3, layers=all, remainder=short)", 8, (0, 0, 2, 2, 2, 5, 5, 5)),
    ("cla(group=2, layers=(1, 5))", 6, (0, 1, 1, 3, 3, 5)),
])
def test_cla_groups_read_their_lowest_layer(model, spec, n_layers, route):
    lm, _, _ = model
    assert methods.get(spec).route(lm.cfg.replace(n_layers=n_layers)) == route


def test_cla_logits_equal_a_numpy_model_whose_consumers_attend_the_producers_kv(model):
    lm, weights, _ = model
    x = ids(0)
    route = (0, 0, 2, 2)
    logits, cache = lm.prefill(x, method="cla(layers=all)", return_logits=True)
    want = forward(weights, HF, x, share=route)
    np.testing.assert_allclose(np.asarray(logits)[0], want[-1], atol=2e-4, rtol=1e-4)
    assert cache.share == (0, 0, 1, 1) and len(cache.layers) == 2
    # greedy decoding continues under the same sharing
    out = lm.generate(x, max_new_tokens=4, method="cla(layers=all)", stop_at_eos=False).ids
    seq = list(x)
    for _ in range(4):
        seq.append(int(np.argmax(forward(weights, HF, seq, share=route)[-1])))
    assert out == seq[len(x):]


def test_cla_bytes_are_real_and_compose_with_quantization_and_eviction(model):
    lm, _, _ = model
    x = ids(1, 40)
    full, cla = lm.prefill(x), lm.prefill(x, method="cla(layers=all)")
    kv = lambda c: kvjax.cache_nbytes(c) - c.next_pos.nbytes  # noqa: E731
    assert kv(cla) * 2 == kv(full)
    # the eval's byte count (abstract shapes) is what the prefill holds
    assert runner.cache_bytes(lm.cfg, runner.Config("cla(layers=all)"), 40) == kvjax.cache_nbytes(cla)
    quant = lm.prefill(x, method="compose(cla(layers=all), int8(residual=4))")
    assert quant.share == (0, 0, 1, 1) and kvjax.cache_nbytes(quant) < kvjax.cache_nbytes(cla)
    assert kvjax.cache_nbytes(lm.prefill(x, method="cla(layers=all)", quant="int8(residual=4)")) == \
        kvjax.cache_nbytes(quant)
    evicted = lm.prefill(x, method="cla(layers=all, press=snapkv(window=4))", ratio=0.5)
    assert [int(s.length[0]) for s in evicted.layers] == [20, 20] and evicted.share == (0, 0, 1, 1)
    assert runner.make_configs(["full", "cla", "snapkv"], ratios=[0.5]) == [
        runner.Config("full"), runner.Config("cla"), runner.Config("snapkv", ratio=0.5)]


def test_cla_names_round_trip(model):
    for spec in ("cla", "cla(group=3,layers=all,remainder=own)", "cla(press=snapkv,layers=(1, 4))"):
        obj = methods.get(spec)
        assert methods.get(methods.spec_of(obj)) == obj
    assert methods.get("cla(press=snapkv(window=4))").evictor() == methods.SnapKV(window=4)
    assert isinstance(methods.get("compose(cla, kivi-4)").method, CLA)


# ------------------------------------------------------------------------------------------- KVSharer
def test_routed_forward_equals_the_static_share_and_compiles_once(model):
    lm, weights, _ = model
    x = jnp.asarray(np.stack([ids(2, 16), ids(3, 16)]).astype(np.int32))
    before = kvsharer.routed_forward._cache_size()
    for route in ([0, 0, 2, 2], [0, 1, 1, 1], [0, 1, 2, 0], [0, 1, 2, 3]):
        hidden, _ = kvsharer.routed_forward(lm.params, x, jnp.asarray(route, jnp.int32), cfg=lm.cfg)
        cache = model_cache(lm.cfg, 2, 16, share=route_share(route))
        positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
        (logits, _), state = model_for(lm.cfg)(lm.cfg).apply({"params": lm.params}, x, positions, cache,
                                                             mutable=["hidden"])
        np.testing.assert_allclose(np.asarray(hidden), np.asarray(state["hidden"]["final"][0]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(logits[0]), forward(weights, HF, np.asarray(x[0]), share=route),
                                   atol=2e-4, rtol=1e-4)
    assert kvsharer.routed_forward._cache_size() == before + 1


def test_search_tries_dissimilar_pairs_first_and_accepts_by_the_threshold():
    # distances: (0,3) 5 > (1,3) 4 > (0,2) 3 > (2,3) 2 > (1,2) 1 > (0,1) 0.5; the similarity drops 0.04 per
    # shared layer, and 0.5 more when layer 2 reads another layer
    d = np.zeros((4, 4))
    for (i, j), v in {(0, 3): 5, (1, 3): 4, (0, 2): 3, (2, 3): 2, (1, 2): 1, (0, 1): 0.5}.items():
        d[i, j] = d[j, i] = v

    def similarity(route):
        shared = sum(int(r != i) for i, r in enumerate(route))
        return 1 - 0.04 * shared - (0.5 if route[2] != 2 else 0)

    route, log = kvsharer.search(d, similarity, threshold=0.9, n_shared=2)
    assert route == [0, 0, 2, 0]
    assert [(e["pair"], e["accepted"]) for e in log] == [([0, 3], True), ([0, 2], False), ([1, 2], False),
                                                         ([0, 1], True)]
    route, log = kvsharer.search(d, similarity, threshold=0.9, n_shared=2, order="similar")
    assert route == [0, 0, 2, 2]  # (0,1) accepted, then (1,2) makes layer 2 read layer 0: rejected, then (2,3)
    assert [(e["pair"], e["accepted"]) for e in log] == [([0, 1], True), ([1, 2], False), ([2, 3], True)]
    assert kvsharer.search(d, similarity, threshold=0.99, n_shared=2)[0] == [0, 1, 2, 3]  # every pair rejected
    assert len(kvsharer.search(d, similarity, threshold=0.99, n_shared=2, max_tries=2)[1]) == 2


def test_kvsharer_searches_saves_and_reuses_its_plan(model, tmp_path):
    lm, weights, _ = model
    plan = kvsharer.calibrate(lm, **SEARCH)
    assert all(e["accepted"] == (e["cosine"] >= SEARCH["threshold"]) for e in plan["tried"])
    assert sum(r != i for i, r in enumerate(plan["route"])) == len(plan["shared_layers"]) <= 2
    kvsharer.save_plan(tmp_path / "plan.json", plan)
    method = f"kvsharer(plan={tmp_path / 'plan.json'})"
    assert methods.get(method).route(lm.cfg, lm.name) == tuple(plan["route"])
    x = ids(4)
    logits, cache = lm.prefill(x, method=method, return_logits=True)
    np.testing.assert_allclose(np.asarray(logits)[0], forward(weights, HF, x, share=plan["route"])[-1], atol=2e-4,
                               rtol=1e-4)
    assert len(cache.layers) == 4 - len(plan["shared_layers"])
    # without plan=: searched on first use with the same settings, cached under $KVJAX_CACHE, then read back
    spec = "kvsharer(" + ", ".join(f"{k}={v}" for k, v in SEARCH.items()) + ")"
    assert lm.prefill(x, method=spec).share == cache.share
    path = methods.get(spec).cached_path(lm.cfg, lm.name)
    assert json.loads(path.read_text())["route"] == plan["route"]


def test_kvsharer_cli_writes_a_plan_and_generates_with_it(model, tmp_path, capsys):
    _, _, path = model
    args = [a for k, v in SEARCH.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    assert main(["kvsharer", "--model", str(path), "--out", str(tmp_path / "p.json"), *args]) == 0
    assert main(["generate", "--model", str(path), "--plan", str(tmp_path / "p.json"), "--prompt", "hello world",
                 "--max-new-tokens", "3"]) == 0
    assert main(["generate", "--model", str(path), "--plan", str(tmp_path / "p.json"), "--method", "snapkv",
                 "--ratio", "0.5", "--prompt", "hi"]) == 2
    assert "--plan gives KVSharer its share plan" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("route, message", [
    ([0, 1, 2, 7], "layer 3 reads layer 7, which does not exist"),
    ([0, 2, 2, 3], "layer 1 reads layer 2, a consumer before its producer"),
    ([0, 0, 1, 3], "layer 2 reads layer 1, which itself reads layer 0"),
    ([0, 1, 2], "maps 3 layers, the model has 4"),
])
def test_bad_plans_are_one_line_errors_before_any_compile(model, tmp_path, route, message):
    lm, _, _ = model
    (tmp_path / "bad.json").write_text(json.dumps({"route": route}))
    c0 = compile_seconds()
    with pytest.raises(ValueError, match=message) as e:
        lm.generate(ids(5), max_new_tokens=2, method=f"kvsharer(plan={tmp_path / 'bad.json'})")
    assert "\n" not in str(e.value) and compile_seconds() == c0


@pytest.mark.parametrize("spec, message", [
    ("cla(group=3, layers=all)", "group=3 does not divide the 4 layers 0..3; give remainder=own"),
    ("cla(layers=(2, 9))", r"layers=\(2, 9\) names layers that do not exist"),
    ("cla(group=4)", "the deep half of 4 layers holds no group of 4"),
    ("cla(remainder=last)", "remainder must be one of"),
    ("cla(press=locret)", "press= takes a score method"),
    ("kvsharer(order=random)", "order must be one of"),
    ("kvsharer(n_shared=4)", "n_shared=4, the model has 4 layers"),
    ("kvsharer(max_tries=-1)", "max_tries must be an integer >= 0"),
])
def test_bad_cla_and_kvsharer_settings(model, spec, message):
    lm, _, _ = model
    c0 = compile_seconds()
    with pytest.raises(ValueError, match=message) as e:
        lm.prefill(ids(6), method=spec)
    assert "\n" not in str(e.value) and compile_seconds() == c0


def test_cla_without_a_press_takes_no_budget_and_no_given_cache(model):
    lm, _, _ = model
    with pytest.raises(ValueError, match="cla keeps every token"):
        lm.prefill(ids(7), method="cla", ratio=0.5)
    with pytest.raises(ValueError, match="not dense in every layer"):
        pipeline.plan(SimpleNamespace(n_layers=4, kv_layout="mla"), [8], "cla")
    cache = lm.prefill(ids(7))
    with pytest.raises(ValueError, match="shares layers from the first token"):
        lm.generate(ids(8), cache=cache, method="cla")
