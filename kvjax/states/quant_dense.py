"""`QuantKV`: a layer state that stores K and V quantized (bit-packed codes + scales), with the newest
tokens in a full-precision residual window (KIVI's streaming scheme, Liu et al. 2024, Alg. 1).

New tokens go into the residual; when a row's residual holds `residual` tokens, all of them are
quantized and flushed into the packed store (a `lax.cond`, inside the jitted decode loop). No
full-precision copy of a quantized token is kept: attention dequantizes the store transiently.
Prefill attention runs at full precision on a `DenseKV`; `from_dense` then quantizes what is kept.
A quantizer with `sink` > 0 (KVQuant's attention sink) keeps each row's first `sink` tokens in a
full-precision sink store that never flushes.

Legend: B batch, K KV heads, Q store slots (a multiple of R), R residual slots, N sink slots,
D head dim, T new tokens.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import quant
from kvjax.attention import blockwise_attention
from kvjax.kernels.dispatch import unsupported
from kvjax.kernels.quant_decode_attention import quant_decode_attention
from kvjax.quantizers import Quantizer
from kvjax.states.base import EMPTY_POS, LayerState, tree_nbytes, write_slots
from kvjax.states.dense import DenseKV

KERNEL_QUANTIZERS = ("kivi", "per_token", "int8", "fp8")  # quantizers whose layouts the kernel reads


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _write_tokens(store: quant.QuantizedArray, block: quant.QuantizedArray, start) -> quant.QuantizedArray:
    """Write a quantized block of tokens into the store at token `start[b]` (a multiple of the group)."""
    def leaf(buf, new):
        per = store.codes.shape[2] // buf.shape[2]  # tokens per entry on axis 2 (key scales: per group)
        return write_slots(buf, new, start // per)

    return jax.tree_util.tree_map(leaf, store, block)


def _slots(x: jax.Array, start: int, n: int, fill) -> jax.Array:
    """Slots [start, start + n) of axis 2 of x, padded with `fill` past x's end."""
    short = max(start + n - x.shape[2], 0)
    x = jnp.pad(x, [(0, 0), (0, 0), (0, short)] + [(0, 0)] * (x.ndim - 3), constant_values=fill)
    return x[:, :, start:start + n]


