"""Sharded inference (`kvjax.sharding`): logical axis names on parameters and every state a method
builds, the rules' partition specs, bytes per device, bad meshes, and, on 8 simulated CPU devices
(a child process: the device count is fixed when JAX starts), greedy generation on a data=2 x model=4
mesh equal to one device's for dense, evicted, per-head (ragged), quantized and rolling caches.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from kvjax import sharding
from kvjax.testing import random_ids, tiny_lm

B = 3  # rows: differs from the tiny model's K = 2 KV heads, so a misnamed axis shows in its size


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


CASES = {  # (method, ratio, quant) of the caches whose arrays must all be named right
    "dense": (None, None, None), "snapkv": ("snapkv(window=4)", 0.5, None), "adakv": ("adakv:snapkv(window=4)", 0.5, None),
    "kivi": ("snapkv(window=4)", 0.5, "kivi-2(residual=8, group=8)"), "ragged-int8": ("adakv:snapkv(window=4)", 0.5, "int8"),
    "think": ("think:knorm", 0.5, None), "duo": ("duo(sparsity=0.5)", None, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_state_array_is_named_by_what_its_axes_hold(lm, case):
    method, ratio, quant = CASES[case]
    rows = [random_ids(n, seed=n).tolist() for n in (20, 13, 17)]
    cache = lm.prefill(rows, method=method, ratio=ratio, quant=quant) if method else lm.prefill(rows)
    names = sharding.state_axes(cache)
    flat, treedef = jax.tree_util.tree_flatten(cache)
    named = treedef.flatten_up_to(names)
    seen = set()
    for x, n in zip(flat, named):
        assert len(n) == x.ndim
        for axis, size in zip(n, x.shape):
            seen.add(axis)
            if axis == "batch":
                assert size == B, (case, n, x.shape)
            if axis == "kv_heads":
                assert size <= lm.cfg.n_kv_heads and lm.cfg.n_kv_heads % size == 0 or size == 1, (case, n, x.shape)
    assert {"batch", "kv_heads"} <= seen
    assert ("kv_pool" in seen) == (case == "adakv")


def test_parameters_are_named_by_their_module(lm):
    names = sharding.param_axes(lm.params)
    layer = names["layers_0"]
    assert layer["attn"]["q_proj"]["kernel"] == ("embed", "heads")
    assert layer["attn"]["k_proj"]["kernel"] == ("embed", "kv_heads")
    assert layer["attn"]["o_proj"]["kernel"] == ("heads", "embed")
    assert layer["mlp"]["down_proj"]["kernel"] == ("mlp", "embed")
    assert layer["attn_norm"]["scale"] == (None,)
    assert names["embed"]["embedding"] == ("vocab", "embed")


def test_specs_follow_the_rules_and_replicate_what_a_mesh_axis_does_not_divide():
    mesh = sharding.make_mesh(1, 1)
    fake = type("Mesh", (), {"shape": {"data": 2, "model": 4}})()
    assert sharding.spec(("batch", "kv_heads", None, None), (6, 8, 5, 3), fake) == P("data", "model", None, None)
    assert sharding.spec(("batch", "kv_heads", None), (3, 8, 5), fake) == P(None, "model", None)  # 3 rows on data=2
    assert sharding.spec(("batch", "kv_heads"), (4, 1), fake) == P("data", None)  # one latent head
    assert sharding.spec(("batch", "kv_heads"), (4, 8), fake, {"batch": None, "kv_heads": "data"}) == P(None, "data")
    assert sharding.spec(("batch",), (4,), mesh) == P("data")  # a mesh axis of size 1 divides everything


def test_bad_meshes_are_one_line_errors(lm):
    with pytest.raises(ValueError, match="does not divide the model's 2 KV heads"):
        sharding.check_mesh(type("Mesh", (), {"shape": {"data": 1, "model": 4}})(), lm.cfg.n_kv_heads)
    with pytest.raises(ValueError, match="needs 64 devices"):
        sharding.make_mesh(8, 8)
    with pytest.raises(ValueError, match="positive integer"):
        sharding.make_mesh(0, 1)
    for bad in ("data=2,rows=4", "model=0", "data=x", "data=2,data=2"):
        with pytest.raises(ValueError, match="--mesh takes"):
            sharding.parse_mesh(bad)
    assert sharding.parse_mesh("data=2, model=4") == {"data": 2, "model": 4}


CHILD = r"""
import json, sys
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from kvjax import pipeline, sharding
from kvjax.states import DenseKV
from kvjax.testing import random_ids, tiny_lm

assert jax.device_count() == 8
lm = tiny_lm(n_heads=8, n_kv_heads=4)
mesh = sharding.make_mesh(data=2, model=4)
sharded = lm.shard(mesh)
rows = [random_ids(n, seed=n).tolist() for n in (24, 9, 31, 16)]
out = {}
for name, kw in {"dense": {}, "snapkv": dict(method="snapkv(window=4)", ratio=0.5), "adakv": dict(method="adakv:snapkv(window=4)", ratio=0.5),
                 "kivi": dict(method="snapkv(window=4)", ratio=0.5, quant="kivi-2(residual=8, group=8)"),
                 "streaming": dict(method="streaming_llm", capacity=16)}.items():
    one = lm.generate(rows, max_new_tokens=12, **kw)
    many = sharded.generate(rows, max_new_tokens=12, **kw)
    out[name] = [one.ids == many.ids, one.cache_bytes == many.cache_bytes]
    out[name + "_spec"] = str(jax.tree_util.tree_leaves(many.cache.layers[0])[0].sharding.spec)
cache = sharded.prefill(rows)
out["cache_spec"] = str(cache.layers[0].k.sharding.spec)
out["q_spec"] = str(sharded.params["layers_0"]["attn"]["q_proj"]["kernel"].sharding.spec)
abstract = DenseKV.abstract(4, 4, 64, 8, np.float32)
out["per_device"] = [sharding.state_bytes_per_device(abstract, mesh), abstract.nbytes()]
ab = pipeline.abstract(lm.cfg, None, 31, batch=4, mesh=mesh)
out["abstract"] = [sharding.bytes_per_device(ab), sharding.bytes_per_device(cache)]
out["placed"] = [sharding.bytes_per_device(cache.layers[0].k), cache.layers[0].k.nbytes]
print("RESULT", json.dumps(out))
"""


def test_generation_on_eight_devices_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name in ("dense", "snapkv", "adakv", "kivi", "streaming"):
        assert out[name] == [True, True], (name, out)
    assert out["cache_spec"] == out["dense_spec"] == str(P("data", "model", None, None))  # after prefill, decode
    assert out["adakv_spec"] == str(P("data", "model", None))  # the per-head pool, by head
    assert out["q_spec"] == str(P(None, "model"))
    per_device, total = out["per_device"]
    # k, v, pos split 8 ways; the per-row lengths [B] split over data only
    assert per_device == (total - 4 * 4) // 8 + 4 * 4 // 2
    assert out["abstract"][0] == out["abstract"][1]  # pipeline.abstract(mesh=) == the placed cache, per device
    placed, k_bytes = out["placed"]
    assert placed * 8 == k_bytes


def test_the_cli_refuses_a_bad_mesh_before_loading_a_model(capsys):
    from kvjax.cli import main
    assert main(["generate", "--prompt", "x", "--model", "no-such-model", "--mesh", "data=2,rows=4"]) == 2
    assert "--mesh takes data=N,model=M" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--model", "no-such-model", "--mesh", "data=64"]) == 2
    assert "needs 64 devices" in capsys.readouterr().err
