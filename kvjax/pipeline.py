"""The one compression pipeline: plan, then prefill, observe, compress, quantize.

    p = pipeline.plan(cfg, lengths, method="snapkv", ratio=0.5, quant="kivi-2")   # host, before compiling
    logits, cache = pipeline.prefill(params, cfg, p, tokens, lengths, cache, room)
    pipeline.abstract(cfg, p, length)                                             # exact bytes, nothing run

`LM` (prefill / generate), the eval runner (one shared prefill, a branch per configuration), the
trained methods and the training tasks (`forward`) all go through here, so a new method kind or state
is wired in one place.

Method kinds (`kvjax.methods`): a *score method* scores the slots of a finished prefill
(`EvictionMethod.score`, kvpress semantics: the prefill attends to the whole prompt, then every
layer keeps its top tokens); a *prefill method* builds its own states before the prefill and
finishes them after it (`build_cache` / `finish`: Locret evicts while prefilling, MatryoshkaKV
stores projections); a *quantizer* stores what is kept quantized (`LayerState.quantize`). A
`Compose` chains a token method and a quantizer; `quant=` is the same as composing.

Legend: B batch, L layers, T prompt tokens, C slots after compression.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import generation, methods, quant as quant_ops, quantizers, recompress, sharding
from kvjax.compress import compress, resolve_keep
from kvjax.models.family import model_for
from kvjax.shapes import bucket, round_step
from kvjax.observe import init_layer_obs
from kvjax.methods.crosslayer import CrossLayer
from kvjax.states.paged import PagedKV, check_paged
from kvjax.states.ragged import RaggedKV
from kvjax.states.cache import KVCache, model_cache, route_share



@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated compression request (host-side; built before anything compiles).

    Attributes:
      method: the token method (score or prefill kind), or None.
      quantizer: the quantizer bound to the model, or None.
      n_keep: int32 [L, B] tokens each layer keeps per row and KV head (None without a method).
      rolling: capacity C of a decode-time-evicting cache (`capacity=`), or None.
      ratio, budget: the request (prefill methods read the ratio: MatryoshkaKV's removed dimensions).
      model_name: the model's name (trained methods check their checkpoint against it).
      local: with `compress_local`, each layer's sliding window or None (a global layer); None when
        sliding-window layers keep their whole window.
      check_finite: debug mode: check K/V for NaN/Inf before quantizing.
      replay: the replay prompt of a method that replays (`EvictionMethod.replays`: KVzip), from `tokenizer=`.
      share: with a cross-layer method (`kvjax.methods.crosslayer`), the cache's layer -> state map
        (`KVCache.share`) the prompt is prefilled onto; None: one state per layer.
      chunk, chunk_keep, decoding: compression while the cache fills (`kvjax.recompress`): after every prefill
        chunk of `chunk` tokens, and every `decoding.compression_interval` decode steps.
    """

    method: object = None
    quantizer: object = None
    n_keep: np.ndarray | None = None
    rolling: int | None = None
    ratio: float | None = None
    budget: int | None = None
    model_name: str = ""
    check_finite: bool = False
    local: tuple[int | None, ...] | None = None  # compress_local: each layer's sliding window (None: global)
    replay: object = None  # a replaying method's prompt pieces in the model's tokenizer (KVzip's `ReplayPrompt`)
    share: tuple[int, ...] | None = None
    chunk: int | None = None  # chunked compression: tokens per prefill chunk (`kvjax.recompress`)
    chunk_keep: np.ndarray | None = None  # int32 [n_chunks, L, B] kept after each chunk
    decoding: "recompress.DecodeCompression | None" = None  # decode-time compression

    def kept(self, n_layers: int, length: int) -> tuple[int, ...]:
        """Tokens each layer holds after compression (the longest row)."""
        if self.method is None:
            return (length,) * n_layers
        return tuple(int(row.max()) for row in self.n_keep)


