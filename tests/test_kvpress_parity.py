"""Parity with kvpress 0.5.5 on the real model: kvjax keeps the same token positions per layer and KV head.

Reference files come from `tests/golden/make_kvpress_reference.py` (kvpress 0.5.5, transformers, float32,
same SmolLM2 weights, a 998-token essay prompt, ratios 0.25 / 0.5 / 0.75). Where kvpress's scores at
the cut are (near-)tied, torch and XLA may break the tie differently: there a (layer, head) may differ
by at most two swapped positions; everywhere else the sets must be identical. KVzip (KVzipPress) has its
own prompt (the chat template's prefix + the essay) and one cut over all layers (`test_kvzip_...`).

The essay is prefilled once for the module, as the eval runner does it (`runner.shared_prefill`
recording `runner.union_spec` of every configuration below), and each (press, ratio) branches its
compression off that prefill (`runner.branch`); `test_fan_out_equals_lm_prefill` checks that a branch
is the cache `LM.prefill(ids, method=..., ratio=...)` builds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import kvjax
from kvjax import generation, pipeline
from kvjax.eval import runner
from kvjax.shapes import bucket
from kvjax.states.cache import model_cache

REF = Path(__file__).parent / "golden" / "smollm2-135m" / "kvpress"
PRESSES = {  # reference file -> kvjax method spec (or a function of the reference file and the ratio)
    "streaming_llm": "streaming_llm", "snapkv": "snapkv", "pyramidkv": "pyramidkv", "tova": "tova",
    "knorm": "knorm", "observed_attention": "observed_attention", "expected_attention": "expected_attention",
    "adakv_snapkv": "adakv:snapkv", "adakv_expected_attention": "adakv:expected_attention",
    "keydiff": "keydiff", "lagkv": "lagkv", "cur": "cur", "non_causal_attention": "non_causal_attention",
    "chunkkv_snapkv": "chunkkv:snapkv", "chunkkv_keydiff": "chunkkv:keydiff", "block_keydiff": "block:keydiff",
    "per_layer_snapkv": lambda ref, ratio: f"per_layer(ratios={tuple(map(float, ref[f'ratios_r{ratio}']))}):snapkv",
    "critical_snapkv": "critical:snapkv", "criticaladakv_snapkv": "criticaladakv:snapkv",
    "adakv_critical_snapkv": "adakv:critical:snapkv", "merging_snapkv": "merging:snapkv",
}
RATIOS = (25, 50, 75)
TIE = 1e-4  # score gap at the cut below which kvpress's choice is a tie-break
# rerotate=False: re-rotation moves the kept keys to positions 0..n-1 (so the kept positions would be lost);
# it changes no kept set (tested against recomputed RoPE in test_methods_breadth.py)
FINCH = {"finch": "finch(window={w}, rerotate=False)",
         "finch_c256": "finch(window={w}, chunk_length=256, rerotate=False)"}


def press_config(ref_name: str, ratio: int) -> runner.Config:
    """The eval runner's configuration of a kvpress reference at `ratio` percent (per_layer: the mean
    of its per-layer ratios)."""
    method = PRESSES[ref_name]
    if callable(method):
        method = method(np.load(REF / f"{ref_name}.npz"), ratio)
    token = kvjax.methods.get(method)
    return runner.Config(method, ratio=token.mean_ratio if hasattr(token, "mean_ratio") else ratio / 100)


def finch_spec(ref_name: str) -> str:
    return FINCH[ref_name].format(w=int(np.load(REF / f"{ref_name}.npz")["window"]))


def simlayerkv_spec() -> str:
    return f"simlayerkv(lazy_threshold={float(np.load(REF / 'simlayerkv.npz')['threshold'])}, n_recent=256)"


def dms_spec() -> str:
    return f"dms(threshold={float(np.load(REF / 'dms_knorm.npz')['threshold'])!r}):knorm"


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    meta = json.loads((REF / "prompt.json").read_text())
    assert smollm2.encode(meta["text"]) == meta["ids"]
    return meta["ids"]


@pytest.fixture(scope="module")
def lukv_spec(tmp_path_factory):
    """LUKVPress(ExpectedAttentionPress(epsilon=2e-2)) on the reference's (made-up) budget curve."""
    curve = tmp_path_factory.mktemp("lukv") / "curve.npy"
    np.save(curve, np.load(REF / "lukv_expected_attention.npz")["curve"])
    return f"lukv(curve={curve}):expected_attention(epsilon=0.02)"


