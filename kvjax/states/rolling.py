"""`RollingKV`: a dense layer state of fixed capacity C that evicts one token per head whenever a new
token would overflow it (decode-time eviction: `generate(..., method=..., capacity=C)`).

The new token is written into the evicted slot, so shapes never change and everything stays inside
the jitted `lax.while_loop`. Slots are not in position order after the first eviction; attention
masks by stored positions, so order does not matter. Rules (`rule`, static):

* "streaming" (StreamingLLM, Xiao et al. 2023): evict the oldest token that is not one of the
  `n_sink` first positions.
* "h2o" (Zhang et al. 2023): evict the token with the least attention accumulated over all steps so
  far (prefill column sums, then each decode query's attention, mean over the KV group), never one of
  the `recent` latest positions of the sequence.
* "tova" (Oren et al. 2024): evict the token the newest query attended to least (mean over all
  heads; one choice shared by every KV head).

Legend: B batch, K KV heads, C capacity, D head dim, H query heads, G = H/K.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.attention import blockwise_attention
from kvjax.states.base import EMPTY_POS, LayerState
from kvjax.states.dense import DenseKV

RULES = ("streaming", "h2o", "tova")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RollingKV(LayerState):
    """Attributes:
      k, v: [B, K, C, D]; pos: int32 [B, K, C] original positions; length: int32 [B] slots in use.
      score: float32 [B, K, C] the rule's keep-score of each slot (unused by "streaming").
      rule, n_sink, recent: static eviction rule and its protected tokens.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    score: jax.Array
    rule: str = dataclasses.field(metadata=dict(static=True), default="streaming")
    n_sink: int = dataclasses.field(metadata=dict(static=True), default=4)
    recent: int = dataclasses.field(metadata=dict(static=True), default=0)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype, rule: str = "streaming",
             n_sink: int = 4, recent: int = 0) -> "RollingKV":
        shape = (batch, n_kv_heads, capacity)
        return cls(k=jnp.zeros(shape + (head_dim,), dtype), v=jnp.zeros(shape + (head_dim,), dtype),
                   pos=jnp.full(shape, EMPTY_POS, jnp.int32), length=jnp.zeros((batch,), jnp.int32),
                   score=jnp.zeros(shape, jnp.float32), rule=rule, n_sink=n_sink, recent=recent)

    def has_room(self, n: int = 1) -> jax.Array:
        return jnp.asarray(True)  # never full: it evicts instead

    def victim(self, newest) -> jax.Array:
        """int32 [B, K]: the slot each head evicts next under the rule; `newest` int32 [B] is the
        sequence's latest position (the recent window is counted from it, not from what a head holds)."""
        if self.rule == "streaming":
            key = jnp.where(self.pos < self.n_sink, jnp.inf, self.pos.astype(jnp.float32))
        else:
            key = jnp.where(self.pos > (newest[:, None, None] - self.recent), jnp.inf, self.score)
        return jnp.argmin(key, axis=2).astype(jnp.int32)

    def append(self, k, v, pos, n_valid, features=None) -> "RollingKV":
        """Write one new token per row (T = 1), first evicting a token of every head if the row is full.

        k, v: [B, K, 1, D]; pos: int32 [B, 1]; n_valid: int32 [B] (0: the row is done, nothing kept).
        """
        if k.shape[2] != 1:
            raise ValueError("a capacity-bounded cache takes one token per step (decode); prefill first")
        b, n_kv = k.shape[:2]
        full = (self.length >= self.capacity)[:, None]  # [B, 1]
        slot = jnp.where(full, self.victim(pos[:, 0] - 1), jnp.minimum(self.length, self.capacity - 1)[:, None])
        rows, heads = jnp.arange(b)[:, None], jnp.arange(n_kv)[None, :]
        write = lambda buf, new: buf.at[rows, heads, slot].set(new.astype(buf.dtype))  # noqa: E731
        live = (n_valid > 0)[:, None]
        keep_old = lambda buf, new: jnp.where(live.reshape((b, 1) + (1,) * (buf.ndim - 2)), new, buf)  # noqa: E731
        new = dataclasses.replace(
            self, k=write(self.k, k[:, :, 0]), v=write(self.v, v[:, :, 0]),
            pos=write(self.pos, jnp.broadcast_to(pos[:, :1], (b, n_kv))),
            score=write(self.score, jnp.zeros((b, n_kv), jnp.float32)),
            length=jnp.minimum(self.length + n_valid.astype(jnp.int32), self.capacity))
        # a finished row's token must not evict anything: keep its old arrays
        return dataclasses.replace(new, k=keep_old(self.k, new.k), v=keep_old(self.v, new.v),
                                   pos=keep_old(self.pos, new.pos), score=keep_old(self.score, new.score))

    def attend_jnp(self, q, q_pos, block=None, return_lse: bool = False):
        return blockwise_attention(q, q_pos, self.k, self.v, self.pos, self.length, None, return_lse)

    # the dense kernels: slots are in no order, but a decode query sees every used one
    attend_kernel = DenseKV.attend_kernel

    def observe_query(self, q, q_pos) -> "RollingKV":
        """Fold the newest query's attention (q [B, 1, H, D]) into the scores the rule evicts by."""
        if self.rule == "streaming":
            return self
        b, _, h, d = q.shape
        n_kv = self.k.shape[1]
        qg = q[:, 0].reshape(b, n_kv, h // n_kv, d).astype(jnp.float32) * (d ** -0.5)
        sc = jnp.einsum("bkgd,bksd->bkgs", qg, self.k.astype(jnp.float32))
        used = (jnp.arange(self.capacity)[None, :] < self.length[:, None])[:, None, None, :]
        visible = used & (self.pos[:, :, None, :] <= q_pos[:, :1, None, None])
        p = jax.nn.softmax(jnp.where(visible, sc, -jnp.inf), axis=-1)  # [B, K, G, C]
        if self.rule == "h2o":
            return dataclasses.replace(self, score=self.score + p.mean(2))
        shared = jnp.broadcast_to(p.mean(axis=(1, 2))[:, None, :], self.score.shape)  # tova: all heads
        return dataclasses.replace(self, score=shared)

    def positions(self) -> jax.Array:
        return self.pos
