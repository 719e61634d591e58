"""`KVCache`: the whole cache, a tuple of layer states, each row's next position, and two static
choices made once: which state each layer reads (layers may share one) and the attention implementation.

Legend: B batch, K KV heads, S slots, L layers.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.states.base import tree_nbytes
from kvjax.states.dense import DenseKV
from kvjax.states.window import WindowKV


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Attributes:
      layers: tuple of layer states (may differ by layer: budgets, quantization, latent, ...). With
        `share`, one per *distinct* state; otherwise one per model layer.
      next_pos: int32 [B] the position the next token of each row gets (= tokens seen so far,
        compressed or not, as in kvpress).
      share: static; `share[i]` is the index in `layers` of model layer i's state, or None for one
        state per layer. The first layer reading a state writes it (its producer); later layers
        reading the same state only attend to it and store nothing (cross-layer sharing: CLA, ...).
      attention_impl: static; "xla" (plain jnp), "pallas" (each state's kernel) or "auto" (kernels
        where a state has one). Set once here; the model, observations and scorers read it.
      route: None, or int32 [L] the same map as data (`routed_cache`): layer i attends to the K/V layer
        route[i] wrote, one program for every map (KVSharer's search). Every layer keeps its own state.
    """

    layers: tuple
    next_pos: jax.Array
    share: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
    attention_impl: str = dataclasses.field(default="xla", metadata=dict(static=True))
    route: jax.Array | None = None

    AXES = {"route": (None,)}  # logical axes (`kvjax.sharding`): the route is per layer, not per row

    @property
    def batch(self) -> int:
        return self.next_pos.shape[0]

    @property
    def capacity(self) -> int:
        """Slots of the smallest state that holds the sequence (sliding-window states hold their window)."""
        return min([layer.capacity for layer in self.layers if not layer.sliding]
                   or [layer.capacity for layer in self.layers])

    @property
    def n_model_layers(self) -> int:
        return len(self.layers) if self.share is None else len(self.share)

    def state_index(self, layer: int) -> int:
        """Index in `layers` of the state model layer `layer` reads."""
        return layer if self.share is None else self.share[layer]

    def producer(self, state: int) -> int:
        """The model layer that writes state `state` (the first layer reading it)."""
        return state if self.share is None else self.share.index(state)

    def writes(self, layer: int) -> bool:
        """Model layer `layer` is the first to read its state: it appends its K/V there."""
        s = self.state_index(layer)
        return all(self.state_index(j) != s for j in range(layer))

    def reader(self, layer: int) -> int:
        """Which reader of its state model layer `layer` is: 0 for the producer, j for the j-th later layer
        reading the same state (`LayerState.reading`)."""
        s = self.state_index(layer)
        return sum(self.state_index(j) == s for j in range(layer))

    def with_room(self, n: int, round_up=lambda c: c) -> "KVCache":
        """Grow each state so it has at least `n` free slots past its longest row (host-side).

        `round_up` maps a slot count to the capacity to allocate (e.g. a bucket)."""
        return dataclasses.replace(self, layers=tuple(layer.with_room(n, round_up) for layer in self.layers))


def routed_cache(cfg, batch: int, tokens: int, route) -> KVCache:
    """An empty cache for one forward of `tokens` tokens in which layer i attends to the K/V of layer
    route[i] (int32 [L], data: a new map reuses the compiled program). route[i] == i: the layer keeps its own
    K/V; otherwise route[i] < i must keep its own. Each layer has a dense state of 2 * tokens slots: a
    reading layer's own K/V land past the producer's length, where no query sees them
    (`kvjax.models.decoder.decoder_stack`). A host array is checked here (`check_route`)."""
    if isinstance(route, (np.ndarray, list, tuple)):
        check_route(route, cfg.n_layers)
    if getattr(cfg, "kv_layout", "dense") != "dense" or any(getattr(cfg, "windows", None) or ()):
        raise ValueError("layer routes need a model whose layers all hold dense K/V (no latents, no sliding windows)")
    cache = init_cache(cfg.n_layers, batch, cfg.n_kv_heads, 2 * tokens, cfg.head_dim, cfg.jnp_dtype)
    return dataclasses.replace(cache, route=jnp.asarray(route, jnp.int32))


def check_route(route, n_layers: int) -> None:
    """One-line ValueError unless `route` (layer -> the layer whose K/V it reads) is a plan for `n_layers`
    layers: every entry a layer of the model, at or below its reader, and read from a layer that keeps its
    own K/V."""
    route = [int(r) for r in np.asarray(route).reshape(-1)]
    if len(route) != n_layers:
        raise ValueError(f"a share plan maps {len(route)} layers, the model has {n_layers}")
    for i, r in enumerate(route):
        if not 0 <= r < n_layers:
            raise ValueError(f"share plan: layer {i} reads layer {r}, which does not exist (layers 0..{n_layers - 1})")
        if r > i:
            raise ValueError(f"share plan: layer {i} reads layer {r}, a consumer before its producer")
        if route[r] != r:
            raise ValueError(f"share plan: layer {i} reads layer {r}, which itself reads layer {route[r]}")


def route_share(route) -> tuple[int, ...]:
    """A checked route (layer -> layer it reads) as `KVCache.share` (layer -> state index, states numbered
    in the order layers first use them)."""
    producers = sorted(set(int(r) for r in route))
    return tuple(producers.index(int(r)) for r in route)


