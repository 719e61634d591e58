"""Locret (`kvjax.states.locret`, `kvjax.methods.locret`, `kvjax.train.locret`) on hand-computable cases and
the tiny model: labels, loss, eviction between chunks, the chunked prefill against an independent
simulation, checkpoint loading, CLI and bad input."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import methods
from kvjax.cli import main
from kvjax.states import DenseKV, KVCache, cache_nbytes, kept_positions
from kvjax.states.locret import LocretKV, RetainingHead
from kvjax.models.config import LlamaConfig
from kvjax.models import model_for
from kvjax.testing import random_ids, tiny_lm
from kvjax.train import MatryoshkaTask, TrainConfig, train
from kvjax.train.locret import LocretTask, causal_importance, smooth_l1, top_overlap

CFG = TrainConfig(steps=4, batch_size=4, seq_len=32, lr=3e-3, warmup=1, save_every=2, log_every=1)


def rope_np(x, pos, inv_freq):  # x [T, D], pos [T]: rotate-half RoPE in numpy
    ang = pos[:, None] * inv_freq[None, :]
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


@dataclasses.dataclass(frozen=True)
class TwoBaseConfig(LlamaConfig):
    """Layer 1 rotates with base 500, the others with `rope_theta` (as Gemma 3's local/global layers)."""

    def rope_for(self, layer: int):
        return (500.0 if layer == 1 else self.rope_theta), self.rope_scaling


@pytest.mark.parametrize("layer", [0, 1])
def test_causal_importance_is_the_max_logit_from_response_queries_over_the_group(layer):
    cfg = TwoBaseConfig(**dataclasses.asdict(tiny_lm(0).cfg))  # 4 query heads, 2 KV heads, head dim 8
    h, kv, d, t, p = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 6, 4
    qkv = np.random.default_rng(0).normal(size=(1, t, (h + 2 * kv) * d)).astype(np.float32)
    got = np.asarray(causal_importance(jnp.asarray(qkv), cfg, p, layer))
    q = qkv[0, :, : h * d].reshape(t, h, d)
    k = qkv[0, :, h * d: (h + kv) * d].reshape(t, kv, d)
    inv, pos = 1.0 / ((500.0 if layer == 1 else cfg.rope_theta) ** (np.arange(0, d, 2) / d)), np.arange(t, dtype=np.float64)
    want = np.full((kv, p), -np.inf)
    for head in range(h):
        g = head // (h // kv)
        qr, kr = rope_np(q[:, head], pos, inv), rope_np(k[:, g], pos, inv)
        for i in range(p, t):  # response queries
            for j in range(p):  # labelled prefix keys
                want[g, j] = max(want[g, j], qr[i] @ kr[j] / np.sqrt(d))
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


def test_smooth_l1_and_top_overlap():
    np.testing.assert_allclose(smooth_l1(jnp.array([0.5, -2.0, 3.0, 0.0])), [0.125, 1.5, 2.5, 0.0])
    labels = jnp.array([[5.0, 1, 4, 0, 3, 2, 9, 8, 7, 6]])
    assert float(top_overlap(labels, labels, 0.2)) == 1.0
    assert float(top_overlap(-labels, labels, 0.2)) == 0.0
    assert float(top_overlap(jnp.array([[0.0, 0, 0, 0, 0, 0, 9, 0, 0, 1]]), labels, 0.2)) == 0.5


def unused_head(n_kv):  # the hand cases give scores directly (`append_scored`)
    return dict(fc1=dict(kernel=jnp.zeros((1, 4))), fc2=dict(kernel=jnp.zeros((4, n_kv))))


def scored_state(budget, stabilizers, capacity=8, n_kv=1, local=0):
    return LocretKV.init(1, n_kv, capacity, 2, jnp.float32, [budget], [stabilizers], [local], unused_head(n_kv))


def append(state, positions, scores):  # scores [T, K]
    t = len(positions)
    k = jnp.asarray(np.arange(t, dtype=np.float32)[None, None, :, None].repeat(state.store.k.shape[1], 1).repeat(2, 3))
    return state.append_scored(k, k, jnp.asarray([positions], jnp.int32), jnp.asarray([t], jnp.int32),
                               jnp.asarray(scores, jnp.float32)[None])


def kept(layer):
    pos, n = np.asarray(layer.positions()), int(layer.length[0])
    return pos[0, :, :n].tolist()


def test_eviction_between_chunks_keeps_top_scores_and_stabilizers_then_cuts_by_score():
    # budget 3, 1 stabilizer. Chunk 1: positions 0-3 with scores 5, 1, 3, 0.
    state = append(scored_state(3, 1), [0, 1, 2, 3], [[5], [1], [3], [0]])
    assert kept(state) == [[0, 1, 2, 3]]  # nothing is evicted before the next chunk arrives
    # Chunk 2 (scores 2, 9): first cut to 3 keeping the newest entry (pos 3, score 0): {0, 2, 3}
    state = append(state, [4, 5], [[2], [9]])
    assert kept(state) == [[0, 2, 3, 4, 5]]
    np.testing.assert_array_equal(np.asarray(state.score)[0, 0, :5], [5, 3, 0, 2, 9])  # stored, not recomputed
    final = state.finish(capacity=4)  # the last cut: scores alone (9, 5, 3)
    assert isinstance(final, DenseKV) and final.capacity == 4 and kept(final) == [[0, 2, 5]]
    with_tail = dataclasses.replace(state, local=jnp.asarray([2], jnp.int32)).finish(3)
    assert kept(with_tail) == [[0, 4, 5]]  # the last 2 tokens, then the best other score (5)


def test_each_kv_head_keeps_its_own_tokens():
    state = append(scored_state(2, 0, n_kv=2), [0, 1, 2, 3], [[1, 4], [2, 3], [3, 2], [4, 1]])
    assert kept(state.finish(2)) == [[2, 3], [0, 1]]


def test_a_row_without_new_tokens_gets_its_final_cut():
    # Two rows, budget 2, 1 stabilizer, no local tail; row 1 receives nothing in the second chunk: its
    # cut is by score alone (as `finish` would make it), so it no longer changes.
    state = LocretKV.init(2, 1, 8, 2, jnp.float32, [2, 2], [1, 1], [0, 0], unused_head(1))
    k = jnp.zeros((2, 1, 3, 2))
    scores = jnp.asarray([[[9.0], [1.0], [0.0]], [[9.0], [1.0], [0.0]]])
    state = state.append_scored(k, k, jnp.asarray([[0, 1, 2], [0, 1, 2]]), jnp.asarray([3, 3]), scores)
    state = state.append_scored(k[:, :, :1], k[:, :, :1], jnp.asarray([[3], [3]]), jnp.asarray([1, 0]),
                                jnp.asarray([[[5.0]], [[5.0]]]))
    pos, length = np.asarray(state.positions()), np.asarray(state.length)
    assert pos[0, 0, : length[0]].tolist() == [0, 2, 3]  # stabilizer (pos 2) kept, then the new token
    assert pos[1, 0, : length[1]].tolist() == [0, 1]  # scores 9 and 1


def test_append_without_scores_is_an_error():
    with pytest.raises(ValueError, match="retaining head"):
        scored_state(2, 0).append(None, None, None, None)


# ----------------------------------------------------------------------------- on the tiny model
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(lm, run dir, task, final params) after a few steps on random windows."""
    tmp = tmp_path_factory.mktemp("locret")
    lm = tiny_lm(0, max_positions=2048)
    task = LocretTask(lm.cfg, "tiny-0", hidden=16)
    batches = [np.stack([random_ids(CFG.seq_len + 1, 100 * s + i) for i in range(CFG.batch_size)]).astype(np.int32)
               for s in range(CFG.steps + 1)]
    result = train(task, lm.params, batches, CFG, tmp / "run", progress=False)
    return lm, tmp / "run", task, result.state.params


def test_training_fits_the_labels():
    lm = tiny_lm(0)
    task = LocretTask(lm.cfg, "tiny-0", hidden=32)
    tokens = np.stack([random_ids(33, i) for i in range(4)]).astype(np.int32)
    cfg = TrainConfig(steps=40, batch_size=4, seq_len=32, lr=1e-2, warmup=0, save_every=40, log_every=1)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        log = train(task, lm.params, [tokens] * 40, cfg, d, progress=False).log
    assert log[-1]["fit"] < 0.5 * log[0]["fit"] and log[-1]["top10"] > log[0]["top10"]


def simulate(lm, heads, ids, budget, stabilizers, local, chunk):
    """Locret Algorithm 1 written out independently: plain dense caches, features captured from the
    model, numpy top-k between chunks. Returns (last logits [V], kept positions per layer [K, n])."""
    cfg, n_layers = lm.cfg, lm.cfg.n_layers
    head = RetainingHead(heads["fc1"]["kernel"].shape[2], cfg.n_kv_heads)
    kept = [None] * n_layers  # per layer: dict(k, v [K, n, D], pos [K, n], score [K, n])
    logits = None
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        t = len(part)
        layers = []
        for c in kept:
            n = 0 if c is None else c["pos"].shape[1]
            pad = lambda x, fill=0: np.concatenate(  # noqa: E731
                [x, np.full((x.shape[0], t) + x.shape[2:], fill, x.dtype)], 1)
            base = c or dict(k=np.zeros((cfg.n_kv_heads, 0, cfg.head_dim), np.float32),
                             v=np.zeros((cfg.n_kv_heads, 0, cfg.head_dim), np.float32),
                             pos=np.zeros((cfg.n_kv_heads, 0), np.int32))
            layers.append(DenseKV(k=jnp.asarray(pad(base["k"]))[None], v=jnp.asarray(pad(base["v"]))[None],
                                  pos=jnp.asarray(pad(base["pos"], 2 ** 30))[None], length=jnp.asarray([n])))
        cache = KVCache(layers=tuple(layers), next_pos=jnp.asarray([start]))
        pos = jnp.arange(start, start + t)[None]
        (logits, cache), inter = model_for(cfg)(cfg).apply({"params": lm.params}, jnp.asarray([part]), pos, cache,
                                                           mutable=["intermediates"])
        for i, layer in enumerate(cache.layers):
            feats = inter["intermediates"][f"layers_{i}"]["attn"]["qkv"][0]
            new = np.asarray(head.apply({"params": jax.tree_util.tree_map(lambda x: x[i], heads)}, feats))[0].T
            score = new if kept[i] is None else np.concatenate([kept[i]["score"], new], 1)
            k, v, p = (np.asarray(a)[0, :, : score.shape[1]] for a in (layer.k, layer.v, layer.pos))
            last = start + t >= len(ids)
            if score.shape[1] > budget:  # each head: top `budget`, the newest `stabilizers` forced in
                rank = score.copy()
                rank[:, score.shape[1] - (local if last else stabilizers):] = np.inf
                idx = np.sort(np.argsort(-rank, axis=1, kind="stable")[:, :budget], axis=1)
                take = lambda x: np.take_along_axis(x, idx if x.ndim == 2 else idx[..., None], 1)  # noqa: E731
                k, v, p, score = take(k), take(v), take(p), take(score)
            kept[i] = dict(k=k, v=v, pos=p, score=score)
    return np.asarray(logits)[0, -1], [c["pos"] for c in kept]


@pytest.mark.parametrize("n_tokens, budget", [(250, 100), (200, 30)])
def test_chunked_prefill_matches_an_independent_simulation(trained, monkeypatch, n_tokens, budget):
    # chunks of 64 tokens, so that a prompt of distinct tokens spans several: repeated tokens would have
    # equal layer-0 scores, whose order top-k implementations break differently
    monkeypatch.setattr("kvjax.generation.PREFILL_CHUNK", 64)
    lm, run, task, params = trained
    ids = np.random.default_rng(n_tokens).permutation(lm.cfg.vocab_size)[:n_tokens].tolist()
    method = methods.Locret(checkpoint=str(run), stabilizers=0.4, local=20)
    logits, cache = lm.prefill(ids, method=method, budget=budget, return_logits=True)
    want_logits, want_pos = simulate(lm, params, ids, budget, method.n_stabilizers(budget), method.n_local(budget), 64)
    np.testing.assert_allclose(np.asarray(logits)[0], want_logits, atol=2e-4)
    for got, want in zip(kept_positions(cache), want_pos):
        np.testing.assert_array_equal(got[0], want)


def test_budget_above_the_prompt_is_the_full_cache(trained):
    lm, run, _, _ = trained
    ids = random_ids(600, 4).tolist()
    full = lm.generate(ids, max_new_tokens=6)
    loc = lm.generate(ids, max_new_tokens=6, method="locret", checkpoint=run, budget=1000)
    assert loc.ids == full.ids


def test_generate_batches_rows_of_different_lengths_and_composes_with_quantization(trained):
    lm, run, _, _ = trained
    a, b = random_ids(900, 5).tolist(), random_ids(300, 6).tolist()
    both = lm.generate([a, b], max_new_tokens=5, method="locret", checkpoint=run, ratio=0.5)
    assert both.ids == [lm.generate(x, max_new_tokens=5, method="locret", checkpoint=run, ratio=0.5).ids
                        for x in (a, b)]
    one = lm.generate(a, max_new_tokens=5, method=f"locret(checkpoint={run})", ratio=0.5)
    assert one.ids == both.ids[0]
    q = lm.generate(a, max_new_tokens=5, method="locret", checkpoint=run, ratio=0.5, quant="int8")
    assert len(q.ids) == 5 and q.cache_bytes < one.cache_bytes


def test_checkpoint_errors(trained, tmp_path):
    lm, run, _, _ = trained
    ids = random_ids(100, 1).tolist()
    with pytest.raises(ValueError, match="locret needs trained retaining heads: pass checkpoint="):
        lm.generate(ids, method="locret", ratio=0.5)
    with pytest.raises(ValueError, match="no checkpoints/ directory"):
        lm.generate(ids, method="locret", checkpoint=tmp_path, ratio=0.5)
    with pytest.raises(ValueError, match="is not trained: it takes no checkpoint="):
        lm.generate(ids, method="snapkv", checkpoint=run, ratio=0.5)
    with pytest.raises(ValueError, match="pass method= too"):
        lm.generate(ids, checkpoint=run)
    other = tiny_lm(0, n_layers=3)
    with pytest.raises(ValueError, match="written for model 'tiny-0"):
        other.generate(ids, method="locret", checkpoint=run, ratio=0.5)
    mat = MatryoshkaTask(lm.cfg, "tiny-0", n_levels=4)
    batches = [np.stack([random_ids(17, i) for i in range(4)]).astype(np.int32)] * 2
    train(mat, lm.params, batches, TrainConfig(steps=1, batch_size=4, seq_len=16), tmp_path / "mat", progress=False)
    with pytest.raises(ValueError, match="written for method 'matryoshka', this run uses 'locret'"):
        lm.generate(ids, method="locret", checkpoint=tmp_path / "mat", ratio=0.5)
    with pytest.raises(ValueError, match="works while prefilling"):
        methods.get("adakv:locret")
    with pytest.raises(ValueError, match="scores tokens while prefilling"):
        methods.Locret().score(None)
    with pytest.raises(ValueError, match="stabilizers must be a fraction"):
        methods.Locret(stabilizers=1.5)
    with pytest.raises(ValueError, match="local must be an integer >= 0"):
        methods.Locret(local=-1)
    with pytest.raises(ValueError, match="bad parameters for 'snapkv'"):
        methods.get("snapkv(foo=1)")


def test_append_scores_tokens_with_the_layer_head():
    # append = append_scored with the retaining head's scores of the tokens' features
    rng = np.random.default_rng(0)
    head = dict(fc1=dict(kernel=jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)),
                fc2=dict(kernel=jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)))
    state = LocretKV.init(1, 2, 8, 2, jnp.float32, [8], [0], [0], head)
    k = jnp.asarray(rng.normal(size=(1, 2, 3, 2)), jnp.float32)
    features = jnp.asarray(rng.normal(size=(1, 3, 6)), jnp.float32)
    pos, n = jnp.asarray([[0, 1, 2]]), jnp.asarray([3])
    h = np.asarray(features[0]) @ np.asarray(head["fc1"]["kernel"])
    expected = (h / (1 + np.exp(-h))) @ np.asarray(head["fc2"]["kernel"])  # SiLU MLP, [T, K]
    got = state.append(k, k, pos, n, features)
    np.testing.assert_allclose(np.asarray(got.score)[0, :, :3], expected.T, rtol=1e-5, atol=1e-5)
    ref = state.append_scored(k, k, pos, n, jnp.asarray(expected)[None])
    np.testing.assert_array_equal(np.asarray(got.store.pos), np.asarray(ref.store.pos))


def test_cli_trains_locret_and_generates_with_it(tmp_path, capsys, monkeypatch):
    from test_train import corpus

    monkeypatch.setattr("kvjax.load", lambda name, dtype=None: tiny_lm(0))
    run = tmp_path / "run"
    args = ["train", "locret", "--model", "tiny", "--data", str(corpus(tmp_path / "corpus.txt")), "--out", str(run),
            "--batch-size", "4", "--seq-len", "16", "--save-every", "2", "--log-every", "1", "--hidden", "8"]
    assert main([*args, "--steps", "2"]) == 0
    assert main([*args, "--steps", "3", "--resume"]) == 0
    assert (run / "checkpoints" / "3").is_dir()
    capsys.readouterr()
    assert main(["generate", "--model", "tiny", "--prompt", "hello world " * 20, "--max-new-tokens", "4",
                 "--method", "locret", "--checkpoint", str(run), "--ratio", "0.5"]) == 0
    assert "KV cache" in capsys.readouterr().out
    assert main([*args, "--steps", "2", "--seq-len", "1", "--out", str(tmp_path / "x")]) == 2
    assert "leaves no prefix or no response" in capsys.readouterr().err


def test_eval_runner_gives_locret_its_own_prefill(trained):
    from kvjax.eval import prompts, runner, scoring

    lm, run, _, _ = trained
    filler = prompts.filler_haystack(lm.encode)
    samples = [prompts.passkey_sample(lm.tokenizer, filler, 700, None, i, seed=0) for i in range(2)]
    spec = f"locret(checkpoint={run})"
    configs = runner.make_configs(["full", spec, "knorm"], [0.5])
    runner.check_configs(lm.cfg, configs, [700])
    rows = []
    runner.run_retrieval(lm, samples, configs, max_batch=2, todo=lambda k: True, emit=rows.extend)
    assert len(rows) == 2 * 3
    for r in (r for r in rows if r["method"] == spec):
        s = samples[r["sample"]]
        cache = lm.prefill(list(s.context), method=spec, ratio=0.5)
        assert r["cache_bytes"] == cache_nbytes(cache) < r["full_cache_bytes"]
        fresh = lm.generate(list(s.suffix), cache=cache, max_new_tokens=s.max_new_tokens)
        assert fresh.text == r["answer"] and r["score"] == scoring.contains_all(r["answer"], s.answers)
    with pytest.raises(ValueError, match="no checkpoints/ directory"):
        runner.check_configs(lm.cfg, runner.make_configs(["locret(checkpoint=/nonexistent)"], [0.5]), [700])


KILLED = """
import os, signal, sys
import numpy as np
from kvjax.testing import random_ids, tiny_lm
from kvjax.train import TrainConfig, train
from kvjax.train.locret import LocretTask

lm = tiny_lm(0)
cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup=1, save_every=2, log_every=1)
batches = [np.stack([random_ids(33, 10 * s + i) for i in range(4)]).astype(np.int32) for s in range(7)]

