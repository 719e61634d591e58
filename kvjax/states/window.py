"""`WindowKV`: the layer state of a sliding-window (local) attention layer: a ring buffer of the last W
tokens, W slots of real bytes whatever the sequence length (Gemma 3's local layers: W = 512; Beltagy
et al. 2020, Longformer, for sliding-window attention; Gemma Team 2025, Gemma 3 report, sec. 2).

A query at position t sees the stored tokens with t - W < pos <= t (HF transformers'
`sliding_window_overlay`: the query and the W - 1 tokens before it). A new token takes the slot of the
oldest token held (an empty slot first): with C = W slots that is slot p mod W, a plain ring. A ring of
W slots cannot hold a prefill chunk of T tokens and the W - 1 tokens before it, so a local layer
attends *before* storing (`attend_new`: the ring, then the new tokens, folded into one online softmax
by `kvjax.attention.online_attention`, never a T x T matrix beyond the chunk's [G*T, T] score tile),
then `append` writes each row's last min(T, C) real tokens into the oldest slots. Decode steps do the
same with T = 1 inside the jitted loop.

Compression leaves local layers alone by default (`sliding = True`): their memory is already bounded
by W. With `compress_local` (`kvjax.pipeline.plan`), an eviction method keeps its top C < W tokens of
the window per KV head; the ring then has C slots and new tokens replace the oldest kept ones.

Legend: B batch, T new tokens, C slots (W unless compressed), W window, H query heads, K KV heads,
G = H/K, D head dim.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.attention import online_attention, slot_blocks
from kvjax.states.base import EMPTY_POS, LayerState


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WindowKV(LayerState):
    """Attributes:
      k: [B, K, C, D] post-RoPE keys; v: [B, K, C, D] values.
      pos: int32 [B, K, C] position of the token in each slot (`EMPTY_POS` if none yet).
      length: int32 [B] tokens held per row (min(tokens seen, C)).
      window: static W; None means W = C (an uncompressed ring).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    window_size: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    sliding = True  # a sliding-window layer: compression leaves it as it is

    @property
    def window(self) -> int:
        return self.k.shape[2] if self.window_size is None else self.window_size

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, window: int, head_dim: int, dtype) -> "WindowKV":
        shape = (batch, n_kv_heads, window)
        return cls(k=jnp.zeros(shape + (head_dim,), dtype), v=jnp.zeros(shape + (head_dim,), dtype),
                   pos=jnp.full(shape, EMPTY_POS, jnp.int32), length=jnp.zeros((batch,), jnp.int32))

    def append(self, k, v, pos, n_valid, features=None) -> "WindowKV":
        """Write each row's last min(n_valid, C) real tokens (k, v [B, K, T, D], pos int32 [B, T]) into
        the slots of the oldest tokens held, empty slots first (per KV head: a compressed ring's heads
        hold different tokens); padding and older tokens of a long chunk are dropped (an out-of-bounds
        index)."""
        b, n_kv, t = k.shape[:3]
        c = self.capacity
        ti = jnp.arange(t)[None, :]
        first = n_valid[:, None] - jnp.minimum(n_valid, c)[:, None]  # [B, 1] first token written
        write = (ti >= first) & (ti < n_valid[:, None])  # [B, T]
        age = jnp.where(self.pos == EMPTY_POS, -1, self.pos)  # [B, K, C]
        if t == 1:
            oldest = jnp.argmin(age, axis=2)[:, :, None]  # [B, K, 1]
        else:
            oldest = jnp.argsort(age, axis=2)[:, :, :min(t, c)]
        rank = jnp.clip(ti - first, 0, oldest.shape[2] - 1)  # [B, T] order among the written tokens
        slot = jnp.take_along_axis(oldest, jnp.broadcast_to(rank[:, None, :], (b, n_kv, t)), axis=2)
        slot = jnp.where(write[:, None, :], slot, c)  # c: out of bounds, dropped
        idx = (jnp.arange(b)[:, None, None], jnp.arange(n_kv)[None, :, None], slot)
        put = lambda buf, new: buf.at[idx].set(new.astype(buf.dtype), mode="drop")  # noqa: E731
        pos_bkt = jnp.broadcast_to(pos[:, None, :], (b, n_kv, t)).astype(jnp.int32)
        return dataclasses.replace(self, k=put(self.k, k), v=put(self.v, v), pos=put(self.pos, pos_bkt),
                                   length=jnp.minimum(self.length + n_valid.astype(jnp.int32), c))

    def _ring(self, block):
        return slot_blocks((self.k, self.v, self.pos), jnp.full_like(self.length, self.capacity), block)

    def attend_jnp(self, q, q_pos, block=None, return_lse: bool = False):
        """Windowed attention over the stored tokens (after `append`: right for a query at most one
        position past the newest stored token, as in decoding)."""
        return online_attention(q, q_pos, [self._ring(block)], return_lse, window=self.window)

    def attend_new(self, q, q_pos, k, v, pos, n_valid, block=None, return_lse: bool = False):
        """Windowed causal attention of q [B, T, H, D] over the stored tokens and the T new ones (k, v
        [B, K, T, D] post-RoPE, pos int32 [B, T], n_valid [B]) before they are stored."""
        b, n_kv, t = k.shape[:3]
        pos_bkt = jnp.broadcast_to(pos[:, None, :], (b, n_kv, t)).astype(jnp.int32)
        hidden = jnp.broadcast_to((jnp.arange(t)[None, :] >= n_valid[:, None])[:, None, :], (b, n_kv, t))
        new = (lambda i: (k, v, pos_bkt, hidden), None)
        return online_attention(q, q_pos, [self._ring(block), new], return_lse, window=self.window)

    def has_room(self, n: int = 1) -> jax.Array:
        return jnp.asarray(True)  # a ring: the oldest token leaves the window as a new one enters

    def with_room(self, n: int, round_up=lambda c: c) -> "WindowKV":
        return self

    def shrunk(self, capacity: int, room: int = 0, round_up=lambda c: c) -> "WindowKV":
        return self  # already its C slots

    def positions(self) -> jax.Array:
        return self.pos
