"""`RaggedKV`: a layer state whose KV heads keep different numbers of tokens (Ada-KV, DuoAttention);
`QuantRaggedKV`: the same pool layout over a quantized store (`RaggedKV.quantize`).

Each row stores one flat pool of slots; KV head k owns the region [start[b, k], end[b, k]) of it and
uses its first `length[b, k]` slots. The pool holds exactly the kept tokens (plus any room asked for
with `with_room`), so `nbytes` is the real memory: no padded dense array, no mask standing in for
eviction (kvpress's AdaKVPress only masks; see its docstring).

Legend: B batch, T new tokens, P pool slots, H query heads, K KV heads, G = H/K, D head dim.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import online_attention
from kvjax.kernels.dispatch import unsupported
from kvjax.kernels.ragged_decode_attention import ragged_decode_attention
from kvjax.states.base import EMPTY_POS, LayerState
from kvjax.states.quantized import QuantLayout, QuantStore, round_to, split


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedKV(LayerState):
    """Attributes:
      k, v: [B, P, D] keys (post-RoPE) and values of every head's region.
      pos: int32 [B, P] original position of each slot's token (`EMPTY_POS` where unused).
      start, end: int32 [B, K] region of each KV head in the pool.
      length: int32 [B, K] slots in use at the start of each region.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    start: jax.Array
    end: jax.Array
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    # logical axes (`kvjax.sharding`): the pool holds the heads' regions in head order, sharded like them
    AXES = {"k": ("batch", "kv_pool"), "v": ("batch", "kv_pool"), "pos": ("batch", "kv_pool")}

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype) -> "RaggedKV":
        """An empty pool of `capacity` slots per row shared equally by the heads (capacity // K each)."""
        per = capacity // n_kv_heads
        start = jnp.broadcast_to(jnp.arange(n_kv_heads, dtype=jnp.int32) * per, (batch, n_kv_heads))
        return cls(k=jnp.zeros((batch, capacity, head_dim), dtype), v=jnp.zeros((batch, capacity, head_dim), dtype),
                   pos=jnp.full((batch, capacity), EMPTY_POS, jnp.int32), start=start, end=start + per,
                   length=jnp.zeros((batch, n_kv_heads), jnp.int32))

    def has_room(self, n: int = 1) -> jax.Array:
        """bool []: every head of every row can take `n` more tokens."""
        return jnp.all(self.start + self.length + n <= self.end)

    def append(self, k, v, pos, n_valid, features=None) -> "RaggedKV":
        """Write T tokens per head after each head's used slots; `length += n_valid`.

        k, v: [B, K, T, D]; pos: int32 [B, T]; n_valid: int32 [B]. Callers guarantee the room.
        """
        b, n_kv, t, _ = k.shape
        dest = (self.start + self.length)[:, :, None] + jnp.arange(t)  # [B, K, T]
        rows = jnp.arange(b)[:, None, None]
        write = lambda buf, new: buf.at[rows, dest].set(new.astype(buf.dtype), mode="promise_in_bounds",  # noqa: E731
                                                        unique_indices=True)
        pos_bkt = jnp.broadcast_to(pos[:, None, :], (b, n_kv, t)).astype(jnp.int32)
        return dataclasses.replace(self, k=write(self.k, k), v=write(self.v, v), pos=write(self.pos, pos_bkt),
                                   length=self.length + n_valid[:, None].astype(jnp.int32))

    def attend_jnp(self, q, q_pos, block=None, return_lse: bool = False):
        """Causal attention of q [B, T, H, D] over each KV head's own region, read `block` slots at a
        time (None: P slots, one block) -> [B, T, H, D]; other heads' slots are not read."""
        if return_lse:
            raise ValueError("RaggedKV does not provide observations for eviction (compress a fresh prefill)")
        block = block or self.capacity  # not widened for decode (`score_block`): blocks are gathered, and
        # 512-slot blocks that stay in cache take ~0.6x the time of wider ones (experiments/bench_attend.py)
        return online_attention(q, q_pos, [region_blocks((self.k, self.v, self.pos), self.start, self.length, block)])

    def attend_kernel(self, q, q_pos, return_lse: bool, interpret: bool):
        """`kernels.ragged_decode_attention`: each head reads only its own region (positions read for T > 1)."""
        if return_lse:
            raise unsupported("RaggedKV gives no prefill observations in the Pallas path")
        causal = {} if q.shape[1] == 1 else dict(q_pos=q_pos, pos=self.pos)
        return ragged_decode_attention(q, self.k, self.v, self.start, self.length, **causal, interpret=interpret)

    def positions(self) -> list[np.ndarray]:
        """Per KV head, int32 [B, n_k] original positions held (rows must hold equal counts per head)."""
        pos, start, length = (np.asarray(x) for x in (self.pos, self.start, self.length))
        out = []
        for kh in range(start.shape[1]):
            if len(set(length[:, kh].tolist())) > 1:
                raise ValueError("rows hold different numbers of tokens; select one row first")
            out.append(np.stack([np.sort(pos[b, start[b, kh]: start[b, kh] + length[b, kh]])
                                 for b in range(pos.shape[0])]))
        return out

    def shrunk(self, capacity: int, room: int, round_up=lambda c: c) -> "RaggedKV":
        """Re-laid compactly: each head's tokens then `room` free slots (the pool sized by `round_up`)."""
        return self.with_room(room, round_up, compact=True)

    def quantize(self, quantizer, tokens: int, room: int) -> "QuantRaggedKV":
        """The same tokens in a quantized pool (`QuantRaggedKV.from_ragged`), `room` more per head."""
        return QuantRaggedKV.from_ragged(self, quantizer, room)

    def with_room(self, n: int, round_up=lambda c: c, compact: bool = False) -> "RaggedKV":
        """Re-lay the pool so every head has `n` free slots after its used ones (host-side); with
        `compact`, exactly `n` (a pool larger than that shrinks)."""
        start, end, length = (np.asarray(x) for x in (self.start, self.end, self.length))
        size = length + n if compact else np.maximum(end - start, length + n)  # [B, K] new region sizes
        if np.all(start + length + n <= end) and (not compact or round_up(int(size.sum(1).max())) == self.capacity):
            return self
        new_start = np.concatenate([np.zeros_like(size[:, :1]), np.cumsum(size, axis=1)[:, :-1]], axis=1)
        pool = round_up(int(size.sum(1).max()))
        # source slot of every destination slot (regions keep their contents, grown at the end)
        src = np.full((start.shape[0], pool), -1, np.int64)
        for b in range(start.shape[0]):
            for kh in range(start.shape[1]):
                m = length[b, kh]
                src[b, new_start[b, kh]: new_start[b, kh] + m] = np.arange(start[b, kh], start[b, kh] + m)
        src_j = jnp.asarray(np.maximum(src, 0))
        has = jnp.asarray(src >= 0)
        take = lambda x, fill: jnp.where(has.reshape(has.shape + (1,) * (x.ndim - 2)),  # noqa: E731
                                         jnp.take_along_axis(x, src_j.reshape(src_j.shape + (1,) * (x.ndim - 2)), 1),
                                         fill)
        return RaggedKV(k=take(self.k, 0), v=take(self.v, 0), pos=take(self.pos, EMPTY_POS),
                        start=jnp.asarray(new_start, jnp.int32), end=jnp.asarray(new_start + size, jnp.int32),
                        length=self.length)


