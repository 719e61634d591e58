"""Compression while the cache fills, for any plain score method: after every prefill chunk (chunked
compression, a bounded prefill) and every `compression_interval` decode steps inside the jitted decode loop
(decode-time compression).

**Chunked compression** (`chunked_compression=` / `--chunked-compression`; the memory bound of Locret,
Huang et al. 2024, arXiv 2410.01805, with kvpress's ChunkPress idea of scoring each chunk with that chunk's
own queries). The prompt is fed in chunks of `chunk` tokens onto a dense cache of
`max(n_keep) + chunk` slots. After chunk i every layer scores what it holds (earlier survivors and the
chunk) with the method's own scorer and that chunk's observations (its last `window` queries, its
column sums, its query statistics), and keeps its top `keep(t_i)` per KV head, `t_i` the tokens seen so
far and `keep` the request's budget rule (`layer_keep`: ratio -> int(t_i (1 - ratio)), budget ->
min(t_i, budget)). So no layer and head ever holds more than `budget + chunk` tokens, and the final cache
holds exactly as many tokens as compress-after-prefill would; later chunks attend to the compressed
earlier ones (Locret's approximation), which is where quality can differ. kvpress's `ChunkPress` instead
prefills the full prompt and compresses each chunk independently, so it bounds nothing at prefill time.

**Decode-time compression** (`decoding=DecodeCompression(...)` / `--compression-interval`; kvpress
0.5.5 `DecodingPress`, `CompressionRatioDecodingPress`, and with ratio= / budget= for the prompt
`PrefillDecodingPress`). The decode loop counts the tokens it feeds; when the count reaches
`compression_interval` (after that token's forward, as kvpress's forward hook does), every layer
re-scores its whole cache (prompt and generated tokens) and keeps its top `target_size` tokens per KV head
(`target_compression_ratio`: max(1, int(seen (1 - r))), seen = the row's tokens so far), and the count
restarts. The scorer's observations come from the last `min(compression_interval,
hidden_states_buffer_size + 1)` decode steps before the compression (kvpress's buffer of hidden states,
trimmed to `hidden_states_buffer_size` after each step and cleared at each compression). Everything runs in
the one `lax.while_loop`: the dense cache has `max(kept) + compression_interval` slots, a compression is a
`lax.cond` around `kvjax.compress.compress` with the same capacity.
Differences from kvpress: queries are rotated at their own positions (kvpress rotates every buffered
query at the current token's position); every layer keeps the same `target_size` (kvpress passes a ratio
to the base press, which PyramidKV-style rules would split per layer); kvpress's extra trigger
`q_len >= target_size` never fires for a decode step with target_size > 1, and is not modelled.

Methods: plain score methods on a dense cache (their kept set is the per-head top-k of `score`: SnapKV,
PyramidKV, TOVA, KNorm, ExpectedAttention, ObservedAttention, StreamingLLM, ...), whose observations
are per chunk or per step (not CriticalKV's value norms or NonCausalAttention's blocks, which read slot =
position). Every error is a one-line ValueError raised while planning, before any compile.

Legend: B batch, L layers, K KV heads, C slots, T prompt tokens, W the scorer's query window.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import generation
from kvjax.compress import compress, resolve_keep
from kvjax.methods.base import Budget, EvictionMethod
from kvjax.models import model_for
from kvjax.observe import init_layer_obs
from kvjax.shapes import PREFILL_CHUNK, round_step
from kvjax.states.cache import model_cache

OBSERVED = ("window", "col_sums", "qstats_from")  # observations gathered per chunk / per step


@dataclasses.dataclass(frozen=True)
class DecodeCompression:
    """kvpress 0.5.5 `DecodingPress` parameters (and `CompressionRatioDecodingPress`'s ratio).

    Attributes:
      compression_interval: decode steps between compressions (kvpress default 512).
      target_size: tokens each layer keeps per KV head after a compression (kvpress default 2048; None:
        2048, or the ratio's).
      hidden_states_buffer_size: decode steps before a compression whose observations score it, minus one
        (kvpress: the buffer is trimmed to this size after each step, and the step that compresses is
        appended first; default 256).
      target_compression_ratio: keep max(1, int(seen (1 - r))) of the `seen` tokens so far instead of a
        fixed `target_size` (`CompressionRatioDecodingPress`).
    """

    compression_interval: int = 512
    target_size: int | None = None
    hidden_states_buffer_size: int = 256
    target_compression_ratio: float | None = None

    def __post_init__(self):
        for name in ("compression_interval", "hidden_states_buffer_size") + (
                ("target_size",) if self.target_size is not None else ()):
            v, low = getattr(self, name), 0 if name == "hidden_states_buffer_size" else 1
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        r = self.target_compression_ratio
        if r is not None:
            if self.target_size is not None:
                raise ValueError("give target_size= or target_compression_ratio=, not both")
            if not isinstance(r, (int, float, np.floating)) or isinstance(r, bool) or not 0 <= r < 1:
                raise ValueError(f"target_compression_ratio must be in [0, 1), got {r!r}")

    @property
    def size(self) -> int:
        return 2048 if self.target_size is None else int(self.target_size)

    @property
    def observed(self) -> int:
        """Decode steps whose observations score a compression: kvpress's buffer at that step."""
        return min(self.compression_interval, self.hidden_states_buffer_size + 1)

    def target(self, seen: int) -> int:
        """Tokens kept per KV head after a compression, for a row that has seen `seen` tokens (host-side)."""
        r = self.target_compression_ratio
        return self.size if r is None else max(1, int(seen * (1 - r)))

    def target_traced(self, seen: jax.Array) -> jax.Array:
        """`target` of int32 [B] rows inside jit (float32 arithmetic)."""
        r = self.target_compression_ratio
        if r is None:
            return jnp.full_like(seen, self.size)
        return jnp.maximum(jnp.floor(seen.astype(jnp.float32) * np.float32(1 - r)).astype(jnp.int32), 1)


# ------------------------------------------------------------------------------------ planning
def check_method(token: EvictionMethod, cfg, what: str) -> None:
    """One-line ValueError unless `token` can re-score a dense cache as it fills (`what`: the option)."""
    if not token.plain_scorer() or token.replays or token.own_budget:
        raise ValueError(f"{what} re-scores a dense cache with a plain score method; {token.name} builds its own "
                         "layout or budget (use snapkv, pyramidkv, tova, knorm, expected_attention, ...)")
    if getattr(cfg, "kv_layout", "dense") != "dense":
        raise ValueError(f"{what} applies to a dense K/V cache; this model's layout is {cfg.kv_layout!r}")
    spec = token.observations()
    if any(getattr(spec, f.name) != f.default for f in dataclasses.fields(spec) if f.name not in OBSERVED):
        raise ValueError(f"{what}: {token.name} observes by slot = position (value norms, non-causal blocks), "
                         "which compression moves; use a window, column-sum or key scorer")


def chunk_size(chunked) -> int | None:
    """The chunk of `chunked_compression=` (True: the prefill chunk, an int: that many tokens)."""
    if chunked is None or chunked is False:
        return None
    if chunked is True:
        return PREFILL_CHUNK
    if not isinstance(chunked, (int, np.integer)) or chunked < 1:
        raise ValueError(f"chunked compression: the chunk size must be a positive integer, got {chunked!r}")
    return int(chunked)


def chunk_keeps(token: EvictionMethod, budget: Budget, lengths, n_layers: int, chunk: int) -> np.ndarray:
    """int32 [n_chunks, L, B] tokens each layer keeps per row and KV head after each chunk (host-side):
    the budget rule at the tokens seen so far (raises resolve_keep's error where it falls below the
    method's protected window)."""
    lengths = np.asarray(lengths, np.int64)
    keeps = []
    for i in range(-(-int(lengths.max()) // chunk)):
        try:
            keeps.append(resolve_keep(token, budget, np.minimum(lengths, (i + 1) * chunk), n_layers))
        except ValueError as e:
            raise ValueError(f"chunked compression keeps the budget of the tokens seen so far, and after chunk "
                             f"{i + 1} ({min(int(lengths.min()), (i + 1) * chunk)} tokens) {e}; use a larger "
                             f"chunk or a smaller ratio") from None
    return np.stack(keeps)


def check_chunk(token: EvictionMethod, chunk: int) -> None:
    w = token.observations().window
    if chunk < w:
        raise ValueError(f"chunked compression: chunk of {chunk} tokens is shorter than {token.name}'s query "
                         f"window ({w}); use a chunk of at least {w}")


def check_decoding(token: EvictionMethod, d: DecodeCompression, first_seen: int) -> None:
    """One-line errors of a decode-time compression request (`first_seen`: the shortest row's tokens at the
    first compression)."""
    need = token.protected()
    low = d.target(first_seen)
    if low < need:
        raise ValueError(f"decode-time compression keeps {low} tokens but {token.name} always keeps {need} "
                         f"(window/sinks): give target_size >= {need}")
    w = token.observations().window
    if d.observed < w:
        raise ValueError(f"decode-time compression scores with the last {d.observed} decode steps "
                         f"(min(compression_interval, hidden_states_buffer_size + 1)) but {token.name}'s query "
                         f"window is {w}: raise them to at least {w}")


# --------------------------------------------------------------------------------- chunked prefill
def prefill(params, cfg, p, tokens: np.ndarray, lengths: np.ndarray, batch: int, impl: str, room: int):
    """`pipeline.prefill` under chunked compression (`p.chunk` tokens per chunk, `p.chunk_keep` kept after
    each): (logits [B, V], cache) on a new cache of `slots_for(p)` slots per layer, compressed after every
    chunk (module docstring), then laid out with `room` free slots per row."""
    method, chunk, keeps = p.method, p.chunk, p.chunk_keep
    slots = slots_for(p)
    cache = model_cache(cfg, batch, slots, impl)
    t_pad = keeps.shape[0] * chunk
    tokens = np.pad(tokens, [(0, 0), (0, max(0, t_pad - tokens.shape[1]))])[:, :t_pad]
    spec = method.observations()
    last, obs = jnp.zeros((batch, cfg.vocab_size), jnp.float32), None
    for i in range(keeps.shape[0]):
        start = i * chunk
        n_valid = np.clip(lengths - start, 0, chunk).astype(np.int32)
        obs = next_obs(cfg, spec, cache, start + n_valid, obs, jnp.asarray(n_valid))
        last, cache, obs = generation.prefill_chunk(params, jnp.asarray(tokens[:, start:start + chunk], jnp.int32),
                                                    jnp.asarray(n_valid), cache, last, obs, cfg=cfg, observe=spec)
        cache = compress_in_place(cache, obs, jnp.asarray(keeps[i]), method=method, cfg=cfg,
                                  capacities=(slots,) * cfg.n_layers)
    need = round_step(int(p.n_keep.max()) + room) if room else int(p.n_keep.max())
    return last, dataclasses.replace(cache, layers=tuple(resized(layer, need) for layer in cache.layers))


# `compress` with the cache donated: the chunked prefill never reads it again (7 % less peak at 4k, measured)
compress_in_place = jax.jit(compress.__wrapped__, static_argnames=("method", "cfg", "capacities", "rolling", "local"),
                            donate_argnames=("cache",))


def resized(layer, slots: int):
    """A dense state in exactly `slots` slots (its tokens fit); sliding-window states as they are."""
    if layer.sliding:
        return layer
    return layer.shrunk(slots) if layer.capacity >= slots else layer.with_capacity(slots)


def next_obs(cfg, spec, cache, seen, prev, n_new):
    """Observations for a chunk ending at `seen` int32 [B]: empty, except the window queries the previous
    chunk's observations `prev` hold at positions still in the new window (a chunk of `n_new` [B] tokens
    shorter than the window: the prompt's last chunk)."""
    obs = fresh_obs(cfg, spec, cache, seen)
    if prev is None or not spec.window:
        return obs
    idx = jnp.arange(spec.window)[None, :] + n_new[:, None]  # [B, W] index of each new window position in prev
    here = (idx < spec.window)[:, :, None, None]
    carry = lambda new, old: dataclasses.replace(new, q_win=jnp.where(here, jnp.take_along_axis(  # noqa: E731
        old.q_win, jnp.minimum(idx, spec.window - 1)[:, :, None, None], axis=1), new.q_win))
    return tuple(carry(new, old) for new, old in zip(obs, prev))


def slots_for(p) -> int:
    """Slots per layer while prefilling under chunked compression: the most any chunk keeps plus a chunk."""
    return int(p.chunk_keep.max()) + p.chunk


def fresh_obs(cfg, spec, cache, seen):
    """Empty observations for the tokens up to `seen` int32 [B] (the window: the last W before it)."""
    return tuple(init_layer_obs(spec, seen, cfg.n_heads, cfg.head_dim, cache.layers[cache.state_index(i)].capacity,
                                cfg.jnp_dtype) for i in range(cfg.n_layers))


# ----------------------------------------------------------------------------------- decoding
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCarry:
    """What decode-time compression carries through the decode loop (and across `decode` calls):
    obs: each layer's observations since the last compression; count: int32 [] tokens fed since it."""

    obs: tuple
    count: jax.Array


@dataclasses.dataclass(frozen=True)
class Compressor:
    """The static half of decode-time compression (a `generation.decode` argument): the method, the
    request and the cache's slots per layer."""

    method: EvictionMethod
    decoding: DecodeCompression
    slots: int

    def init(self, cfg, cache) -> DecodeCarry:
        return DecodeCarry(obs=self._obs(cfg, cache), count=jnp.zeros((), jnp.int32))

    def _obs(self, cfg, cache):
        # the window: the last W tokens fed before the next compression
        return fresh_obs(cfg, self.method.observations(), cache, cache.next_pos + self.decoding.compression_interval)

    def step(self, params, cfg, token, cache, active, carry: DecodeCarry):
        """Feed `token` int32 [B] (rows with `active` 0 keep nothing), gathering observations on the buffered
        steps, then compress if the interval is reached. Returns (logits [B, 1, V], cache, carry)."""
        d = self.decoding
        count = carry.count + 1
        model = model_for(cfg)(cfg, observe=self.method.observations())
        logits, cache, obs = model.apply({"params": params}, token[:, None], cache.next_pos[:, None], cache, active,
                                         None, carry.obs)
        buffered = count > d.compression_interval - d.observed
        obs = jax.tree_util.tree_map(lambda new, old: jnp.where(buffered, new, old), obs, carry.obs)

        def squeeze(args):
            cache, _ = args
            target = d.target_traced(cache.next_pos)  # [B]
            n_keep = jnp.stack([jnp.minimum(cache.layers[cache.state_index(i)].length, target)
                                for i in range(cfg.n_layers)])
            cache = compress(cache, obs, n_keep, method=self.method, cfg=cfg, capacities=(self.slots,) * cfg.n_layers)
            return cache, self._obs(cfg, cache)

        due = count >= d.compression_interval
        cache, obs = jax.lax.cond(due, squeeze, lambda args: args, (cache, obs))
        return logits, cache, DecodeCarry(obs=obs, count=jnp.where(due, 0, count))


def decode_slots(p, longest: int, max_new_tokens: int) -> int:
    """Slots per layer for decoding under `p.decoding`: the most a layer holds before a compression."""
    d = p.decoding
    held = max(int(p.n_keep.max()), d.target(longest + max_new_tokens))
    return round_step(held + d.compression_interval)


def first_compression_seen(lengths, d: DecodeCompression) -> int:
    return int(min(lengths)) + d.compression_interval