def _pad_tokens(qa: quant.QuantizedArray, tokens: int) -> quant.QuantizedArray:
    """Grow the token axis (2) of a quantized [B, K, S, ...] array to `tokens` (new entries zero)."""
    def leaf(x):
        per = qa.codes.shape[2] // x.shape[2]
        return jnp.pad(x, [(0, 0), (0, 0), (0, tokens // per - x.shape[2])] + [(0, 0)] * (x.ndim - 3))

    return jax.tree_util.tree_map(leaf, qa)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantKV(LayerState):
    """Attributes:
      kq, vq: quantized store of Q slots (`QuantizedArray`: codes + scales (+ zero-points)).
      pos: int32 [B, K, Q] positions of the stored tokens (`EMPTY_POS` where unused).
      k_res, v_res: [B, K, R, D] full-precision residual; pos_res: int32 [B, K, R].
      n_q: int32 [B] tokens in the store (a multiple of R); n_r: int32 [B] tokens in the residual.
      k_sink, v_sink: [B, K, N, D] full-precision first tokens; pos_sink: int32 [B, K, N] (N may be 0).
      quantizer: the method (static).
    """

    kq: quant.QuantizedArray
    vq: quant.QuantizedArray
    pos: jax.Array
    k_res: jax.Array
    v_res: jax.Array
    pos_res: jax.Array
    n_q: jax.Array
    n_r: jax.Array
    k_sink: jax.Array
    v_sink: jax.Array
    pos_sink: jax.Array
    quantizer: Quantizer = dataclasses.field(metadata=dict(static=True), default=None)

    @property
    def capacity(self) -> int:
        return self.pos.shape[2]

    @property
    def residual(self) -> int:
        return self.k_res.shape[2]

    @property
    def length(self) -> jax.Array:
        return jnp.sum(self.pos_sink[:, 0] != EMPTY_POS, axis=-1, dtype=jnp.int32) + self.n_q + self.n_r

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype, quantizer: Quantizer) -> "QuantKV":
        """An empty state for `capacity` tokens per row."""
        return cls.from_dense(DenseKV.init(batch, n_kv_heads, capacity, head_dim, dtype), quantizer, capacity)

    @classmethod
    def from_dense(cls, state: DenseKV, quantizer: Quantizer, tokens: int) -> "QuantKV":
        """Quantize a dense state whose rows hold their tokens in slots [0, length), in position order.

        The first `quantizer.sink` tokens of a row go to the sink store; of the others, the first
        floor(n / R) * R go to the quantized store, the rest to the residual. `tokens` (static): the
        most tokens a row will hold (>= its length); the store gets what the sink does not take,
        rounded up to a multiple of R (at least R).
        """
        r, n_sink_slots = quantizer.residual, quantizer.sink
        cap = _round_up(max(tokens - n_sink_slots, 1), r)
        n_sink = jnp.minimum(state.length, n_sink_slots)
        in_sink = jnp.arange(n_sink_slots)[None, None, :] < n_sink[:, None, None]
        k, v = _slots(state.k, n_sink_slots, cap, 0), _slots(state.v, n_sink_slots, cap, 0)
        pos = _slots(state.pos, n_sink_slots, cap, EMPTY_POS)
        length = state.length - n_sink
        n_q = (length // r) * r
        slots = jnp.arange(cap)[None, None, :]
        res_idx = n_q[:, None, None] + jnp.arange(r)[None, None, :]  # [B, 1, R]
        in_res = res_idx < length[:, None, None]
        idx = jnp.minimum(res_idx, cap - 1)
        take_kv = lambda x: jnp.where(in_res[..., None], jnp.take_along_axis(x, idx[..., None], axis=2), 0)  # noqa: E731
        sink = lambda x: jnp.where(in_sink[..., None], _slots(x, 0, n_sink_slots, 0), 0)  # noqa: E731
        return cls(kq=quantizer.quantize_keys(k, pos), vq=quantizer.quantize_values(v),
                   pos=jnp.where(slots < n_q[:, None, None], pos, EMPTY_POS),
                   k_res=take_kv(k), v_res=take_kv(v),
                   pos_res=jnp.where(in_res, jnp.take_along_axis(pos, idx, axis=2), EMPTY_POS),
                   n_q=n_q.astype(jnp.int32), n_r=(length - n_q).astype(jnp.int32),
                   k_sink=sink(state.k), v_sink=sink(state.v),
                   pos_sink=jnp.where(in_sink, _slots(state.pos, 0, n_sink_slots, EMPTY_POS), EMPTY_POS),
                   quantizer=quantizer)

    def has_room(self, n: int = 1) -> jax.Array:
        return jnp.all(self.n_q + self.n_r + n <= self.capacity)

    def with_room(self, n: int, round_up=lambda c: c) -> "QuantKV":
        """Grow the store so `n` more tokens fit (host-side), in multiples of the residual."""
        need = _round_up(round_up(int(np.max(np.asarray(self.n_q + self.n_r))) + n), self.residual)
        if need <= self.capacity:
            return self
        return dataclasses.replace(self, kq=_pad_tokens(self.kq, need), vq=_pad_tokens(self.vq, need),
                                   pos=jnp.pad(self.pos, [(0, 0), (0, 0), (0, need - self.capacity)],
                                               constant_values=EMPTY_POS))

    def _append_one(self, k, v, pos, valid) -> "QuantKV":
        """One token per row (k, v [B, K, D], pos [B], valid bool [B]) into the residual, then flush."""
        b, n_kv = k.shape[:2]
        st = dataclasses.replace(
            self, k_res=write_slots(self.k_res, k[:, :, None], self.n_r),
            v_res=write_slots(self.v_res, v[:, :, None], self.n_r),
            pos_res=write_slots(self.pos_res, jnp.where(valid, pos, EMPTY_POS)[:, None, None]
                                .repeat(n_kv, 1), self.n_r),
            n_r=self.n_r + valid.astype(jnp.int32))
        return jax.lax.cond(jnp.any(st.n_r >= st.residual), QuantKV._flush, lambda x: x, st)

    def _flush(self) -> "QuantKV":
        """Quantize full residuals into the store (rows whose residual is not full are unchanged)."""
        full = self.n_r >= self.residual  # [B]
        kb = self.quantizer.quantize_keys(self.k_res, self.pos_res)
        vb = self.quantizer.quantize_values(self.v_res)
        # every row writes at its own n_q; only full rows count it (others' writes land past n_q)
        pos_block = jnp.where(full[:, None, None], self.pos_res, EMPTY_POS)
        return dataclasses.replace(
            self, kq=_write_tokens(self.kq, kb, self.n_q), vq=_write_tokens(self.vq, vb, self.n_q),
            pos=write_slots(self.pos, pos_block, self.n_q),
            pos_res=jnp.where(full[:, None, None], EMPTY_POS, self.pos_res),
            n_q=self.n_q + jnp.where(full, self.residual, 0), n_r=jnp.where(full, 0, self.n_r))

    def append(self, k, v, pos, n_valid, features=None) -> "QuantKV":
        """T tokens per row (k, v [B, K, T, D], pos [B, T]), one at a time through the residual."""
        t = k.shape[2]
        if t == 1:
            return self._append_one(k[:, :, 0], v[:, :, 0], pos[:, 0], n_valid > 0)
        return jax.lax.fori_loop(0, t, lambda i, st: st._append_one(
            k[:, :, i], v[:, :, i], pos[:, i], i < n_valid), self)

    def attend_jnp(self, q, q_pos, block=None, return_lse: bool = False):
        """Attention over the sink, the dequantized store and the residual (one pass; causal by positions)."""
        dt = self.k_res.dtype
        k = jnp.concatenate([self.k_sink, self.quantizer.dequantize_keys(self.kq, self.pos, dt), self.k_res], axis=2)
        v = jnp.concatenate([self.v_sink, self.quantizer.dequantize_values(self.vq, dt), self.v_res], axis=2)
        pos = jnp.concatenate([self.pos_sink, self.pos, self.pos_res], axis=2)
        everything = jnp.full(self.n_q.shape, pos.shape[2], jnp.int32)  # unused slots hold EMPTY_POS
        return blockwise_attention(q, q_pos, k, v, pos, everything, None, return_lse)

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
        return quantized_parts(self)

    def positions(self) -> jax.Array:
        """int32 [B, K, N + Q + R]: positions held, ascending, unused (`EMPTY_POS`) last."""
        return jnp.sort(jnp.concatenate([self.pos_sink, self.pos, self.pos_res], axis=2), axis=2)


def quantized_parts(layer) -> dict:
    """`memory_parts` of a quantized state (fields kq, vq, pos, k_res, v_res, pos_res, k_sink, v_sink,
    pos_sink)."""
    slots = layer.pos.size + layer.pos_res.size + layer.pos_sink.size
    out = dict(codes=0, scales=0, zeros=0, outliers=0)
    for qa in (layer.kq, layer.vq):
        out["codes"] += tree_nbytes(qa.codes)
        out["scales"] += tree_nbytes(qa.scale)
        out["zeros"] += tree_nbytes(qa.zero)
        out["outliers"] += tree_nbytes((qa.outlier_val, qa.outlier_idx))
    out["residual"] = tree_nbytes((layer.k_res, layer.v_res))
    out["sink"] = tree_nbytes((layer.k_sink, layer.v_sink))
    data = tree_nbytes((layer.kq, layer.vq, layer.k_res, layer.v_res, layer.k_sink, layer.v_sink))
    out["metadata"] = layer.nbytes() - data
    out["elements"] = 2 * slots * layer.k_res.shape[-1]
    out["itemsize"] = layer.k_res.dtype.itemsize
    return out