def region_blocks(pools, start, length, block: int):
    """`online_attention`'s part over each KV head's region of flat pools [B, P, ...] (k, v, pos):
    block i gathers slots start[b, k] + i * block + [0, block) of every head ([B, K, block, ...]),
    those at or past the head's `length` [B, K] hidden; only blocks some head uses are read."""
    b, p = pools[0].shape[:2]
    rows = jnp.arange(b)[:, None, None]

    def read(i):
        off = i * block + jnp.arange(block)
        idx = jnp.minimum(start[..., None] + off, p - 1)  # [B, K, block]
        return tuple(x[rows, idx] for x in pools) + (off >= length[..., None],)

    return read, (jnp.max(length) + block - 1) // block


def ragged_from_selection(k, v, pos, keep, n_kv_total: int) -> RaggedKV:
    """Build a RaggedKV from a per-head selection of dense slots.

    Args:
      k, v: [B, K, S, D]; pos: int32 [B, K, S] the dense state's arrays.
      keep: bool [B, K, S] slots to keep (any number per head).
      n_kv_total: static pool size P >= max over rows of keep.sum().
    Regions are packed head after head, each holding its kept tokens in position order.
    """
    b, n_kv, s, d = k.shape
    length = keep.sum(-1).astype(jnp.int32)  # [B, K]
    start = (jnp.cumsum(length, axis=1) - length).astype(jnp.int32)
    flat_key = jnp.where(keep, jnp.arange(n_kv)[None, :, None] * (EMPTY_POS // (n_kv + 1)) + pos, EMPTY_POS)
    order = jnp.argsort(flat_key.reshape(b, n_kv * s), axis=1)[:, :n_kv_total]  # kept: head-major, by position
    kept = jnp.arange(n_kv_total)[None, :] < length.sum(1, keepdims=True)
    take = lambda x: jnp.take_along_axis(x.reshape((b, n_kv * s) + x.shape[3:]),  # noqa: E731
                                         order.reshape(order.shape + (1,) * (x.ndim - 3)), axis=1)
    return RaggedKV(k=take(k), v=take(v), pos=jnp.where(kept, take(pos), EMPTY_POS), start=start,
                    end=start + length, length=length)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantRaggedKV(QuantLayout):
    """Per-head budgets (Ada-KV) stored quantized: the pool layout over a quantized store.

    The store is one flat pool per row (`QuantStore` with a single store row, [B, 1, P, D] in the
    quantizer's layouts), KV head k owning the region [start[b, k], end[b, k]); regions start and end
    on multiples of R, so a key group (G tokens of a channel, G dividing R) never straddles two heads.
    Each head streams its own tokens as KIVI does: a per-head residual [B, K, R, D], flushed at the end
    of the head's used region (`QuantStore.address` from `start`). A quantizer's `sink` first tokens of
    each head stay in full precision.

    Attributes:
      store: `QuantStore` of P pool slots (a multiple of R), counts per head [B, K].
      start, end: int32 [B, K] region of each KV head in the pool (multiples of R).
    """

    store: QuantStore
    start: jax.Array
    end: jax.Array

    pos = property(lambda self: self.store.pos[:, 0])  # int32 [B, P]

    @property
    def length(self) -> jax.Array:
        """int32 [B, K] tokens held by each head."""
        return self.store.n_sink + self.n_q + self.n_r

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype, quantizer) -> "QuantRaggedKV":
        """An empty pool: each head's region sized for capacity // K tokens."""
        empty = RaggedKV.init(batch, n_kv_heads, 0, head_dim, dtype)
        return cls.from_ragged(empty, quantizer, capacity // n_kv_heads)

    @classmethod
    def from_ragged(cls, state: RaggedKV, quantizer, room: int) -> "QuantRaggedKV":
        """Quantize a ragged state (each head's tokens in position order in its region).

        Per head: the first `sink` tokens go to the sink, of the others the first floor(n / R) * R to
        the pool, the rest to the residual. `room` (static): tokens each head may still append;
        head k's region is sized for the floor((n_k + room) / R) * R tokens it can ever flush.
        """
        r = quantizer.residual
        b, n_kv = state.start.shape
        n_sink, _, _ = split(state.length, quantizer)
        region = (state.length - n_sink + room) // r * r
        start = (jnp.cumsum(region, axis=1) - region).astype(jnp.int32)
        rows = jnp.arange(b)[:, None, None]
        # a pool of no slots (an empty state) is read as one zero slot
        k, v, pos = (x if x.shape[1] else jnp.pad(x, [(0, 0), (0, 1)] + [(0, 0)] * (x.ndim - 2))
                     for x in (state.k, state.v, state.pos))

        def take(head, j, valid):
            src = jnp.take_along_axis(state.start, head.reshape(b, -1), axis=1).reshape(head.shape) + j
            idx = (rows, jnp.clip(src, 0, k.shape[1] - 1))
            kv = lambda x: jnp.where(valid[..., None], x[idx], 0).astype(x.dtype)  # noqa: E731
            return kv(k), kv(v), jnp.where(valid, pos[idx], EMPTY_POS)

        p = round_to(state.capacity + n_kv * room, r)  # >= sum of regions: static bound
        store = QuantStore.build(quantizer, take, state.length.astype(jnp.int32), n_kv, p, base=start)
        return cls(store=store, start=start, end=(start + region).astype(jnp.int32))

    def has_room(self, n: int = 1) -> jax.Array:
        """bool []: every head can take `n` more tokens (the blocks they flush fit their regions)."""
        return jnp.all(self.start + self.n_q + (self.n_r + n) // self.residual * self.residual <= self.end)

    def append(self, k, v, pos, n_valid, features=None) -> "QuantRaggedKV":
        """T tokens per row (k, v [B, K, T, D], pos [B, T]), one at a time through the residuals;
        a full residual flushes at the end of its head's used region."""
        return dataclasses.replace(self, store=self.store.append(k, v, pos, n_valid, base=self.start))

    def attend_jnp(self, q, q_pos, block=None, return_lse: bool = False):
        """Causal attention of q [B, T, H, D] over each head's sink, its region of the store (dequantized
        a block at a time, `QuantStore.attention_parts`) and its residual."""
        if return_lse:
            raise ValueError("QuantRaggedKV does not provide observations for eviction (compress a fresh prefill)")
        return online_attention(q, q_pos, self.store.attention_parts(block, base=self.start))

    def memory_parts(self) -> dict:
        parts = self.store.memory_parts()
        parts["metadata"] += self.nbytes() - self.store.nbytes()  # the regions
        return parts

    def positions(self) -> list[np.ndarray]:
        """Per KV head, int32 [B, n_k] original positions held, ascending (rows must hold equal counts)."""
        pos, start, n_q = (np.asarray(x) for x in (self.pos, self.start, self.n_q))
        side = np.concatenate([np.asarray(self.pos_sink), np.asarray(self.pos_res)], axis=2)
        out = []
        for kh in range(start.shape[1]):
            held = [np.sort(np.concatenate([pos[b, start[b, kh]: start[b, kh] + n_q[b, kh]],
                                            side[b, kh][side[b, kh] != EMPTY_POS]])) for b in range(pos.shape[0])]
            if len({len(h) for h in held}) > 1:
                raise ValueError("rows hold different numbers of tokens; select one row first")
            out.append(np.stack(held))
        return out

    def with_room(self, n: int, round_up=lambda c: c) -> "QuantRaggedKV":
        """Re-lay the pool so every head can take `n` more tokens (host-side; regions keep their tokens)."""
        if bool(self.has_room(n)):
            return self
        r = self.residual
        start, end, n_q, n_r = (np.asarray(x) for x in (self.start, self.end, self.n_q, self.n_r))
        size = np.maximum(end - start, (n_q + n_r + n) // r * r)
        new_start = np.cumsum(size, axis=1) - size
        pool = round_to(round_up(int(size.sum(1).max())), r)
        src = np.full((start.shape[0], pool), -1, np.int64)  # source slot of every destination slot
        for b in range(start.shape[0]):
            for kh in range(start.shape[1]):
                src[b, new_start[b, kh]: new_start[b, kh] + n_q[b, kh]] = np.arange(start[b, kh], start[b, kh] + n_q[b, kh])
        return QuantRaggedKV(store=self.store.relaid(src), start=jnp.asarray(new_start, jnp.int32),
                             end=jnp.asarray(new_start + size, jnp.int32))
