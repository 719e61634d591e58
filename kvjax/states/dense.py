"""`DenseKV`: the full-precision layer state, one slot per token per KV head; `QuantKV`: the same
layout over a quantized store (`kvjax.states.quantized.QuantStore`), what `DenseKV.quantize` gives.

Rows of a batch may hold different numbers of tokens: slots at or past a row's `length` are scratch
and masked out (they are overwritten by the next append). Visibility of slot s to query t of row b:
`s < length[b]` and `pos[b, k, s] <= q_pos[b, t]`: one rule for causal prefill, padded rows, decode
and evicted caches whose slots hold arbitrary original positions.

Legend: B batch, T new tokens, S cache slots, C slots after eviction, H query heads, K KV heads,
G = H/K, D head dim.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import blockwise_attention, online_attention, score_block
from kvjax.kernels.decode_attention import decode_attention
from kvjax.kernels.dispatch import unsupported
from kvjax.kernels.prefill_attention import prefill_attention
from kvjax.kernels.quant_decode_attention import quant_decode_attention
from kvjax.states.base import EMPTY_POS, LayerState, write_slots
from kvjax.states.quantized import QuantLayout, QuantStore, round_to

KERNEL_QUANTIZERS = ("kivi", "per_token", "int8", "fp8")  # quantizers whose layouts the quantized kernel reads


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKV(LayerState):
    """Full-precision keys and values of one layer.

    Attributes:
      k: [B, K, S, D] post-RoPE keys.
      v: [B, K, S, D] values.
      pos: int32 [B, K, S] original position of the token in each slot (`EMPTY_POS` if unused).
      length: int32 [B] slots in use per row; slots [0, length) are valid.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype, value_dim: int | None = None
             ) -> "DenseKV":
        """An empty state; `value_dim` (default `head_dim`) for states storing narrower values."""
        shape = (batch, n_kv_heads, capacity)
        return cls(k=jnp.zeros(shape + (head_dim,), dtype), v=jnp.zeros(shape + (value_dim or head_dim,), dtype),
                   pos=jnp.full(shape, EMPTY_POS, jnp.int32), length=jnp.zeros((batch,), jnp.int32))

    def append(self, k: jax.Array, v: jax.Array, pos: jax.Array, n_valid: jax.Array, features=None) -> "DenseKV":
        """Write T new tokens at slots [length, length + T) of each row; `length += n_valid`.
        The caller guarantees `length + T <= S`."""
        b, n_kv, t = k.shape[:3]
        pos_bkt = jnp.broadcast_to(pos[:, None, :], (b, n_kv, t)).astype(jnp.int32)
        return DenseKV(k=write_slots(self.k, k, self.length), v=write_slots(self.v, v, self.length),
                       pos=write_slots(self.pos, pos_bkt, self.length),
                       length=self.length + n_valid.astype(jnp.int32))

    def attend_jnp(self, q: jax.Array, q_pos: jax.Array, block: int | None = None, return_lse: bool = False):
        block = score_block(block, q, self.k.shape[1])  # decode steps: one pass over a few thousand keys
        return blockwise_attention(q, q_pos, self.k, self.v, self.pos, self.length, block, return_lse)

    def attend_kernel(self, q, q_pos, return_lse: bool, interpret: bool):
        """Decode steps (T = 1): flash-decoding (`kernels.decode_attention`; every used slot precedes the
        query, so positions are not read); prefill chunks: `kernels.prefill_attention` (with the lse)."""
        if q.shape[1] == 1 and not return_lse:
            return decode_attention(q, self.k, self.v, self.length, interpret=interpret)
        out, lse = prefill_attention(q, q_pos, self.k, self.v, self.pos, self.length, interpret=interpret)
        return (out, lse) if return_lse else out

    def positions(self) -> jax.Array:
        return self.pos

    def quantize(self, quantizer, tokens: int, room: int = 0) -> "QuantKV":
        """The same tokens in a quantized store (`QuantKV.from_dense`) for up to `tokens` per row."""
        return QuantKV.from_dense(self, quantizer, tokens)

    def with_room(self, n: int, round_up=lambda c: c) -> "DenseKV":
        """At least `n` free slots past the longest row, capacity rounded up by `round_up` (host-side)."""
        need = round_up(int(np.max(np.asarray(self.length))) + n)
        return self.with_capacity(max(self.capacity, need))

    def with_capacity(self, capacity: int) -> "DenseKV":
        """The same state with S grown to `capacity` slots (new slots empty)."""
        extra = capacity - self.capacity
        if extra < 0:
            raise ValueError(f"cannot shrink a cache from {self.capacity} to {capacity} slots")
        if extra == 0:
            return self
        pad = lambda x, value: jnp.pad(x, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 3),  # noqa: E731
                                       constant_values=value)
        return dataclasses.replace(self, k=pad(self.k, 0), v=pad(self.v, 0), pos=pad(self.pos, EMPTY_POS))

    def shrunk(self, capacity: int, room: int = 0, round_up=lambda c: c) -> "DenseKV":
        """The first `capacity` slots (every row's tokens must fit in them)."""
        if capacity >= self.capacity:
            return self
        return DenseKV(k=self.k[:, :, :capacity], v=self.v[:, :, :capacity], pos=self.pos[:, :, :capacity],
                       length=self.length)

    def keep_top(self, scores, n_keep, capacity: int, carry=None):
        """Each row's top `n_keep[b]` slots per KV head by score, in ascending position order.

        Args:
          scores: float32 [B, K, S] (higher = keep).  n_keep: int32 [B] tokens kept per head (<= length).
          capacity: static C >= max(n_keep), slots of the result.
          carry: optional [B, K, S] array gathered along (returned as a second value, [B, K, C]).
        """
        state = self
        if capacity > state.capacity:
            state = state.with_capacity(capacity)
            if carry is not None:
                carry = jnp.pad(carry, [(0, 0), (0, 0), (0, capacity - carry.shape[2])])
            scores = jnp.pad(scores, [(0, 0), (0, 0), (0, capacity - scores.shape[2])])
        s_idx = jnp.arange(state.capacity)
        scores = jnp.where(s_idx[None, None, :] < state.length[:, None, None], scores, -jnp.inf)
        top = jax.lax.top_k(scores, capacity)[1]  # [B, K, C] best first
        kept = jnp.arange(capacity)[None, None, :] < n_keep[:, None, None]
        pos = jnp.take_along_axis(state.pos, top, axis=2)
        order = jnp.argsort(jnp.where(kept, pos, EMPTY_POS), axis=2)  # kept slots by position, then the rest
        idx = jnp.take_along_axis(top, order, axis=2)
        gather = lambda x: jnp.take_along_axis(x, idx[..., None], axis=2)  # noqa: E731
        out = DenseKV(k=gather(state.k), v=gather(state.v),
                      pos=jnp.where(kept, jnp.take_along_axis(state.pos, idx, axis=2), EMPTY_POS),
                      length=n_keep.astype(jnp.int32))
        return out if carry is None else (out, jnp.take_along_axis(carry, idx, axis=2))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantKV(QuantLayout):
    """The dense layout over a quantized store (`QuantStore`, rows: KV head k of row b writes store row
    k, and every head of a row holds as many tokens, so the counts are per row).

    KIVI's streaming scheme (Liu et al. 2024, Alg. 1): new tokens go into the full-precision residual;
    a row's full residual is quantized and flushed into the store (rows flush independently). Prefill
    attention runs at full precision on a `DenseKV`; `DenseKV.quantize` (`from_dense`) then stores what
    is kept. Attention dequantizes the store transiently and attends over sink + store + residual with
    position masks; decode steps of kivi/per_token/int8/fp8 stores without a sink have a Pallas kernel.

    Attributes:
      store: `QuantStore` of S store slots per row and head (a multiple of R); its arrays are read
        through this layout's properties (kq, vq, pos, n_q, k_res, v_res, pos_res, n_r, k_sink, v_sink,
        pos_sink: the layouts the kernel reads).
    """

    store: QuantStore

    pos = property(lambda self: self.store.pos)  # int32 [B, K, S]

    @property
    def length(self) -> jax.Array:
        return self.store.n_sink[:, 0] + self.n_q + self.n_r

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype, quantizer) -> "QuantKV":
        """An empty state for `capacity` tokens per row."""
        return cls.from_dense(DenseKV.init(batch, n_kv_heads, capacity, head_dim, dtype), quantizer, capacity)

    @classmethod
    def from_dense(cls, state: DenseKV, quantizer, tokens: int, hold=None) -> "QuantKV":
        """Quantize a dense state whose rows hold their tokens in slots [0, length), in position order.

        The first `quantizer.sink` tokens of a row go to the sink; of the others, the first
        floor(n / R) * R go to the store, the rest to the residual. `tokens` (static): the most tokens
        a row will hold (>= its length); the store gets what the sink does not take, rounded up to a
        multiple of R (at least R). Unused store slots hold zeros. `hold` (bool [B], optional): rows
        that keep a full residual rather than flushing it (`QuantStore.append`).
        """
        b, n_kv, s = state.pos.shape
        rows = jnp.arange(b)[:, None, None]

        def take(head, j, valid):
            idx = (rows, head, jnp.clip(j, 0, s - 1))
            kv = lambda x: jnp.where(valid[..., None], x[idx], 0).astype(x.dtype)  # noqa: E731
            return kv(state.k), kv(state.v), jnp.where(valid, state.pos[idx], EMPTY_POS)

        slots = round_to(max(tokens - quantizer.sink, 1), quantizer.residual)
        return cls(QuantStore.build(quantizer, take, state.length.astype(jnp.int32), n_kv, slots, hold=hold))

    def has_room(self, n: int = 1) -> jax.Array:
        return jnp.all(self.n_q + self.n_r + n <= self.capacity)

    def with_room(self, n: int, round_up=lambda c: c) -> "QuantKV":
        """Grow the store so `n` more tokens fit (host-side): the slots used plus `n`, rounded up by
        `round_up`, then to a multiple of the residual."""
        need = round_to(round_up(int(np.max(np.asarray(self.n_q + self.n_r))) + n), self.residual)
        if need <= self.capacity:
            return self
        src = np.where(np.arange(need) < self.capacity, np.arange(need), -1)
        return QuantKV(self.store.relaid(np.broadcast_to(src, (self.n_q.shape[0], need))))

    def append(self, k, v, pos, n_valid, features=None) -> "QuantKV":
        """T tokens per row (k, v [B, K, T, D], pos [B, T]), one at a time through the residual."""
        return QuantKV(self.store.append(k, v, pos, n_valid))

    def attend_jnp(self, q, q_pos, block=None, return_lse: bool = False):
        """Attention over the sink, the store (dequantized a block at a time) and the residual."""
        return online_attention(q, q_pos, self.store.attention_parts(block), return_lse)

    def attend_kernel(self, q, q_pos, return_lse: bool, interpret: bool):
        """`kernels.quant_decode_attention`: dequantizes each tile in registers, then the residual."""
        name = getattr(self.quantizer, "name", type(self.quantizer).__name__)
        if return_lse:
            raise unsupported("QuantKV gives no prefill observations in the Pallas path")
        if name not in KERNEL_QUANTIZERS or self.pos_sink.shape[2]:
            raise unsupported(f"no Pallas kernel for the {name!r} quantized cache (kernels read "
                              f"{', '.join(KERNEL_QUANTIZERS)} without a sink)")
        causal = {} if q.shape[1] == 1 else dict(q_pos=q_pos, pos=self.pos, pos_res=self.pos_res)
        return quant_decode_attention(q, self.kq, self.vq, self.n_q, self.k_res, self.v_res, self.n_r, **causal,
                                      interpret=interpret)

    def memory_parts(self) -> dict:
        return self.store.memory_parts()

    def positions(self) -> jax.Array:
        """int32 [B, K, N + S + R]: positions held, ascending, unused (`EMPTY_POS`) last."""
        return jnp.sort(self.store.slot_positions(), axis=2)