@pytest.fixture(scope="module")
def shared(smollm2, prompt_ids, lukv_spec):
    """(cache, obs, spec): the essay prefilled once by the eval runner's shared prefill, recording the
    union of the observations of every configuration branched below (`runner.union_spec`)."""
    configs = [press_config(name, ratio) for name in PRESSES for ratio in RATIOS]
    configs += [runner.Config(spec, ratio=0.5) for spec in
                [finch_spec(name) for name in FINCH] + [simlayerkv_spec(), dms_spec(), lukv_spec]]
    spec = runner.union_spec(configs)
    _, cache, obs, _ = runner.shared_prefill(smollm2, [prompt_ids], bucket(len(prompt_ids)), spec)
    return cache, obs, spec


def compressed(smollm2, prompt_ids, shared, config: runner.Config):
    """The essay's cache compressed under `config`: a branch of the shared prefill, or (a method needing an
    observation the runner's union leaves out) its own `LM.prefill`."""
    cache, obs, spec = shared
    need = kvjax.methods.split(config.method)[0].observations()
    if need.wov and not spec.wov:  # `runner.union_spec` drops CriticalKV's `wov` (2026-12-08): prefill alone
        return smollm2.prefill(prompt_ids, method=config.method, ratio=config.ratio)
    return runner.branch(smollm2, cache, obs, config, len(prompt_ids), 0)


def test_fan_out_equals_lm_prefill(smollm2, prompt_ids, shared):
    # a branch of the shared prefill holds what LM.prefill(ids, method=, ratio=) holds: the same
    # positions, keys and values per layer and head
    config = runner.Config("snapkv", ratio=0.5)
    ours, alone = compressed(smollm2, prompt_ids, shared, config), smollm2.prefill(prompt_ids, method="snapkv",
                                                                                    ratio=0.5)
    for layer, (a, b) in enumerate(zip(ours.layers, alone.layers)):
        n = int(b.length[0])
        assert int(a.length[0]) == n, f"layer {layer}"
        np.testing.assert_array_equal(np.asarray(a.pos[..., :n]), np.asarray(b.pos[..., :n]), err_msg=f"layer {layer}")
        for x, y in ((a.k, b.k), (a.v, b.v)):
            np.testing.assert_allclose(np.asarray(x[:, :, :n]), np.asarray(y[:, :, :n]), rtol=1e-5, atol=1e-6,
                                       err_msg=f"layer {layer}")


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("ref_name", sorted(PRESSES))
def test_same_kept_positions_as_kvpress(smollm2, prompt_ids, shared, ref_name, ratio):
    ref = np.load(REF / f"{ref_name}.npz")
    cache = compressed(smollm2, prompt_ids, shared, press_config(ref_name, ratio))
    kept = kvjax.kept_positions(cache)
    gaps = ref[f"gap_r{ratio}"]  # [L, K] (AdaKV: [L] per layer, one global cut)
    for layer, ours_layer in enumerate(kept):
        expected = ref[f"kept_r{ratio}_layer{layer}"]
        for head in range(expected.shape[0]):
            theirs = set(expected[head][expected[head] >= 0].tolist())
            ours = ours_layer[head][0] if isinstance(ours_layer, list) else ours_layer[0, head]
            assert len(set(ours.tolist())) == len(ours), "duplicate positions kept"
            diff = len(theirs ^ set(ours.tolist()))
            gap = np.ravel(gaps[layer])[head if np.ndim(gaps[layer]) else 0]
            allowed = 4 if gap < TIE else 0
            assert diff <= allowed, f"layer {layer} head {head}: {diff} positions differ (gap at cut {gap:.2e})"