def plan(cfg, lengths, method=None, ratio=None, budget=None, capacity=None, quant=None, checkpoint=None,
         model_name: str = "", fresh: bool = True, compress_local: bool = False, lm=None,
         tokenizer=None, chunked_compression=None, decoding=None, page_size: int | None = None) -> Plan | None:
    """Validate a compression request for prompts of `lengths` tokens: a `Plan`, or None for none.

    `method`: None / "full", a name, a spec with parameters ("snapkv(window=16)"), "wrapper:name",
    "compose(snapkv, kivi-4)", or a method / quantizer / `Compose` object. `quant`: a quantizer spec
    or object (the same as composing it). `fresh`: False when the prompt is fed on top of a given cache,
    which cannot be compressed again. `compress_local`: evict in sliding-window layers too (by default
    compression applies to global layers only), each keeping its budget of what its window holds. A
    cross-layer method (CLA, KVSharer) becomes the plan's `share` map and its eviction method (`press=`), if
    any; `lm` (the model) lets one that calibrates on first use do so. Every error is a ValueError raised
    here, before any compile.
    `tokenizer`: the model's, for a method that replays a prompt it builds (KVzip).
    `chunked_compression` (True or a chunk size) and `decoding` (a `recompress.DecodeCompression`): compress
    while the cache fills, after every prefill chunk and every N decode steps (`kvjax.recompress`).
    `page_size`: the prompt is prefilled onto a paged cache (`kvjax.states.paged`, pages of that many
    slots): `_check_paged` says what it takes.
    """
    chunk = recompress.chunk_size(chunked_compression)
    if decoding is not None and not isinstance(decoding, recompress.DecodeCompression):
        raise ValueError(f"decoding= takes a kvjax.recompress.DecodeCompression, got {type(decoding).__name__}")
    filling = ("chunked compression" if chunk else "decode-time compression") if chunk or decoding else None
    token, quantizer = (None, None) if method is None or method == "full" else methods.split(method)
    if quant is not None:
        if quantizer is not None:
            raise ValueError(f"method {method!r} already quantizes: do not also pass quant=")
        quantizer = quantizers.get(quant)
    if quantizer is not None:
        quantizer = quantizer.for_model(cfg)
    if checkpoint is not None:
        token = _with_checkpoint(token, checkpoint)
    lengths = [int(n) for n in lengths]
    share = None
    if isinstance(token, CrossLayer):
        if not fresh:
            raise ValueError(f"{token.name} shares layers from the first token: do not pass cache= with it")
        if token.keeps_every_token and (ratio is not None or budget is not None or capacity is not None):
            raise ValueError(f"{token.name} keeps every token: ratio= / budget= / capacity= need an eviction "
                             f"method, e.g. {token.name}(press=snapkv)")
        share = route_share(token.route(cfg, model_name, lm))
        token = token.evictor()
    if page_size is not None:
        _check_paged(cfg, page_size, token, quantizer, capacity, filling or compress_local and "compress_local",
                     share, fresh)
    if filling and (token is None or quantizer is not None or capacity is not None or compress_local or share):
        raise ValueError(f"{filling} needs a score method= on a dense full-precision cache, without quant=, "
                         "capacity=, compress_local or a cross-layer method")
    if token is None:
        if ratio is not None or budget is not None or capacity is not None:
            raise ValueError("ratio= / budget= / capacity= need a method= to compress with")
        if quantizer is not None and not fresh:
            raise ValueError("quantization applies to a fresh prefill: do not pass cache= with quant=")
        if quantizer is None and share is None:
            return None
        return Plan(quantizer=quantizer, model_name=model_name, share=share)
    if not fresh:
        raise ValueError("compression applies to a fresh prefill: do not pass cache= with method=")
    _check_latent(cfg, token, capacity)
    token = token.bind(cfg, ratio=ratio, budget=budget, model_name=model_name)
    if token.own_budget:
        if capacity is not None or compress_local:
            raise ValueError(f"{token.name} bounds its cache itself: capacity= / compress_local do not apply")
        n_keep = resolve_keep(token, methods.Budget(ratio=0.0), lengths, cfg.n_layers)
        p = Plan(token, quantizer, n_keep, ratio=ratio, budget=budget, model_name=model_name)
        if token.prefills_itself:
            token.prepare(cfg, p, lm=lm)  # load (or calibrate) what it builds its states from
        return p
    if capacity is not None:
        if compress_local:
            raise ValueError("compress_local: sliding-window layers are evicted at the prefill by ratio= or "
                             "budget=; capacity= (decode-time eviction) applies to global layers only")
        n_keep = _rolling_keep(token, capacity, ratio, budget, lengths, cfg.n_layers)
        return Plan(token, quantizer, n_keep, rolling=int(capacity), model_name=model_name, share=share)
    if filling:
        recompress.check_method(token, cfg, filling)
    if ratio is None and budget is None and decoding is not None and not chunk:  # kvpress DecodingPress alone
        return Plan(token, n_keep=np.array([lengths] * cfg.n_layers, np.int32), model_name=model_name,
                    decoding=_decoding(token, decoding, lengths))
    if ratio is None and budget is None:
        raise ValueError(f"method {token.name!r} needs ratio= (fraction removed), budget= (tokens kept) "
                         "or capacity= (cache bound while decoding)")
    n_keep = resolve_keep(token, methods.Budget(ratio=ratio, tokens=budget), lengths, cfg.n_layers)
    local = _local_plan(cfg, token, quantizer, ratio, budget, lengths, n_keep) if compress_local else None
    p = Plan(token, quantizer, n_keep, ratio=ratio, budget=budget, model_name=model_name, local=local, share=share)
    p = dataclasses.replace(p, replay=_replay_prompt(cfg, token, tokenizer))
    if chunk:
        recompress.check_chunk(token, chunk)
        p = dataclasses.replace(p, chunk=chunk, chunk_keep=recompress.chunk_keeps(
            token, methods.Budget(ratio=ratio, tokens=budget), lengths, cfg.n_layers, chunk))
    if decoding is not None:
        p = dataclasses.replace(p, decoding=_decoding(token, decoding, lengths))
    if token.prefills_itself:
        if any(getattr(cfg, "windows", None) or ()):
            raise ValueError(f"method {token.name!r} builds its own state for every layer, and this model has "
                             "sliding-window layers (which keep their ring): use a score method or a quantizer")
        token.prepare(cfg, p, lm=lm)  # load (and check) trained weights before compiling
    return p


