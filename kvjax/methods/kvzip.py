"""KVzip (Kim et al. 2025, arXiv 2505.23416): query-agnostic eviction by context reconstruction.

After the prefill, the model is asked to repeat its context: a replay prompt ("Repeat the previous
context exactly." in the model's chat frame, then the context itself) is fed on top of the prefilled
cache, `chunk_size` context tokens at a time. A cached (KV head, token) pair's importance is the largest
attention it receives from the replay queries (max over the queries and over the query heads of its
group); the `n_sink` first tokens are always kept. With `layerwise=False` one top-k runs over every
layer's pairs together, so layers (and the KV heads within a layer) keep different numbers of tokens;
each layer's kept pairs go to a `RaggedKV` pool. The compressed cache does not depend on any question,
so one compression answers every later one.

Follows kvpress 0.5.5 `KVzipPress` (defaults layerwise=False, n_sink=4, chunk_size=2048):
* replay prompt of chunk i: "\\n\\nRepeat the previous context exactly." (i = 0) or "\\n\\nRepeat the part
  of the previous context exactly, starting with" + the previous chunk's last 8 tokens, then the text
  after the user message in the chat template (assistant header; "\\n" without a template), then the
  chunk. Chunks cut the context after the chat template's prefix (the text before the user message),
  whose tokens are never reconstructed and score 0 (sinks aside);
* replay tokens sit at positions T, T + 1, ... (every chunk: the cache is rewound after each);
* a replay query's softmax runs over its key set only: min(n_sink, start) sinks, the chunk's keys
  and the replay tokens (causal), logits q.k / sqrt(D);
* the sinks score above everything (kvpress: max + 1); the lowest int(L K T ratio) pairs over all layers
  are evicted (`layerwise`: int(K T ratio) per layer), then each layer keeps its top pairs over its heads.

Differences, on purpose: kvpress masks evicted keys (no memory saved); here the kept pairs are the only
ones stored. `budget=` (tokens per layer and head) keeps L K budget pairs in all (kvpress has only a ratio).
kvzip_plus_normalization (KVzip+, ||h||-normalized rows and ||v W_o||-weighted columns) is not built.

Legend: B batch, L layers, K KV heads, G = H/K, S slots, T prompt tokens, R replay tokens (padded).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import generation
from kvjax.methods.adakv import in_capacity, top_pairs
from kvjax.methods.base import Budget, EvictionMethod, ScoreContext, register
from kvjax.observe import ObsSpec, ReplaySpec, init_layer_obs
from kvjax.shapes import PREFILL_CHUNK, bucket
from kvjax.states.dense import DenseKV

FIRST = "\n\nRepeat the previous context exactly."
LATER = "\n\nRepeat the part of the previous context exactly, starting with"
PREV_POSTFIX = 8  # tokens of the previous chunk that start a later chunk's prompt (kvpress prev_postfix_size)
SINK_SCORE = 2.0  # above any attention probability: the sinks are always kept


@dataclasses.dataclass(frozen=True)
class ReplayPrompt:
    """The tokenizer's pieces of a replay prompt: `prefix` tokens of the chat template before the user
    message (not reconstructed), the ids of `FIRST`, `LATER` and of the text after the user message."""

    prefix: int
    first: tuple[int, ...]
    later: tuple[int, ...]
    suffix: tuple[int, ...]


@register("kvzip")
@dataclasses.dataclass(frozen=True, kw_only=True)
class KVzip(EvictionMethod):
    layerwise: bool = False  # True: every layer keeps the same number of pairs (kvpress's uniform ratio)
    n_sink: int = 4
    kvzip_plus_normalization: bool = False
    chunk_size: int = 2048  # context tokens reconstructed per replay pass
    replays = True

    def __post_init__(self):
        for name in ("n_sink", "chunk_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "chunk_size" else 0):
                raise ValueError(f"kvzip: {name} must be an integer >= {1 if name == 'chunk_size' else 0}, got {v!r}")
        for name in ("layerwise", "kvzip_plus_normalization"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"kvzip: {name} must be True or False, got {getattr(self, name)!r}")
        if self.kvzip_plus_normalization:
            raise ValueError("kvzip: kvzip_plus_normalization (KVzip+) is not available in kvjax; use the default "
                             "(False)")

    def observations(self) -> ObsSpec:
        return ObsSpec()  # nothing from the prefill: the scores come from the replay

    def protected(self) -> int:
        return self.n_sink

    def importance(self, replay: jax.Array) -> jax.Array:
        """float32 [B, K, S]: the reconstruction attention, the sinks (slots < n_sink of a dense prefill,
        slot = position) above everything."""
        return jnp.where(jnp.arange(replay.shape[2]) < self.n_sink, SINK_SCORE, replay)

    def score(self, ctx: ScoreContext) -> jax.Array:
        if ctx.obs.replay is None or ctx.obs.replay.shape[2] != ctx.k.shape[2]:
            raise ValueError("kvzip scores come from its replay pass: use it through LM.prefill / LM.generate "
                             "or the eval runner (kvjax.pipeline), not on a plain prefill's observations")
        return self.importance(ctx.obs.replay)

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        """The layer's top `n_keep` [B] (KV head, token) pairs over all heads (kvpress: bottom-k across
        heads), in a `RaggedKV` pool of K * capacity slots."""
        state, scores = in_capacity(state, scores, capacity)
        return top_pairs(state, scores, n_keep, state.k.shape[1] * capacity)

    # ------------------------------------------------------------------------------- the replay
    def replay_prompt(self, tokenizer) -> ReplayPrompt:
        """The replay prompt's pieces in `tokenizer`'s ids (its chat template, as kvpress reads it)."""
        before, after = tokenizer.chat_frame()
        ids = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
        return ReplayPrompt(prefix=len(ids(before)), first=ids(FIRST), later=ids(LATER), suffix=ids(after))

    def replay(self, params, cfg, cache, tokens: np.ndarray, lengths: np.ndarray, prompt: ReplayPrompt):
        """Reconstruct the prefilled context chunk by chunk on top of `cache` (dense states of rows of
        `lengths` [B] tokens, the ids right-padded in `tokens` [B, T_pad]); the cache is rewound after
        every chunk. Returns (cache, obs: a `LayerObs` per layer whose `replay` [B, K, S] holds the
        reconstruction attention of every slot)."""
        if not all(isinstance(layer, DenseKV) for layer in cache.layers) or cache.share is not None:
            raise ValueError("kvzip replays on a fresh dense prefill (one DenseKV per layer)")
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, np.int32)
        b, cs = len(lengths), self.chunk_size
        context = [tokens[r, prompt.prefix:lengths[r]] for r in range(b)]  # what is reconstructed, per row
        n_chunks = max(1, max(-(-len(c) // cs) for c in context))
        width = min(cs, max(1, max(len(c) for c in context)))
        r_pad = bucket(max(len(prompt.first), len(prompt.later) + PREV_POSTFIX) + len(prompt.suffix) + width)
        spec = ObsSpec(replay=ReplaySpec(sink=self.n_sink, chunk=width, length=r_pad))
        cache = cache.with_room(r_pad, bucket)
        obs = tuple(init_layer_obs(spec, lengths, cfg.n_heads, cfg.head_dim, layer.capacity, cfg.jnp_dtype,
                                   cfg.n_kv_heads) for layer in cache.layers)
        chunk = min(r_pad, PREFILL_CHUNK)
        last = jnp.zeros((b, cfg.vocab_size), jnp.float32)
        for i in range(n_chunks):
            ids, n_valid, span = np.zeros((b, r_pad), np.int32), np.zeros(b, np.int32), np.zeros((b, 3), np.int32)
            for r, ctx in enumerate(context):
                part = ctx[i * cs:(i + 1) * cs]
                if i and not len(part):
                    continue  # this row has fewer chunks
                head = prompt.first if i == 0 else prompt.later + tuple(ctx[(i - 1) * cs:i * cs][-PREV_POSTFIX:])
                seq = np.concatenate([np.asarray(head + prompt.suffix, np.int32), part])
                ids[r, :len(seq)], n_valid[r] = seq, len(seq)
                start = prompt.prefix + i * cs
                span[r] = (min(self.n_sink, start), start, start + len(part))
            obs = tuple(dataclasses.replace(o, span=jnp.asarray(span)) for o in obs)
            for s0 in range(0, int(n_valid.max()), chunk):
                width = min(chunk, bucket(int(n_valid.max()) - s0))  # the last call: no more padding than needed
                part_valid = np.clip(n_valid - s0, 0, width).astype(np.int32)
                _, cache, obs = generation.prefill_chunk(params, jnp.asarray(ids[:, s0:s0 + width]),
                                                         jnp.asarray(part_valid), cache, last, obs, cfg=cfg,
                                                         observe=spec)
            cache = _rewind(cache, jnp.asarray(lengths))
        return cache, obs

    def layer_pairs(self, obs, lengths, budget: Budget) -> np.ndarray:
        """int32 [L, B]: (KV head, token) pairs each layer keeps per row, from the replay's `obs`."""
        lengths = np.asarray(lengths, np.int64)
        n_layers, n_kv = len(obs), obs[0].replay.shape[1]
        pruned = np.array([self.pruned(n_layers, n_kv, int(n), budget) for n in lengths], np.int64)
        if self.layerwise:
            return np.broadcast_to(n_kv * lengths - pruned, (n_layers, len(lengths))).astype(np.int32)
        scores = jnp.stack([self.importance(o.replay) for o in obs])  # [L, B, K, S]
        dropped = np.asarray(_pruned_per_layer(scores, jnp.asarray(lengths, jnp.int32), jnp.asarray(pruned, jnp.int32)))
        return (n_kv * lengths[None, :] - dropped).astype(np.int32)

    def pruned(self, n_layers: int, n_kv: int, n: int, budget: Budget) -> int:
        """Pairs a row of `n` tokens loses over all layers (`layerwise`: in each layer). kvpress: the
        lowest int(L K T ratio) importances (int(K T ratio) per layer); `budget=` tokens keeps
        L K min(T, budget) pairs (K min(T, budget) per layer)."""
        per = 1 if self.layerwise else n_layers
        if budget.ratio is not None:
            return int(per * n_kv * n * budget.ratio)
        return per * n_kv * (n - min(n, budget.tokens))

    def total_pairs(self, cfg, n: int, budget: Budget) -> int:
        """Pairs a row of `n` tokens keeps over all layers (whatever the scores)."""
        lost = self.pruned(cfg.n_layers, cfg.n_kv_heads, n, budget)
        return cfg.n_layers * cfg.n_kv_heads * n - (cfg.n_layers * lost if self.layerwise else lost)


@jax.jit
def _rewind(cache, lengths):
    """The cache as it was before a replay chunk: rows of `lengths` [B] tokens (the replay's K/V stay in
    slots past them, which no query sees and the next chunk overwrites)."""
    layers = tuple(dataclasses.replace(layer, length=lengths) for layer in cache.layers)
    return dataclasses.replace(cache, layers=layers, next_pos=lengths)


@jax.jit
def _pruned_per_layer(scores, lengths, n_pruned):
    """int32 [L, B]: how many of each row's `n_pruned` [B] lowest scores (over every layer, head and used
    slot of scores [L, B, K, S] together) fall in each layer."""
    n_layers, b, n_kv, s = scores.shape
    used = jnp.arange(s) < lengths[None, :, None, None]
    flat = jnp.where(used, scores, jnp.inf).transpose(1, 0, 2, 3).reshape(b, -1)
    order = jnp.argsort(flat, axis=1, stable=True)
    dropped = jnp.zeros(flat.shape, bool).at[jnp.arange(b)[:, None], order].set(
        jnp.arange(flat.shape[1])[None, :] < n_pruned[:, None])
    return dropped.reshape(b, n_layers, n_kv * s).sum(-1).T.astype(jnp.int32)