def init_cache(n_layers: int, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype,
               share: tuple[int, ...] | None = None, attention_impl: str = "xla",
               windows: tuple[int | None, ...] | None = None) -> KVCache:
    """An empty dense cache; with `share` (layer -> state index), one `DenseKV` per distinct state;
    with `windows` (per layer: a sliding window, or None), a `WindowKV` ring for each local layer."""
    n_states = n_layers if share is None else _check_share(share, n_layers)
    if windows is not None and (share is not None or len(windows) != n_layers):
        raise ValueError(f"windows= needs one entry per layer ({n_layers}) and no share=")
    layers = tuple(WindowKV.init(batch, n_kv_heads, windows[i], head_dim, dtype) if windows and windows[i]
                   else DenseKV.init(batch, n_kv_heads, capacity, head_dim, dtype) for i in range(n_states))
    return KVCache(layers=layers, next_pos=jnp.zeros((batch,), jnp.int32), share=share, attention_impl=attention_impl)


# kv layout name -> builder(cfg, batch, capacity, attention_impl) of the empty cache a model prefills onto
_LAYOUTS: dict = {}


def register_layout(name: str, build) -> None:
    """Register the empty-cache builder of a model family's KV layout (`cfg.kv_layout`, default "dense")."""
    if _LAYOUTS.get(name, build) is not build:
        raise ValueError(f"kv layout {name!r} registered twice")
    _LAYOUTS[name] = build


def model_cache(cfg, batch: int, capacity: int, attention_impl: str = "xla",
                share: tuple[int, ...] | None = None) -> KVCache:
    """The empty cache a model of `cfg` prefills onto: dense `DenseKV` layers of its KV heads, or the
    layout its family declares (`cfg.kv_layout`: "mla" -> `MLAKV` latents, `kvjax.states.mla`).
    `share` (layer -> state, `KVCache.share`): layers sharing states (cross-layer methods: CLA, KVSharer);
    dense layouts without sliding windows only."""
    layout = getattr(cfg, "kv_layout", "dense")
    windows = getattr(cfg, "windows", None)  # sliding-window layers (Gemma 3), if the family has them
    if share is not None and (layout != "dense" or any(windows or ())):
        raise ValueError("layers sharing K/V need a model whose layers all hold dense K/V (this one has "
                         + ("sliding-window layers)" if layout == "dense" else f"a {layout} cache)"))
    if layout == "dense":
        return init_cache(cfg.n_layers, batch, cfg.n_kv_heads, capacity, cfg.head_dim, cfg.jnp_dtype, share=share,
                          attention_impl=attention_impl, **({"windows": windows} if windows else {}))
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown kv layout {layout!r}; registered: dense, {', '.join(_LAYOUTS)}")
    return _LAYOUTS[layout](cfg, batch, capacity, attention_impl)


def _check_share(share, n_layers: int) -> int:
    """Validate a layer -> state map; the number of states it uses."""
    share = tuple(int(s) for s in share)
    if len(share) != n_layers:
        raise ValueError(f"share maps {len(share)} layers, the model has {n_layers}")
    used = sorted(set(share))
    if used != list(range(len(used))):
        raise ValueError(f"share must use states 0..n-1 without gaps, got {share}")
    first = [share.index(s) for s in used]
    if first != sorted(first):
        raise ValueError(f"share must number states in the order layers first use them, got {share}")
    return len(used)


def cache_nbytes(cache: KVCache) -> int:
    """Exact bytes held by a cache's arrays: the memory the KV cache really takes (a state shared by
    several layers is held, and counted, once)."""
    return tree_nbytes(cache)


def kept_positions(cache: KVCache) -> list:
    """Per state, int32 [B, K, n] original positions held, sorted (rows must hold equal counts);
    for a state whose heads keep different counts (`RaggedKV`), a list per KV head of [B, n_k]."""
    out = []
    for layer in cache.layers:
        pos = layer.positions()
        if isinstance(pos, list):  # per-head lists already
            out.append(pos)
            continue
        pos, length = np.asarray(pos), np.asarray(layer.length)
        if len(set(length.tolist())) > 1:
            raise ValueError("rows hold different numbers of tokens; select one row first")
        out.append(np.sort(pos[:, :, : int(length[0])], axis=-1))
    return out


def memory_report(cache: KVCache) -> dict:
    """Bytes per component of a cache, and effective bits per element vs the full-precision K/V.

    Components: codes, scales, zeros, outliers (values + indices; kvquant) of quantized stores,
    residual and sink (full-precision K/V of quantized layers), kv (K/V of unquantized layers),
    metadata (positions, lengths, bases, scores). `bits_per_element` counts all K/V data (metadata
    excluded) per K/V element held; `full_precision_bytes` is what the same slots take unquantized.
    `local_bytes` / `global_bytes` split `total` between sliding-window states (`LayerState.sliding`:
    Gemma 3's local layers, a fixed window) and the others (with the cache's next positions).
    """
    out = dict(codes=0, scales=0, zeros=0, outliers=0, residual=0, sink=0, kv=0, metadata=0)
    elements, itemsize = 0, 4
    for layer in cache.layers:
        parts = layer.memory_parts()
        elements += parts.pop("elements")
        itemsize = parts.pop("itemsize")
        for k, v in parts.items():
            out[k] += v
    out["metadata"] += tree_nbytes(cache.next_pos)
    out["total"] = sum(out.values())
    out["local_bytes"] = sum(layer.nbytes() for layer in cache.layers if layer.sliding)
    out["global_bytes"] = out["total"] - out["local_bytes"]
    data = out["total"] - out["metadata"]
    out["bits_per_element"] = 8 * data / max(elements, 1)
    out["full_precision_bytes"] = elements * itemsize
    return out