def _check_paged(cfg, page_size, token, quantizer, capacity, other, share, fresh) -> None:
    """A paged cache (`PagedKV`) takes a dense model, no method or a method whose kept tokens
    `EvictionMethod.page_keep` gives (plain scorers, Ada-KV): one-line errors, before any compile, for
    the rest (not wired to pages yet)."""
    check_paged(cfg, page_size)
    if not fresh:
        raise ValueError("layout='paged' builds the cache the prompt is prefilled onto: with cache= the given "
                         "cache's layout is used")
    what = ("quantization" if quantizer is not None else "capacity= (decode-time eviction)" if capacity is not None
            else other or ("a cross-layer method" if share is not None else None))
    if what is None and token is not None and (token.prefills_itself or token.replays or token.own_budget
                                               or not token.paged_keeps()):
        what = f"method {token.name!r} (it selects or builds its own layout)"
    if what:
        raise ValueError(f"{what} does not apply to a paged cache: use layout='paged' with no method, a score "
                         "method (snapkv, knorm, ...) or adakv:<scorer>")


def _decoding(token, decoding, lengths):
    recompress.check_decoding(token, decoding, min(lengths) + decoding.compression_interval)
    return decoding


def _replay_prompt(cfg, token, tokenizer):
    """A replaying method's prompt in the model's tokenizer (None without a tokenizer: `prefill` and
    `branch` then refuse it); it replays on dense K/V in every layer."""
    if not token.replays:
        return None
    if any(getattr(cfg, "windows", None) or ()) or getattr(cfg, "kv_layout", "dense") != "dense":
        raise ValueError(f"{token.name} replays the context on dense K/V in every layer; this model has "
                         "sliding-window or latent layers")
    return None if tokenizer is None else token.replay_prompt(tokenizer)