def kill(step, metrics):
    if step == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no pending write finished

train(LocretTask(lm.cfg, "tiny-0", hidden=16), lm.params, batches, cfg, sys.argv[1], on_step=kill, progress=False)
"""


def test_resume_after_a_hard_kill_is_exact(tmp_path):
    import json
    import subprocess
    import sys

    lm = tiny_lm(0)
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup=1, save_every=2, log_every=1)
    batches = [np.stack([random_ids(33, 10 * s + i) for i in range(4)]).astype(np.int32) for s in range(7)]
    task = LocretTask(lm.cfg, "tiny-0", hidden=16)
    ref = train(task, lm.params, batches, cfg, tmp_path / "ref", progress=False)
    proc = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())  # what the kill left
    resumed = train(task, lm.params, batches, cfg, tmp_path / "run", resume=True, progress=False)
    # from the last checkpoint that was complete (2 or 4)
    assert resumed.log[0]["step"] in (3, 5), (resumed.log[0], saved, proc.stderr[-2000:])
    curve = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    assert curve == {r["step"]: r["loss"] for r in ref.log}  # the same curve, bit for bit
    for a, b in zip(jax.tree_util.tree_leaves(resumed.state), jax.tree_util.tree_leaves(ref.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loading_skips_a_corrupted_latest_checkpoint(trained, tmp_path):
    import shutil

    from kvjax.methods.locret import _load_heads

    lm, run, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    steps = sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
    for f in (copy / "checkpoints" / str(steps[-1])).rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    _load_heads.cache_clear()
    with pytest.warns(UserWarning, match=f"checkpoint at step {steps[-1]} is unreadable"):
        lm.prefill(random_ids(100, 1).tolist(), method="locret", checkpoint=copy, ratio=0.5)