@pytest.mark.parametrize("ratio", RATIOS)
def test_merged_values_as_kvpress(smollm2, prompt_ids, shared, ratio):
    # MergingPress folds evicted values into kept ones: kvjax's merged values, projected as the reference
    # file projects kvpress's, on three layers (the kept sets are checked above). A kept row may differ
    # only where an evicted token is (near-)equally similar to two kept keys (cosine gap < 1e-5, float64
    # here): which of them receives it is a tie-break (duplicate tokens in layer 0).
    ref = np.load(REF / "merging_snapkv.npz")
    cache = compressed(smollm2, prompt_ids, shared, runner.Config("merging:snapkv", ratio=ratio / 100))
    full = shared[0]  # the uncompressed prefill
    t = len(prompt_ids)
    r = RATIOS.index(ratio)
    for a, layer in enumerate(ref["merged_layers"]):
        state = cache.layers[int(layer)]
        n = int(state.length[0])
        ours = np.asarray(state.v[0, :, :n], np.float32) @ ref["merge_proj"]
        bad = ~np.isclose(ours, ref["merged_proj"][a, r, :, :n], rtol=1e-3, atol=1e-3).all(-1)  # [K, n]
        for h in range(bad.shape[0]):
            if not bad[h].any():
                continue
            keys = np.asarray(full.layers[int(layer)].k[0, h, :t], np.float64)
            keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
            kept = np.asarray(state.pos[0, h, :n])
            evicted = np.setdiff1d(np.arange(t), kept)
            sim = keys[evicted] @ keys[kept].T
            top2 = np.sort(sim, -1)[:, -2:]
            near = top2[:, 1] - top2[:, 0] < 1e-5
            tied = set(np.argsort(-sim[near], -1)[:, :2].ravel().tolist())
            assert set(np.nonzero(bad[h])[0].tolist()) <= tied, f"layer {layer} head {h}: merged values differ"
            assert bad[h].sum() <= 4, f"layer {layer} head {h}: {bad[h].sum()} merged rows differ"



KVZIP = {"kvzip": "kvzip", "kvzip_c256": "kvzip(chunk_size=256)", "kvzip_layerwise": "kvzip(layerwise=True)"}
KVZIP_REPLAYS = (("kvzip", "kvzip_layerwise"), ("kvzip_c256",))  # references sharing one replay (chunk size)
KVZIP_TIE = 1e-5  # |kvpress score - cut| (attention probabilities) within which a pair may land on either side


@pytest.mark.parametrize("ref_names", KVZIP_REPLAYS, ids=lambda names: names[0])
def test_kvzip_keeps_the_pairs_kvpress_keeps(smollm2, ref_names):
    # KVzipPress on its own prompt (the chat template's prefix, then the essay): one prefill and one replay,
    # compressed at the three ratios by the eval runner's path (`pipeline.branch`). kvjax's reconstruction
    # scores equal kvpress's, and so do the kept (layer, head, position) sets, but for pairs scoring at the cut.
    refs = {name: np.load(REF / f"{name}.npz") for name in ref_names}
    first = refs[ref_names[0]]
    ids = first["ids"].tolist()
    text = json.loads((REF / "prompt.json").read_text())["text"]
    assert smollm2.encode(smollm2.tokenizer.chat_frame()[0] + text) == ids
    cfg, t = smollm2.cfg, len(ids)
    plan = lambda name, ratio: pipeline.plan(cfg, [t], KVZIP[name], ratio=ratio, tokenizer=smollm2.tokenizer)  # noqa: E731
    p = plan(ref_names[0], 0.5)
    assert p.replay.prefix == int(first["prefix"])
    tokens = np.asarray([ids + [0] * (bucket(t) - t)], np.int32)
    _, cache, _ = generation.prefill(smollm2.params, cfg, tokens, np.asarray([t]), model_cache(cfg, 1, bucket(t)))
    cache, obs = pipeline.replay(smollm2.params, cfg, p, cache, tokens, np.asarray([t]))
    ours = np.stack([np.asarray(p.method.importance(o.replay))[0, :, :t] for o in obs])  # [L, K, T]
    for name, ref in refs.items():
        theirs = ref["scores"]  # the sinks at kvpress's max + 1, ours at 2
        np.testing.assert_allclose(np.where(theirs > 1, 2.0, ours), np.where(theirs > 1, 2.0, theirs), atol=2e-6,
                                   rtol=1e-3)
        for ratio in RATIOS:
            kept = kvjax.kept_positions(pipeline.branch(cache, obs, cfg, plan(name, ratio / 100), 0))
            cut = ref[f"cut_r{ratio}"]
            differ = 0
            for layer, heads in enumerate(kept):
                expected = ref[f"kept_r{ratio}_layer{layer}"]
                c = cut[layer] if np.ndim(cut) else cut
                for h, ours_h in enumerate(heads):
                    diff = set(expected[h][expected[h] >= 0].tolist()) ^ set(ours_h[0].tolist())
                    assert all(abs(theirs[layer, h, i] - c) < KVZIP_TIE for i in diff), (name, layer, h, sorted(diff))
                    differ += len(diff)
            assert differ <= 8, f"{name} ratio {ratio}: {differ} pairs differ"