def _check_latent(cfg, token, capacity) -> None:
    """An MLA cache (`cfg.kv_layout == "mla"`: one latent per token, `MLAKV`) keeps tokens by a score
    method's top-k; methods that build their own layout (prefill methods, Ada-KV pools, ThinK's narrow
    keys, rolling eviction) or rotate pre-RoPE query statistics by the Llama RoPE (ExpectedAttention)
    do not apply to it."""
    if getattr(cfg, "kv_layout", "dense") != "mla":
        return
    own = token.prefills_itself or type(token).select is not methods.EvictionMethod.select
    rotates = not token.prefills_itself and token.observations().qstats_from is not None  # Llama-RoPE query stats
    if own or rotates or capacity is not None:
        what = "capacity= (decode-time eviction)" if capacity is not None else token.name
        raise ValueError(f"{what} does not apply to an MLA latent cache: it keeps tokens by a score method's "
                         "top-k (one latent head), e.g. method='snapkv'")


def _with_checkpoint(token, checkpoint):
    if token is None:
        raise ValueError("checkpoint= gives a trained method its weights: pass method= too")
    if "checkpoint" not in {f.name for f in dataclasses.fields(token)}:
        raise ValueError(f"method {token.name!r} is not trained: it takes no checkpoint=")
    return dataclasses.replace(token, checkpoint=checkpoint)


def _rolling_keep(method, capacity, ratio, budget, lengths, n_layers: int) -> np.ndarray:
    if ratio is not None or budget is not None:
        raise ValueError("capacity= bounds the cache on its own: do not combine it with ratio= or budget=")
    if not isinstance(capacity, (int, np.integer)) or isinstance(capacity, bool) or capacity < 2:
        raise ValueError(f"capacity must be an integer >= 2 tokens, got {capacity!r}")
    rule = method.decode_rule(int(capacity))
    if rule is None:
        able = sorted(n for n, c in methods.registry("score").items() if _has_decode_rule(c))
        raise ValueError(f"method {method.name!r} has no decode-time eviction rule; use one of {able}")
    _, n_sink, recent = rule
    if capacity <= n_sink + recent:
        raise ValueError(f"capacity {capacity} leaves no evictable slot ({method.name} protects "
                         f"{n_sink} sinks and {recent} recent tokens)")
    return np.array([[min(n, int(capacity)) for n in lengths]] * n_layers, np.int32)


def _local_plan(cfg, token, quantizer, ratio, budget, lengths, n_keep) -> tuple[int | None, ...]:
    """`compress_local`: check what sliding-window layers can take, and set their rows of `n_keep` (in
    place) to the budget of what each window holds (min(length, W) tokens). Returns the windows."""
    windows = tuple(getattr(cfg, "windows", None) or ())
    if not any(windows):
        raise ValueError("compress_local: this model has no sliding-window layers")
    if quantizer is not None:
        raise ValueError("compress_local: sliding-window layers are evicted, not quantized; drop the quantizer "
                         "or compress_local")
    if token.observations().col_sums or token.prefills_itself:
        raise ValueError(f"compress_local: {token.name} needs what sliding-window layers do not gather "
                         "(attention column sums, or its own states); use a window or key scorer (snapkv, "
                         "tova, knorm, expected_attention, ...)")
    for layer, w in enumerate(windows):
        if w:
            n_keep[layer] = resolve_keep(token, methods.Budget(ratio=ratio, tokens=budget),
                                         [min(n, w) for n in lengths], len(windows))[layer]
    return windows


