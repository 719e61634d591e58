"""`QuantRaggedKV`: per-head budgets (Ada-KV) stored quantized, so eviction with per-head budgets
and quantization compose with the memory of both.

The quantized store is one flat pool of token slots per row, like `RaggedKV`'s, in which KV head k
owns the region [start[b, k], end[b, k]); regions start and end on multiples of the residual R, so a
key group (G tokens of a channel, G dividing R) never straddles two heads and the pool is simply a
quantized [B, 1, P, D] array in the quantizer's layout. Each head streams its own tokens as KIVI
does (Liu et al. 2024, Alg. 1): new tokens go to a full-precision per-head residual [B, K, R, D];
when a head's residual is full, it is quantized and written at the end of the head's used region.
A quantizer's `sink` first tokens of each head stay in full precision, as in `QuantKV`.

Legend: B batch, K KV heads, P pool slots (a multiple of R), R residual slots, N sink slots,
D head dim, T new tokens, H query heads.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.quantizers import Quantizer
from kvjax.states.base import EMPTY_POS, LayerState
from kvjax.states.quant_dense import quantized_parts
from kvjax.states.ragged import RaggedKV, head_attention


def _round_up(n, m):
    return -(-n // m) * m


def _gather_pool(x: jax.Array, src: jax.Array, valid: jax.Array, fill) -> jax.Array:
    """x [B, P0, ...] gathered at src int [B, ...idx] along axis 1, `fill` where not valid."""
    idx = jnp.clip(src, 0, x.shape[1] - 1)
    flat = idx.reshape(idx.shape[0], -1)
    out = jnp.take_along_axis(x, flat.reshape(flat.shape + (1,) * (x.ndim - 2)), axis=1)
    out = out.reshape(idx.shape + x.shape[2:])
    return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), out, fill).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantRaggedKV(LayerState):
    """Attributes:
      kq, vq: quantized pool [B, 1, P, D] (`QuantizedArray`, the quantizer's key/value layouts).
      pos: int32 [B, P] position of each pool slot's token (`EMPTY_POS` where unused).
      start, end: int32 [B, K] region of each KV head in the pool (multiples of R).
      n_q: int32 [B, K] tokens of each head in its region (a multiple of R, from `start`).
      k_res, v_res: [B, K, R, D] full-precision residual; pos_res: int32 [B, K, R]; n_r: int32 [B, K].
      k_sink, v_sink: [B, K, N, D] full-precision first tokens; pos_sink: int32 [B, K, N].
      quantizer: the method (static).
    """

    kq: object
    vq: object
    pos: jax.Array
    start: jax.Array
    end: jax.Array
    n_q: jax.Array
    k_res: jax.Array
    v_res: jax.Array
    pos_res: jax.Array
    n_r: jax.Array
    k_sink: jax.Array
    v_sink: jax.Array
    pos_sink: jax.Array
    quantizer: Quantizer = dataclasses.field(metadata=dict(static=True), default=None)

    @property
    def capacity(self) -> int:
        return self.pos.shape[1]

    @property
    def residual(self) -> int:
        return self.k_res.shape[2]

    @property
    def length(self) -> jax.Array:
        """int32 [B, K] tokens held by each head."""
        return jnp.sum(self.pos_sink != EMPTY_POS, axis=-1, dtype=jnp.int32) + self.n_q + self.n_r

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype, quantizer: Quantizer
             ) -> "QuantRaggedKV":
        """An empty pool: each head's region sized for capacity // K tokens."""
        empty = RaggedKV.init(batch, n_kv_heads, 0, head_dim, dtype)
        return cls.from_ragged(empty, quantizer, capacity // n_kv_heads)

    @classmethod
    def from_ragged(cls, state: RaggedKV, quantizer: Quantizer, room: int) -> "QuantRaggedKV":
        """Quantize a ragged state (each head's tokens in position order in its region).

        Per head: the first `sink` tokens go to the sink, of the others the first floor(n / R) * R to
        the pool, the rest to the residual. `room` (static): tokens each head may still append;
        head k's region is sized for the floor((n_k + room) / R) * R tokens it can ever flush.
        """
        r, n_sink_slots = quantizer.residual, quantizer.sink
        n_kv = state.start.shape[1]
        n_sink = jnp.minimum(state.length, n_sink_slots)
        rest = state.length - n_sink
        n_q = rest // r * r
        region = (rest + room) // r * r
        start = jnp.cumsum(region, axis=1) - region
        p = _round_up(state.capacity + n_kv * room, r)  # >= sum of regions: static bound
        # pool slot -> (its head, offset in the head's region) -> slot of the ragged pool
        slot = jnp.arange(p)[None, :]
        head = jnp.sum(slot[:, None, :] >= start[:, :, None], axis=1) - 1  # [B, P]
        at = lambda x: jnp.take_along_axis(x, head, axis=1)  # noqa: E731  [B, K] -> [B, P]
        off = slot - at(start)
        in_pool = off < at(n_q)
        src = at(state.start + n_sink) + off
        k, v = _gather_pool(state.k, src, in_pool, 0), _gather_pool(state.v, src, in_pool, 0)
        pos = _gather_pool(state.pos, src, in_pool, EMPTY_POS)
        res_j, sink_j = jnp.arange(r), jnp.arange(n_sink_slots)
        res_src = (state.start + n_sink + n_q)[..., None] + res_j  # [B, K, R]
        in_res = res_j < (rest - n_q)[..., None]
        sink_src = state.start[..., None] + sink_j
        in_sink = sink_j < n_sink[..., None]
        return cls(kq=quantizer.quantize_keys(k[:, None], pos[:, None]), vq=quantizer.quantize_values(v[:, None]),
                   pos=pos, start=start.astype(jnp.int32), end=(start + region).astype(jnp.int32),
                   n_q=n_q.astype(jnp.int32),
                   k_res=_gather_pool(state.k, res_src, in_res, 0), v_res=_gather_pool(state.v, res_src, in_res, 0),
                   pos_res=_gather_pool(state.pos, res_src, in_res, EMPTY_POS),
                   n_r=(rest - n_q).astype(jnp.int32),
                   k_sink=_gather_pool(state.k, sink_src, in_sink, 0),
                   v_sink=_gather_pool(state.v, sink_src, in_sink, 0),
                   pos_sink=_gather_pool(state.pos, sink_src, in_sink, EMPTY_POS), quantizer=quantizer)

    def has_room(self, n: int = 1) -> jax.Array:
        """bool []: every head can take `n` more tokens (the blocks they flush fit their regions)."""
        return jnp.all(self.start + self.n_q + (self.n_r + n) // self.residual * self.residual <= self.end)

    def _append_one(self, k, v, pos, valid) -> "QuantRaggedKV":
        """One token per row (k, v [B, K, D], pos [B], valid bool [B]) into every head's residual."""
        here = (jnp.arange(self.residual) == self.n_r[..., None]) & valid[:, None, None]  # [B, K, R]
        st = dataclasses.replace(
            self, k_res=jnp.where(here[..., None], k[:, :, None].astype(self.k_res.dtype), self.k_res),
            v_res=jnp.where(here[..., None], v[:, :, None].astype(self.v_res.dtype), self.v_res),
            pos_res=jnp.where(here, pos[:, None, None], self.pos_res),
            n_r=self.n_r + valid[:, None].astype(jnp.int32))
        return jax.lax.cond(jnp.any(st.n_r >= st.residual), QuantRaggedKV._flush, lambda x: x, st)

    def _flush(self) -> "QuantRaggedKV":
        """Quantize full residuals and write each at the end of its head's used region."""
        r = self.residual
        full = self.n_r >= r  # [B, K]
        blocks = (self.quantizer.quantize_keys(self.k_res, self.pos_res), self.quantizer.quantize_values(self.v_res))
        rows = jnp.arange(full.shape[0])[:, None, None]

        def write(buf, new):  # buf [B, 1, P/per, ...], new [B, K, R/per, ...]; heads not full: dropped
            per = self.capacity // buf.shape[2]
            dest = (self.start + self.n_q)[..., None] // per + jnp.arange(r // per)
            dest = jnp.where(full[..., None], dest, buf.shape[2])
            return buf.at[rows, 0, dest].set(new.astype(buf.dtype), mode="drop")

        kq, vq = (jax.tree_util.tree_map(write, store, new) for store, new in zip((self.kq, self.vq), blocks))
        dest = jnp.where(full[..., None], (self.start + self.n_q)[..., None] + jnp.arange(r), self.capacity)
        return dataclasses.replace(
            self, kq=kq, vq=vq, pos=self.pos.at[rows, dest].set(self.pos_res, mode="drop"),
            pos_res=jnp.where(full[..., None], EMPTY_POS, self.pos_res),
            n_q=self.n_q + jnp.where(full, r, 0), n_r=jnp.where(full, 0, self.n_r))

    def append(self, k, v, pos, n_valid, features=None) -> "QuantRaggedKV":
        """T tokens per row (k, v [B, K, T, D], pos [B, T]), one at a time through the residuals."""
        return jax.lax.fori_loop(0, k.shape[2], lambda i, st: st._append_one(
            k[:, :, i], v[:, :, i], pos[:, i], i < n_valid), self)

    def attend_jnp(self, q, q_pos, block=None, return_lse: bool = False):
        """Causal attention of q [B, T, H, D] over each head's sink, dequantized region and residual."""
        if return_lse:
            raise ValueError("QuantRaggedKV does not provide observations for eviction (compress a fresh prefill)")
        dt = self.k_res.dtype
        b, n_kv = self.start.shape
        flat = lambda x: x.reshape(b, -1, *x.shape[3:])  # noqa: E731  [B, K, R, ...] -> [B, K*R, ...]
        keys = self.quantizer.dequantize_keys(self.kq, self.pos[:, None], dt)[:, 0]
        values = self.quantizer.dequantize_values(self.vq, dt)[:, 0]
        slot = jnp.arange(self.capacity)[None, None, :]
        inside = (slot >= self.start[..., None]) & (slot < (self.start + self.n_q)[..., None])  # [B, K, P]
        pool_head = jnp.where(inside.any(1), jnp.argmax(inside, axis=1), -1)
        side_head = lambda n: jnp.broadcast_to(jnp.repeat(jnp.arange(n_kv), n), (b, n_kv * n))  # noqa: E731
        k = jnp.concatenate([flat(self.k_sink), keys, flat(self.k_res)], axis=1)
        v = jnp.concatenate([flat(self.v_sink), values, flat(self.v_res)], axis=1)
        pos = jnp.concatenate([flat(self.pos_sink), self.pos, flat(self.pos_res)], axis=1)
        heads = jnp.concatenate([side_head(self.k_sink.shape[2]), pool_head, side_head(self.residual)], axis=1)
        return head_attention(q, q_pos, k, v, pos, heads.astype(jnp.int32), n_kv)

    def memory_parts(self) -> dict:
        return quantized_parts(self)

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
        pool = _round_up(round_up(int(size.sum(1).max())), r)
        src = np.full((start.shape[0], pool), -1, np.int64)  # source slot of every destination slot
        for b in range(start.shape[0]):
            for kh in range(start.shape[1]):
                src[b, new_start[b, kh]: new_start[b, kh] + n_q[b, kh]] = np.arange(start[b, kh], start[b, kh] + n_q[b, kh])

        def move(x):  # x [B, 1, P/per, ...]: regions are aligned to R, so blocks of `per` move whole
            per = self.capacity // x.shape[2]
            s = src[:, ::per]
            idx = jnp.asarray(np.maximum(s, 0) // per)[:, None]
            idx = idx.reshape(idx.shape + (1,) * (x.ndim - 3))
            return jnp.where(jnp.asarray(s >= 0)[:, None].reshape(idx.shape), jnp.take_along_axis(x, idx, axis=2), 0)

        kq, vq = (jax.tree_util.tree_map(move, qa) for qa in (self.kq, self.vq))
        has = jnp.asarray(src >= 0)
        pos = jnp.where(has, jnp.take_along_axis(self.pos, jnp.asarray(np.maximum(src, 0)), axis=1), EMPTY_POS)
        return dataclasses.replace(self, kq=kq, vq=vq, pos=pos, start=jnp.asarray(new_start, jnp.int32),
                                   end=jnp.asarray(new_start + size, jnp.int32))
