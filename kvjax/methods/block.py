"""Block-wise iterative compression (KeyDiff paper, arXiv 2504.15364, Alg. 1): the prompt is read in
blocks, and after each block the cache is cut back to the budget by the scorer. `block:keydiff` is the
KeyDiff paper's method; `block(block_size=64):knorm` works with any scorer that scores from the cached
keys and values alone (no observed queries).

Follows kvpress 0.5.5 `BlockPress` (block_size 128): n_kept = max(1, int(T (1 - ratio))); the first
n_kept tokens are kept, then for each block [i, i + block_size) from i = n_kept the scorer scores the
kept tokens (in the order the previous step's top-k left them, best first) followed by the block, and
the best n_kept become the new kept set. Like kvpress it runs after a full prefill (not a true chunked
prefill). Every row runs its own number of steps inside one `lax.fori_loop` of static shapes.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.methods.base import WRAPPERS, Budget, EvictionMethod, ScoreContext, Wrapper, check_positive, check_wrapped
from kvjax.observe import ObsSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class Block(Wrapper):
    wrapper: ClassVar[str] = "block"
    press: EvictionMethod
    block_size: int = 128

    def __post_init__(self):
        check_wrapped("block", self.press)
        check_positive(block_size=self.block_size)
        if self.press.observations() != ObsSpec():
            raise ValueError(f"block: rescoring a subset of tokens needs a scorer of keys and values alone; "
                             f"{self.press.name} reads prefill observations (queries, attention)")

    def layer_keep(self, budget: Budget, n_tokens: int, layer: int, n_layers: int) -> int:
        return budget.keep(n_tokens)  # kvpress: compute_n_kept, whatever the scorer's own rule

    def decode_rule(self, capacity: int):
        raise ValueError("decode-time eviction (capacity=) is the scorer's: use it without block:")

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        b, n_kv, s = scores.shape
        cap, bs = min(capacity, s), self.block_size  # n_keep <= T <= S
        t = ctx.length  # [B]
        width = cap + bs
        j = jnp.arange(width)[None, None, :]
        nk = n_keep[:, None, None]

        def step(it, kept):  # kept: int32 [B, K, C] slots, the first n_keep of each row in use
            start = n_keep + it * bs  # [B]
            blk = jnp.clip(t - start, 0, bs)[:, None, None]
            idx = jnp.where(j < nk, jnp.pad(kept, [(0, 0), (0, 0), (0, bs)]), start[:, None, None] + j - nk)
            n_cur = nk + blk
            idx = jnp.where(j < n_cur, idx, 0)
            take = lambda x: jnp.take_along_axis(x, idx[..., None], axis=2)  # noqa: E731
            sub = dataclasses.replace(ctx, k=take(ctx.k), v=take(ctx.v), pos=jnp.take_along_axis(ctx.pos, idx, axis=2),
                                      length=(n_cur[:, 0, 0]).astype(jnp.int32))
            sc = jnp.where(j < n_cur, self.press.score(sub).astype(jnp.float32), -jnp.inf)
            top = jax.lax.top_k(sc, cap)[1]  # best first, as torch's topk
            new = jnp.take_along_axis(idx, top, axis=2)
            return jnp.where((blk > 0), new, kept)  # rows past their prompt's end keep their set

        kept = jnp.broadcast_to(jnp.arange(cap, dtype=jnp.int32), (b, n_kv, cap))
        kept = jax.lax.fori_loop(0, -(-s // bs), step, kept)
        chosen = jnp.zeros((b, n_kv, s), jnp.float32)
        live = jnp.arange(cap)[None, None, :] < nk
        chosen = chosen.at[jnp.arange(b)[:, None, None], jnp.arange(n_kv)[None, :, None], kept].max(
            live.astype(jnp.float32))
        return state.keep_top(chosen, n_keep, capacity)


WRAPPERS["block"] = Block
