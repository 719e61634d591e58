"""Sharded inference: logical axis names on parameters and layer states, a rules table mapping them to a
device mesh, and the sharded shapes (bytes per device) of a cache before anything is allocated.

    mesh = kvjax.sharding.make_mesh(data=2, model=4)          # 8 devices
    lm = kvjax.load().shard(mesh)                               # parameters placed, caches follow
    lm.generate(prompts, method="snapkv", ratio=0.5)            # same greedy tokens as one device

Every array is named by what its axes mean, not by where it goes (the approach of t5x / MaxText's
`logical_axis_rules`): parameters by the module that owns them (`param_axes`), layer states by the
layer-state convention below (`state_axes`). `RULES` maps the names to mesh axes: KV heads (and the
query heads and MLP columns that go with them) over `model`, the batch over `data`, everything else
replicated. `jit` then partitions the prefill and the decode loop from the arguments' shardings (GSPMD);
the model code does not change.

**The layer-state convention.** A state's arrays are batch-major: axis 0 is the batch and axis 1, when
there is one, the KV head (`[B, K, S, D]` dense, quantized codes and scales, rolling rings, ...), so one
default names them all. A state whose arrays differ says so in a class attribute `AXES` (field name ->
names), e.g. the per-head pool of `RaggedKV` (`[B, P, D]`, axis 1 the pool, which holds the heads'
regions in head order: sharded like the heads) or the bases of `LatentKV` (`[K, D, R]`, no batch).

**Divisibility.** The model's KV heads must divide over `model` (`check_mesh`: a clear error before
anything runs). Any other axis that a rule maps to a mesh axis it does not divide (a batch of one row on
data=2, a latent cache's single head, DuoAttention's retrieval heads) is replicated on that mesh axis:
the result is the same, and `state_bytes_per_device` shows what it costs.

Legend: B batch, K KV heads, S slots, P pool slots, D head dim, E d_model, F d_ff, V vocab.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


AXES = ("data", "model")

# Logical axis name -> mesh axis (None: replicated).
RULES = {
    "batch": "data",
    "kv_heads": "model",   # KV heads of k_proj / v_proj columns and of every state
    "kv_pool": "model",    # a per-head pool (RaggedKV): the heads' regions in head order
    "heads": "model",      # query heads (q_proj columns, o_proj rows): each device holds its KV heads' groups
    "mlp": "model",        # d_ff columns (Megatron-style: gate/up column-parallel, down row-parallel)
    "embed": None,
    "vocab": None,
    "experts": None,
    "latent": None,
}

# Parameter name (the Flax module's, or the parameter's own) -> logical names of its axes.
PARAM_AXES = {
    "q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"), "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "q_b_proj": ("latent", "heads"), "kv_b_proj": ("latent", "heads"),   # MLA up-projections (DeepSeek)
    "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed"),
    "experts_gate_proj": ("experts", "embed", "mlp"), "experts_up_proj": ("experts", "embed", "mlp"),
    "experts_down_proj": ("experts", "mlp", "embed"),
    "embed": ("vocab", "embed"), "lm_head": ("embed", "vocab"),
}


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over the first data * model devices (of `jax.devices()` by default)."""
    devices = list(jax.devices() if devices is None else devices)
    for name, n in (("data", data), ("model", model)):
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"mesh axis {name} must be a positive integer, got {n!r}")
    if data * model > len(devices):
        raise ValueError(f"a mesh of data={data} x model={model} needs {data * model} devices; "
                         f"{len(devices)} are visible (on CPU, simulate more with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return Mesh(np.array(devices[:data * model]).reshape(data, model), AXES)


def parse_mesh(spec: str) -> dict:
    """"data=2,model=4" -> {"data": 2, "model": 4} (the CLI's --mesh; an axis left out is 1)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in AXES or not value.isdigit() or int(value) < 1 or name in sizes:
            raise ValueError(f"--mesh takes data=N,model=M (positive sizes, each axis once), got {spec!r}")
        sizes[name] = int(value)
    return sizes


def check_mesh(mesh: Mesh, n_kv_heads: int) -> None:
    """A one-line error for a mesh whose `model` axis does not divide the model's KV heads."""
    model = mesh.shape.get("model", 1)
    if n_kv_heads % model:
        raise ValueError(f"a mesh with model={model} does not divide the model's {n_kv_heads} KV heads "
                         f"(use a model axis that divides {n_kv_heads})")


# ------------------------------------------------------------------------------------------ naming
def _default_axes(ndim: int) -> tuple:
    """The layer-state convention: [B, K, ...] (or [B] for per-row counts)."""
    return (("batch", "kv_heads") + (None,) * ndim)[:ndim]


def _leaf_axes(x, names: tuple | None = None) -> list:
    """Logical names of each array leaf of `x`, in `jax.tree_util.tree_leaves` order. `names` (from an
    owner's `AXES`) applies to every array below; otherwise a registered dataclass (a state, a
    `QuantStore`, a `QuantizedArray`, the cache) recurses through its data fields, its own `AXES` first,
    containers through their items, and a bare array takes the convention."""
    if names is not None:
        return [tuple(names[:leaf.ndim]) + (None,) * (leaf.ndim - len(names))
                for leaf in jax.tree_util.tree_leaves(x)]
    if x is None:
        return []
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        own = getattr(type(x), "AXES", {})
        return [n for f in dataclasses.fields(x) if not f.metadata.get("static")
                for n in _leaf_axes(getattr(x, f.name), own.get(f.name))]
    if isinstance(x, (tuple, list)):
        return [n for item in x for n in _leaf_axes(item)]
    if isinstance(x, dict):
        return [n for key in sorted(x) for n in _leaf_axes(x[key])]
    return [_default_axes(x.ndim)]


def state_axes(tree):
    """The pytree `tree` (a `KVCache`, a layer state, or any container of them) with each array replaced
    by the tuple of its axes' logical names (None: not named, replicated). Use it as the second tree of
    `jax.tree_util.tree_map(f, tree, names)`, which hands each array its whole tuple."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    names = _leaf_axes(tree)
    if len(names) != len(leaves):
        raise TypeError(f"cannot name the axes of a {type(tree).__name__}: {len(leaves)} arrays, {len(names)} named")
    return jax.tree_util.tree_unflatten(treedef, names)


def param_axes(params):
    """The parameter pytree with each array replaced by its axes' logical names: by the parameter's
    module (`PARAM_AXES`: q/k/v/o projections, MLP, embeddings, MLA up-projections, experts); biases
    take the output axis of their module's kernel; norms and anything unnamed are replicated."""
    def name(path, x):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        for key in reversed(keys):
            if key in PARAM_AXES:
                axes = PARAM_AXES[key]
                if keys[-1] == "bias":
                    axes = axes[-1:]
                if len(axes) == x.ndim:
                    return axes
        return (None,) * x.ndim
    return jax.tree_util.tree_map_with_path(name, params)


# ------------------------------------------------------------------------------------- placement
def spec(names: tuple, shape: tuple, mesh: Mesh, rules: dict | None = None) -> P:
    """The PartitionSpec of an array of `shape` named `names` on `mesh`: each named axis goes to its
    rule's mesh axis when that mesh axis divides it (module docstring, Divisibility), else replicated."""
    rules = RULES if rules is None else rules
    out, used = [], set()
    for name, size in zip(names, shape):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis not in mesh.shape or axis in used or size % mesh.shape[axis]:
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    return P(*out)


def shardings(tree, names, mesh: Mesh, rules: dict | None = None):
    """`NamedSharding`s for the arrays of `tree` from its names tree (`state_axes` / `param_axes`)."""
    return jax.tree_util.tree_map(lambda x, n: NamedSharding(mesh, spec(tuple(n), x.shape, mesh, rules)),
                                  tree, names)


def shard_params(params, mesh: Mesh, rules: dict | None = None):
    """The parameters placed on `mesh` by `param_axes` and the rules."""
    return jax.device_put(params, shardings(params, param_axes(params), mesh, rules))


def shard_state(tree, mesh: Mesh, rules: dict | None = None):
    """A cache (or layer state) placed on `mesh` by `state_axes` and the rules."""
    return jax.device_put(tree, shardings(tree, state_axes(tree), mesh, rules))


def abstract_sharded(tree, mesh: Mesh, rules: dict | None = None, names=None):
    """`tree` (arrays or `ShapeDtypeStruct`s, e.g. a state's `abstract(...)`) as `ShapeDtypeStruct`s
    carrying the sharding it gets on `mesh`: nothing is allocated."""
    names = state_axes(tree) if names is None else names
    return jax.tree_util.tree_map(
        lambda x, n: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec(tuple(n), x.shape,
                                                                                            mesh, rules))),
        tree, names)


def bytes_per_device(tree) -> int:
    """Bytes each device holds of a sharded tree (`abstract_sharded` structs or placed arrays): every
    array's shard shape times its item size (replicated arrays count on every device)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return int(total)


def state_bytes_per_device(tree, mesh: Mesh, rules: dict | None = None) -> int:
    """Bytes per device of a cache or state placed on `mesh` (exact, from shapes only)."""
    return bytes_per_device(abstract_sharded(tree, mesh, rules))