def _has_decode_rule(cls) -> bool:
    try:
        return cls().decode_rule(64) is not None
    except (TypeError, ValueError):  # a method with required parameters (a user's), or a wrapper
        return False


# ------------------------------------------------------------------------------------------ run
def prefill(params, cfg, p: Plan | None, tokens: np.ndarray, lengths: np.ndarray, cache: KVCache, room: int):
    """Prefill right-padded `tokens` int [B, T_pad] (real `lengths` [B]) onto `cache`, then compress
    and quantize under `p`, leaving `room` free slots per row (and head) for decoding (allocated now
    in `DECODE_STEP` steps, not later). Returns (logits float32 [B, V] at each row's last token, cache).

    A prefill method builds its own states (its `build_cache` replaces `cache`, whose batch and
    attention implementation it keeps); a plan with `share` prefills onto a cache of that layout instead."""
    if p is not None and p.share is not None:
        cache = model_cache(cfg, cache.batch, cache.capacity, cache.attention_impl, share=p.share)
    if p is None:
        logits, cache, _ = generation.prefill(params, cfg, tokens, lengths, cache)
        return logits, cache
    if p.chunk:
        return recompress.prefill(params, cfg, p, tokens, lengths, cache.batch, cache.attention_impl, room)
    method = p.method
    if method is not None and method.prefills_itself:
        chunk = min(tokens.shape[1], generation.PREFILL_CHUNK)
        own = method.build_cache(cfg, p, cache.batch, bucket(int(lengths.max()) + room), chunk)
        cache = dataclasses.replace(own, attention_impl=cache.attention_impl)
        logits, cache, _ = generation.prefill(params, cfg, tokens, lengths, cache)
        cache = method.finish(cache, capacities(p, room))
    elif method is not None and method.replays:
        logits, cache, _ = generation.prefill(params, cfg, tokens, lengths, cache)
        cache, obs = replay(params, cfg, p, cache, tokens, lengths)
        cache = _compress_pairs(cache, obs, cfg, p, np.asarray(lengths), room, round_step if room else None)
    else:
        observe = method.observations() if method is not None else None
        logits, cache, obs = generation.prefill(params, cfg, tokens, lengths, cache, observe=observe)
        if method is not None and not (p.decoding and p.ratio is None and p.budget is None):  # not DecodingPress alone
            cache = compress(cache, obs, jnp.asarray(p.n_keep), method=method, cfg=cfg, capacities=capacities(p, room),
                             rolling=p.rolling is not None, local=p.local is not None)
            cache = dataclasses.replace(cache, layers=tuple(  # a paged pool cut to its pages and the room
                layer.shrunk(0, room, round_step) if isinstance(layer, PagedKV) else layer for layer in cache.layers))
    return logits, quantize(cache, p, room, tuple(n + room for n in p.kept(cfg.n_layers, int(lengths.max()))))


def replay(params, cfg, p: Plan, cache: KVCache, tokens: np.ndarray, lengths: np.ndarray):
    """A replaying method's second pass (`EvictionMethod.replays`: KVzip's reconstruction) over a
    prefilled `cache` of rows `tokens` [B, T_pad] / `lengths` [B]: (cache, obs), the cache donated and
    returned with the same content, the observations carrying the method's scores (`LayerObs.replay`)."""
    if p.replay is None:
        raise ValueError(f"{p.method.name} replays the context with the model's chat template: plan it with "
                         "tokenizer= (LM and the eval runner do)")
    return p.method.replay(params, cfg, cache, tokens, lengths, p.replay)


def _compress_pairs(cache: KVCache, obs, cfg, p: Plan, lengths: np.ndarray, room: int, round_up) -> KVCache:
    """Compress under a replaying method: its per-layer pair counts (`layer_pairs`: a global top-k, known
    only after scoring) are selected in pools of the prefill's size, then each pool is cut to its kept
    pairs plus `room` per head (sized by `round_up`; None: exactly)."""
    pairs = p.method.layer_pairs(obs, lengths, methods.Budget(ratio=p.ratio, tokens=p.budget))
    cache = compress(cache, obs, jnp.asarray(pairs), method=p.method, cfg=cfg,
                     capacities=(cache.capacity,) * len(pairs))
    fit = round_up or (lambda c: c)
    return dataclasses.replace(cache, layers=tuple(layer.shrunk(0, room, fit) for layer in cache.layers))