@pytest.mark.parametrize("ref_name", sorted(FINCH))
def test_finch_keeps_what_kvpress_keeps(smollm2, prompt_ids, shared, ref_name):
    # FinchPress with its delimiter before the essay's last 32 tokens = kvjax's finch(window=32) on the essay
    ref = np.load(REF / f"{ref_name}.npz")
    cache, obs, _ = shared
    for ratio in RATIOS:
        p = pipeline.plan(smollm2.cfg, [len(prompt_ids)], finch_spec(ref_name), ratio=ratio / 100)
        np.testing.assert_array_equal(p.n_keep[:, 0], ref[f"n_kept_r{ratio}"])
        kept = kvjax.kept_positions(pipeline.branch(cache, obs, smollm2.cfg, p, 0))
        for layer, heads in enumerate(kept):
            expected = ref[f"kept_r{ratio}_layer{layer}"]
            for h, ours in enumerate(heads[0]):
                diff = len(set(expected[h].tolist()) ^ set(ours.tolist()))
                gap = ref[f"gap_r{ratio}"][layer, h]
                assert diff <= (4 if gap < TIE else 0), f"{ref_name} r={ratio} layer {layer} head {h}: {diff} differ"


def test_simlayerkv_keeps_what_kvpress_keeps(smollm2, prompt_ids, shared):
    # SimLayerKVPress(lazy_threshold, n_recent=256): the same lazy layers (but where kvpress's attention
    # mass is within 1e-4 of the threshold), each keeping the 4 sinks and the last 255 tokens
    ref = np.load(REF / "simlayerkv.npz")
    cache, obs, _ = shared
    thr = float(ref["threshold"])
    p = pipeline.plan(smollm2.cfg, [len(prompt_ids)], simlayerkv_spec())
    kept = kvjax.kept_positions(pipeline.branch(cache, obs, smollm2.cfg, p, 0))
    assert ref["lazy"].any() and not ref["lazy"].all(), "the reference should hold lazy and busy layers"
    for layer, heads in enumerate(kept):
        if abs(float(ref["mass"][layer]) - thr) < TIE:
            continue
        np.testing.assert_array_equal(heads[0], ref[f"kept_layer{layer}"], err_msg=f"layer {layer}")


def test_dms_keeps_what_kvpress_keeps(smollm2, prompt_ids, shared):
    # DMSPress(KnormPress(), threshold = the median press-free score, sliding_window_size=128): per head,
    # the same positions (but where a score is within 1e-4 of the threshold), stored ragged
    ref = np.load(REF / "dms_knorm.npz")
    cache, obs, _ = shared
    p = pipeline.plan(smollm2.cfg, [len(prompt_ids)], dms_spec())
    kept = kvjax.kept_positions(pipeline.branch(cache, obs, smollm2.cfg, p, 0))
    for layer, heads in enumerate(kept):
        for h, ours in enumerate(heads):
            theirs = ref[f"kept_layer{layer}"][h]
            diff = len(set(theirs[theirs >= 0].tolist()) ^ set(ours[0].tolist()))
            assert diff <= (4 if ref["gap"][layer, h] < TIE else 0), f"layer {layer} head {h}: {diff} differ"


def test_lukv_keeps_what_kvpress_keeps(smollm2, prompt_ids, shared, lukv_spec):
    # LUKVPress(ExpectedAttentionPress(epsilon=2e-2)) on the reference's (made-up) budget curve: per head,
    # the same counts and positions but at near-ties of the scores
    ref = np.load(REF / "lukv_expected_attention.npz")
    cache, obs, _ = shared
    for ratio in RATIOS:
        p = pipeline.plan(smollm2.cfg, [len(prompt_ids)], lukv_spec, ratio=ratio / 100)
        for layer, heads in enumerate(kvjax.kept_positions(pipeline.branch(cache, obs, smollm2.cfg, p, 0))):
            np.testing.assert_array_equal([len(h[0]) for h in heads], ref[f"n_kept_r{ratio}"][layer])
            for h, ours in enumerate(heads):
                theirs = ref[f"kept_r{ratio}_layer{layer}"][h]
                diff = len(set(theirs[theirs >= 0].tolist()) ^ set(ours[0].tolist()))
                gap = ref[f"gap_r{ratio}"][layer, h]
                assert diff <= (4 if gap < TIE else 0), f"r={ratio} layer {layer} head {h}: {diff} differ"
