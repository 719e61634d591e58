"""ChunkKV (Liu et al. 2025, arXiv 2502.00299): keep whole chunks of consecutive tokens, so kept text stays
readable. A wrapper around any plain scorer: `chunkkv:snapkv`, `chunkkv(chunk_length=10):keydiff`.

Follows kvpress 0.5.5 `ChunkKVPress` (chunk_length 20): the scorer's scores summed over the KV heads,
averaged over each aligned chunk (the last, partial chunk over its own tokens); the best
max(1, int(n_chunks (1 - ratio))) chunks are kept, the same tokens in every KV head, so a layer keeps
n_chunks_kept * chunk_length tokens, or fewer when the partial chunk is among them. A prompt shorter
than one chunk falls back to the scorer's own top-k. With `budget=N` tokens, max(1, N // chunk_length)
chunks are kept. The budget rule of the scorer (PyramidKV's) is not used, as in kvpress.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.methods.base import WRAPPERS, Budget, EvictionMethod, ScoreContext, Wrapper, check_positive, check_wrapped


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChunkKV(Wrapper):
    wrapper: ClassVar[str] = "chunkkv"
    press: EvictionMethod
    chunk_length: int = 20

    def __post_init__(self):
        check_wrapped("chunkkv", self.press)
        check_positive(chunk_length=self.chunk_length)

    def protected(self) -> int:
        return 0  # chunks are chosen by score; kvpress protects nothing more

    def layer_keep(self, budget: Budget, n_tokens: int, layer: int, n_layers: int) -> int:
        """Slots the layer needs: the kept chunks' tokens (the partial chunk counted whole)."""
        c = self.chunk_length
        if n_tokens < c:  # kvpress: the scorer's own compress
            return self.press.layer_keep(budget, n_tokens, layer, n_layers)
        n_chunks = -(-n_tokens // c)
        kept = (max(1, int(n_chunks * (1 - budget.ratio))) if budget.ratio is not None
                else max(1, budget.tokens // c))
        return min(n_tokens, kept * c)

    def decode_rule(self, capacity: int):
        raise ValueError("decode-time eviction (capacity=) evicts single tokens: use the scorer without chunkkv:")

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        c = self.chunk_length
        b, _, s = scores.shape
        t = ctx.length  # [B]
        slot = jnp.arange(s)
        used = slot[None, :] < t[:, None]  # [B, S]
        chunk = slot // c  # the partial chunk's tokens have id n_complete
        total = jnp.where(used, scores.sum(1), 0.0)  # [B, S] summed over KV heads
        n_chunks_max = -(-s // c)
        one_hot = chunk[:, None] == jnp.arange(n_chunks_max)[None, :]  # [S, N]
        size = jnp.einsum("bs,sn->bn", used.astype(jnp.float32), one_hot.astype(jnp.float32))
        mean = jnp.einsum("bs,sn->bn", total, one_hot.astype(jnp.float32)) / jnp.maximum(size, 1.0)
        mean = jnp.where(size > 0, mean, -jnp.inf)  # [B, N]
        n_chunks = -(-n_keep // c)  # n_keep = kept chunks * c (clipped to T)
        rank = jnp.argsort(jnp.argsort(-mean, axis=-1), axis=-1)
        kept_chunk = rank < n_chunks[:, None]  # [B, N]
        kept = used & kept_chunk[jnp.arange(b)[:, None], chunk[None, :]]  # [B, S]
        fallback = t < c  # shorter than one chunk: the scorer's own top-k
        token_scores = jnp.where(fallback[:, None, None], scores, kept[:, None, :].astype(jnp.float32))
        n = jnp.where(fallback, n_keep, kept.sum(-1)).astype(jnp.int32)
        return state.keep_top(token_scores, n, capacity)


WRAPPERS["chunkkv"] = ChunkKV