def capacities(p: Plan, room: int) -> tuple[int, ...]:
    """Slots of each layer after eviction: the kept tokens plus the decode room (64-slot steps), or the
    rolling capacity. A quantized cache sizes its store itself (`quantize`), so eviction keeps exactly
    the kept tokens there."""
    if p.rolling is not None:
        return (p.rolling,) * len(p.n_keep)
    grow = room and p.quantizer is None
    return tuple(round_step(int(row.max()) + room) if grow and not (p.local and p.local[layer]) else int(row.max())
                 for layer, row in enumerate(p.n_keep))


def quantize(cache: KVCache, p: Plan | None, room: int, tokens: tuple[int, ...]) -> KVCache:
    """Every state of `cache` stored quantized under `p.quantizer` (unchanged without one); state i
    will hold `tokens[i]` tokens at most (per-head pools: `room` more per head)."""
    if p is None or p.quantizer is None:
        return cache
    if p.check_finite:  # every float array a state holds (keys, values, projections, scores)
        for i, layer in enumerate(cache.layers):
            for path, x in jax.tree_util.tree_leaves_with_path(layer):
                if jnp.issubdtype(x.dtype, jnp.floating):
                    name = jax.tree_util.keystr(path).lstrip(".")
                    quant_ops.check_finite(x, f"layer {i} {dict(k='keys', v='values').get(name, name)}")
    return quantize_states(cache, quantizer=p.quantizer, tokens=tokens, room=room)


@functools.partial(jax.jit, static_argnames=("quantizer", "tokens", "room"))
def quantize_states(cache: KVCache, *, quantizer, tokens: tuple[int, ...], room: int) -> KVCache:
    """`LayerState.quantize` of every state; a state holds at most `tokens[l]` tokens, quantized by
    `quantizer.for_layer(l)`, l its producer layer (`tokens` is per model layer). Sliding-window states
    (`LayerState.sliding`) stay in full precision."""
    layers = tuple(layer if layer.sliding else
                   layer.quantize(quantizer.for_layer(cache.producer(i)), tokens[cache.producer(i)], room)
                   for i, layer in enumerate(cache.layers))
    return dataclasses.replace(cache, layers=layers)


# ------------------------------------------------------------------------------------ training
def forward(params, cfg, tokens, cache: KVCache | None = None, capture: bool = False):
    """The differentiable forward a training step runs (teacher and student passes, features): tokens
    int32 [B, T] fed from position 0 in one call onto `cache` (default: the model's empty cache of T slots,
    `model_cache`; a trained method passes the states it learns, e.g. `latent_cache`), no chunking, no
    padding.

    Returns (logits float32 [B, T, V], cache), plus with `capture` the per-layer token features the model
    sows (`{"layers_i": {"attn": {"qkv": ([B, T, E],)}}}`: what Locret's retaining heads read)."""
    b, t = tokens.shape
    if cache is None:
        cache = model_cache(cfg, b, t)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    model = model_for(cfg)(cfg)
    if not capture:
        return model.apply({"params": params}, tokens, positions, cache)
    (logits, cache), state = model.apply({"params": params}, tokens, positions, cache, mutable=["intermediates"])
    return logits, cache, state["intermediates"]


# ------------------------------------------------------------------------------------ branches
def branch(cache: KVCache, obs, cfg, p: Plan | None, room: int) -> KVCache:
    """A compressed (and quantized) copy of a shared prefill's `cache` (never donated; rows of equal
    length), with `room` free slots per row and head for what is fed on top.

    Eviction runs in the prefill cache's capacity, so `compress` compiles once per (method, length)
    whatever the ratio (`n_keep` is traced); the kept tokens are then cut to the smallest bucketed
    capacity holding the longest layer plus `room`, the same for every layer, so the programs fed on
    top are shared by every method at that capacity."""
    capacity, n_layers = cache.capacity, cfg.n_layers
    if p is None or p.quantizer is None and p.method is None:
        return jax.tree_util.tree_map(jnp.copy, cache)  # a copy: the callers' steps donate their cache
    if p.method is not None and p.method.replays:  # obs: from `replay` on (a copy of) this prefill
        cache = _compress_pairs(cache, obs, cfg, p, np.asarray(cache.next_pos), room, bucket)
    elif p.method is not None:
        caps = tuple(int(p.n_keep[i].max()) if p.local and p.local[i] else capacity for i in range(n_layers))
        cache = compress(cache, obs, jnp.asarray(p.n_keep), method=p.method, cfg=cfg, capacities=caps,
                         local=p.local is not None)
        need = bucket(int(p.n_keep.max()) + room)
        cache = dataclasses.replace(cache, layers=tuple(layer.shrunk(need, room, bucket) for layer in cache.layers))
    return quantize(cache, p, room, (capacity,) * n_layers)


# -------------------------------------------------------------------------------------- memory
def abstract(cfg, p: Plan | None, length: int, batch: int = 1, mesh=None, rules: dict | None = None) -> KVCache:
    """The cache `LM.prefill` builds for `batch` rows of `length` tokens under `p`, as shapes and dtypes
    only (`jax.eval_shape`: nothing is computed or allocated); `cache_nbytes` of it is exact. The plan's
    `n_keep` must be for rows of `length` tokens. With a `mesh` (`kvjax.sharding`), each shape carries
    the sharding `LM.shard(mesh, rules)` gives it: `sharding.bytes_per_device` of it is exact."""
    cache = _abstract(cfg, p, length, batch)
    return cache if mesh is None else sharding.abstract_sharded(cache, mesh, rules)


def _abstract(cfg, p: Plan | None, length: int, batch: int) -> KVCache:
    capacity = bucket(length)
    cache = jax.eval_shape(lambda: model_cache(cfg, batch, capacity, share=None if p is None else p.share))
    if p is None:
        return cache
    method = p.method
    if method is not None and method.prefills_itself:
        chunk = min(capacity, generation.PREFILL_CHUNK)
        cache = jax.eval_shape(lambda: method.finish(method.build_cache(cfg, p, batch, capacity, chunk),
                                                     capacities(p, 0)))
    elif method is not None and method.replays:  # the kept pairs split evenly over the layers: the same bytes
        total = int(method.total_pairs(cfg, length, methods.Budget(ratio=p.ratio, tokens=p.budget)))
        cache = jax.eval_shape(lambda: dataclasses.replace(cache, layers=tuple(
            RaggedKV.init(batch, cfg.n_kv_heads, total // cfg.n_layers + (i < total % cfg.n_layers), cfg.head_dim,
                          cfg.jnp_dtype) for i in range(cfg.n_layers))))
    elif method is not None:
        spec = method.observations()
        lengths = np.full((batch,), length)
        obs = jax.eval_shape(lambda: tuple(init_layer_obs(spec, lengths, cfg.n_heads, cfg.head_dim, capacity,
                                                          cfg.jnp_dtype, d_model=cfg.d_model)
                                           for _ in range(cfg.n_layers)))
        cache = jax.eval_shape(functools.partial(compress, method=method, cfg=cfg, capacities=capacities(p, 0),
                                                 rolling=p.rolling is not None, local=p.local is not None),
                               cache, obs, jnp.asarray(p.n_keep))
    if p.quantizer is not None:
        cache = jax.eval_shape(functools.partial(quantize_states, quantizer=p.quantizer, room=0,
                                                 tokens=p.kept(cfg.n_layers, length)), cache)
    return cache
