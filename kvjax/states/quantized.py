"""`QuantStore`: keys and values stored quantized, written once for every layout that holds them.

The store is what jax-llm-examples' `QuantArray` is to a dense array: a pytree a layout holds in the
place of its full-precision K/V. It holds

* the quantized slots: a `QuantizedArray` pair `kq`, `vq` (codes, scales, zero-points, outliers) of
  [B, Hs, S, D] in the quantizer's key and value layouts, and their positions [B, Hs, S];
* a full-precision residual window of R slots per KV head (KIVI's streaming scheme, Liu et al. 2024,
  Alg. 1): new tokens go there, and when a head's window is full it is quantized and flushed into the
  store as one block (a `lax.cond`, inside the jitted decode loop);
* a full-precision sink of the quantizer's `sink` first tokens of each head, which never flushes
  (KVQuant's attention sink; N = 0 for the other quantizers).

No full-precision copy of a quantized token is kept: readers dequantize the store transiently.

**Where a head writes** is the one thing layouts disagree on, and it is expressed once, as a
per-(row, head) address (`address`): the store row and first slot of the head's next block.

* rows (Hs = K; `dense.QuantKV`): head k of row b owns store row k from slot 0; every head of a row
  holds as many tokens, so counts are per row ([B]). Address: (k, n_q[b]).
* pool (Hs = 1; `ragged.QuantRaggedKV`): the heads of a row share one pool, head k owning the
  region that starts at `base[b, k]` (a multiple of R, so a key group never straddles two heads);
  counts are per head ([B, K]). Address: (0, base[b, k] + n_q[b, k]).

Flushed blocks (R tokens) and re-quantized groups (`replaced`, decode-time eviction) are both written
through it. Quantizers are duck-typed (`kvjax.quantizers`: `quantize_keys(k, pos)`,
`dequantize_keys(qa, pos, dtype)`, `quantize_values`, `dequantize_values`, `residual`, `sink`).

Legend: B batch, K KV heads, Hs store rows (K or 1), S store slots (a multiple of R), R residual slots,
N sink slots, D head dim (keys and values may differ: latent states), T new tokens, g tokens of one
quantization group along the token axis (a per-channel key group; 1 for per-token layouts).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import native, quant
from kvjax.states.base import EMPTY_POS, LayerState, tree_nbytes


def round_to(n: int, m: int) -> int:
    """n rounded up to a multiple of m."""
    return -(-n // m) * m


def split(n, quantizer, hold=None):
    """Where a head's n tokens (in position order) go: (n_sink, n_q, n_r) with the first
    min(n, sink) in the sink, the next floor(rest / R) * R in the store, the rest in the residual.
    Where `hold` (bool, like n), a full residual is kept rather than flushed: 1 <= n_r <= R (rest > 0)."""
    r = quantizer.residual
    n_sink = jnp.minimum(n, quantizer.sink)
    rest = n - n_sink
    n_q = rest // r * r
    if hold is not None:
        n_q = jnp.where(hold, -(-jnp.maximum(rest - r, 0) // r) * r, n_q)
    return n_sink, n_q, rest - n_q


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeyBlock:
    """Keys [B, K, S_blk, D] of a store block as `online_attention` reads them: `scores(qf)` = qf . k^T
    without the dequantized keys (`Quantizer.key_scores`)."""

    qa: quant.QuantizedArray
    pos: jax.Array  # int32 [B, K, S_blk]
    quantizer: object = dataclasses.field(metadata=dict(static=True), default=None)

    shape = property(lambda self: self.qa.shape)

    def scores(self, qf):
        return self.quantizer.key_scores(qf, self.qa, self.pos)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ValueBlock:
    """Values [B, K, S_blk, Dv] of a store block: `mix(p)` = p . v (`Quantizer.value_mix`)."""

    qa: quant.QuantizedArray
    quantizer: object = dataclasses.field(metadata=dict(static=True), default=None)

    shape = property(lambda self: self.qa.shape)

    def mix(self, p):
        return self.quantizer.value_mix(p, self.qa)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantStore:
    """Attributes:
      kq, vq: `QuantizedArray` of [B, Hs, S, D] (the quantizer's key / value layouts).
      pos: int32 [B, Hs, S] position of each store slot's token (`EMPTY_POS` where unused).
      n_q: int32 [B] (rows) or [B, K] (pool) tokens in the store, from each head's start (a multiple of R).
      k_res, v_res: [B, K, R, D] full-precision residual; pos_res: int32 [B, K, R].
      n_r: int32, shaped like n_q: tokens in the residual (slots [0, n_r) of each head).
      k_sink, v_sink: [B, K, N, D] full-precision first tokens; pos_sink: int32 [B, K, N] (N may be 0).
      quantizer: the method (static).
    """

    kq: quant.QuantizedArray
    vq: quant.QuantizedArray
    pos: jax.Array
    n_q: jax.Array
    k_res: jax.Array
    v_res: jax.Array
    pos_res: jax.Array
    n_r: jax.Array
    k_sink: jax.Array
    v_sink: jax.Array
    pos_sink: jax.Array
    quantizer: object = dataclasses.field(metadata=dict(static=True), default=None)

    # ------------------------------------------------------------------------------------ shape
    @property
    def slots(self) -> int:
        return self.pos.shape[2]

    @property
    def residual(self) -> int:
        return self.k_res.shape[2]

    @property
    def n_kv(self) -> int:
        return self.k_res.shape[1]

    @property
    def n_sink(self) -> jax.Array:
        """int32 [B, K] tokens in each head's sink."""
        return jnp.sum(self.pos_sink != EMPTY_POS, axis=-1, dtype=jnp.int32)

    def per_head(self, x: jax.Array) -> jax.Array:
        """A count per row [B] or per head [B, K] as [B, K]."""
        return jnp.broadcast_to(x[:, None] if x.ndim == 1 else x, (x.shape[0], self.n_kv))

    def store_rows(self) -> jax.Array:
        """int32 [K]: the store row of each KV head (its own row, or the pool's single row)."""
        n_kv = self.n_kv
        return jnp.arange(n_kv) if self.pos.shape[1] == n_kv else jnp.zeros((n_kv,), jnp.int32)

    def address(self, base=None) -> jax.Array:
        """int32 [B, K]: the store slot (in the head's store row) where each head's next block goes:
        `n_q` from the start of its row (base None) or of its pool region (base [B, K])."""
        at = self.per_head(self.n_q)
        return at if base is None else at + base

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def build(cls, quantizer, take, n, n_kv: int, slots: int, base=None, hold=None) -> "QuantStore":
        """Quantize each head's tokens, given in position order by `take`.

        Args:
          take: (head, j, valid) -> (k, v, pos): the j-th token of KV head `head` of each row
            (int [B, X, J] each; zero K/V and `EMPTY_POS` where not `valid`).
          n: int32 [B] (rows: every head of a row holds as many) or [B, K] tokens of each head.
          slots: S (static, a multiple of R).  base: None (rows) or int32 [B, K] start of each
            head's region in the pool (multiples of R, ascending).
          hold: optional bool like n: heads that keep a full residual (`split`).
        """
        b = n.shape[0]
        n_sink, n_q, n_r = split(n, quantizer, hold)
        heads = lambda x: jnp.broadcast_to(x[:, None] if x.ndim == 1 else x, (b, n_kv))  # noqa: E731
        s = jnp.arange(slots)
        if base is None:  # head k's tokens fill store row k from slot 0
            head = jnp.broadcast_to(jnp.arange(n_kv)[None, :, None], (b, n_kv, slots))
            off = jnp.broadcast_to(s, (b, n_kv, slots))
        else:  # the head whose region (the last one starting at or before the slot) holds it
            head = jnp.maximum(jnp.sum(s[None, None, :] >= base[:, :, None], axis=1, keepdims=True) - 1, 0)
        at = lambda x: jnp.take_along_axis(heads(x), head.reshape(b, -1), axis=1).reshape(head.shape)  # noqa: E731
        if base is not None:
            off = s - at(base)
        k, v, pos = take(head, at(n_sink) + off, off < at(n_q))
        side = lambda m: jnp.broadcast_to(jnp.arange(n_kv)[None, :, None], (b, n_kv, m))  # noqa: E731
        j_r, j_s = jnp.arange(quantizer.residual), jnp.arange(quantizer.sink)
        k_res, v_res, pos_res = take(side(quantizer.residual), heads(n_sink + n_q)[..., None] + j_r,
                                     j_r < heads(n_r)[..., None])
        k_sink, v_sink, pos_sink = take(side(quantizer.sink), jnp.broadcast_to(j_s, (b, n_kv, quantizer.sink)),
                                        j_s < heads(n_sink)[..., None])
        i32 = lambda x: x.astype(jnp.int32)  # noqa: E731
        return cls(kq=quantizer.quantize_keys(k, pos), vq=quantizer.quantize_values(v), pos=pos, n_q=i32(n_q),
                   k_res=k_res, v_res=v_res, pos_res=pos_res, n_r=i32(n_r), k_sink=k_sink, v_sink=v_sink,
                   pos_sink=pos_sink, quantizer=quantizer)

    def relaid(self, src: np.ndarray) -> "QuantStore":
        """The store with slot s of every store row of row b holding old slot src[b, s] (host-side int
        [B, S'], -1: empty). Blocks of a group move whole (src keeps runs aligned to R)."""
        def move(x, fill):
            per = self.slots // x.shape[2]
            s = src[:, ::per]
            idx = jnp.asarray(np.maximum(s, 0) // per)[:, None].reshape((s.shape[0], 1, -1) + (1,) * (x.ndim - 3))
            has = jnp.asarray(s >= 0).reshape(idx.shape[:3] + (1,) * (x.ndim - 3))
            return jnp.where(has, jnp.take_along_axis(x, idx, axis=2), fill).astype(x.dtype)

        return dataclasses.replace(self, kq=jax.tree_util.tree_map(lambda x: move(x, 0), self.kq),
                                   vq=jax.tree_util.tree_map(lambda x: move(x, 0), self.vq),
                                   pos=move(self.pos, EMPTY_POS))

    # --------------------------------------------------------------------------- block writes
    def write_blocks(self, tree, block, at: jax.Array, mask: jax.Array):
        """tree [B, Hs, S/per, ...] (a `QuantizedArray` of the store, or positions) with each head's
        block [B, K, n/per, ...] written in its store row from slot at[b, k] (a multiple of the
        block's group); heads where `mask` [B, K] is False write nothing (the scatter drops them)."""
        rows = jnp.arange(at.shape[0])[:, None, None]
        srow = self.store_rows()[None, :, None]

        def leaf(buf, new):
            per = self.slots // buf.shape[2]  # tokens per entry on axis 2 (key scales: per group)
            dest = jnp.where(mask[..., None], (at // per)[..., None] + jnp.arange(new.shape[2]), buf.shape[2])
            return buf.at[rows, srow, dest].set(new.astype(buf.dtype), mode="drop")

        return jax.tree_util.tree_map(leaf, tree, block)

    def read_blocks(self, tree, at: jax.Array, n: int):
        """Each head's n store slots from slot at[b, k] of its store row: [B, K, n/per, ...] leaves."""
        rows = jnp.arange(at.shape[0])[:, None, None]
        srow = self.store_rows()[None, :, None]

        def leaf(buf):
            per = self.slots // buf.shape[2]
            return buf[rows, srow, (at // per)[..., None] + jnp.arange(n // per)]

        return jax.tree_util.tree_map(leaf, tree)

    # ------------------------------------------------------------------------------ streaming
    def append(self, k, v, pos, n_valid, base=None, hold=None) -> "QuantStore":
        """T tokens per row (k, v [B, K, T, D], pos int32 [B, T], n_valid int32 [B]) one at a time
        through each head's residual, full residuals flushed at the head's `address(base)` (except
        in rows where `hold` [B]: they keep a full residual; they must then take no more tokens)."""
        one = lambda st, i, valid: st.append_one(k[:, :, i], v[:, :, i], pos[:, i], valid, base, hold)  # noqa: E731
        if k.shape[2] == 1:
            return one(self, 0, n_valid > 0)
        return jax.lax.fori_loop(0, k.shape[2], lambda i, st: one(st, i, i < n_valid), self)

    def append_one(self, k, v, pos, valid, base=None, hold=None) -> "QuantStore":
        """One token per row (k, v [B, K, D], pos int32 [B], valid bool [B]) into slot n_r of each
        head's residual (a padding token writes nothing and is not counted), then flush."""
        b, n_kv = k.shape[:2]
        at = jnp.where(valid[:, None], self.per_head(self.n_r), self.residual)  # padding: out of range, dropped
        idx = (jnp.arange(b)[:, None], jnp.arange(n_kv)[None, :], at)
        write = lambda buf, new: buf.at[idx].set(new.astype(buf.dtype), mode="drop", unique_indices=True)  # noqa: E731
        grow = valid.reshape((b,) + (1,) * (self.n_r.ndim - 1)).astype(jnp.int32)
        st = dataclasses.replace(
            self, k_res=write(self.k_res, k), v_res=write(self.v_res, v),
            pos_res=write(self.pos_res, jnp.broadcast_to(pos[:, None], (b, n_kv))), n_r=self.n_r + grow)
        return jax.lax.cond(jnp.any(st.flushing(hold)), lambda s: s.flush(base, hold), lambda s: s, st)

    def flushing(self, hold=None) -> jax.Array:
        """bool like n_r: full residuals to flush (not in rows that `hold` [B] theirs)."""
        full = self.n_r >= self.residual
        return full if hold is None else full & ~hold.reshape((-1,) + (1,) * (full.ndim - 1))

    def flush(self, base=None, hold=None) -> "QuantStore":
        """Quantize every full residual into the store at its head's address (others unchanged)."""
        r = self.residual
        full = self.flushing(hold)  # [B] or [B, K]
        mask, at = self.per_head(full), self.address(base)
        kb = self.quantizer.quantize_keys(self.k_res, self.pos_res)
        vb = self.quantizer.quantize_values(self.v_res)
        return dataclasses.replace(
            self, kq=self.write_blocks(self.kq, kb, at, mask), vq=self.write_blocks(self.vq, vb, at, mask),
            pos=self.write_blocks(self.pos, self.pos_res, at, mask),
            pos_res=jnp.where(mask[..., None], EMPTY_POS, self.pos_res),
            n_q=self.n_q + jnp.where(full, r, 0), n_r=jnp.where(full, 0, self.n_r))

    # ------------------------------------------------------------------- single-token replacement
    def replaced(self, slot, k, v, pos, mask) -> "QuantStore":
        """Each head's token in `slot` [B, K], counted over [sink N | store S | residual R], replaced
        by a new one (k, v [B, K, D], pos int32 [B, K]) where mask [B, K]. Sink and residual slots are
        overwritten; a store slot's quantization groups are re-quantized with the new token in place
        of the old (`requantized`), so per-channel key groups stay exact groups. Counts do not change."""
        n, s = self.k_sink.shape[2], self.slots
        st = self.requantized(jnp.clip(slot - n, 0, s - 1), k, v, pos, mask & (slot >= n) & (slot < n + s))

        def side(buf, new, first, size):  # buf [B, K, size, ...] slot (slot - first) set where inside
            hit = mask[..., None] & (jnp.arange(size) == (slot - first)[..., None])
            return jnp.where(hit.reshape(hit.shape + (1,) * (buf.ndim - 3)),
                             new[:, :, None].astype(buf.dtype), buf)

        return dataclasses.replace(
            st, k_sink=side(st.k_sink, k, 0, n), v_sink=side(st.v_sink, v, 0, n),
            pos_sink=side(st.pos_sink, pos, 0, n), k_res=side(st.k_res, k, n + s, self.residual),
            v_res=side(st.v_res, v, n + s, self.residual), pos_res=side(st.pos_res, pos, n + s, self.residual))

    def requantized(self, slot, k, v, pos, mask) -> "QuantStore":
        """Store slot `slot` [B, K] of each head's store row holds a new token (k, v [B, K, D], pos
        int32 [B, K]) where mask [B, K]: the g tokens of each group containing it are dequantized, the
        token replaced, and the group quantized again (keys with their positions: KVQuant's pre-RoPE
        keys rotate by the new token's position)."""
        q, dt = self.quantizer, self.k_res.dtype
        old_pos = self.pos
        new_pos = self.write_blocks(self.pos, pos[:, :, None], slot, mask)

        def regroup(qa, new, dequantize, quantize):
            g = max(self.slots // leaf.shape[2] for leaf in jax.tree_util.tree_leaves(qa))
            first = slot // g * g
            group_old, group_new = self.read_blocks(old_pos, first, g), self.read_blocks(new_pos, first, g)
            x = dequantize(self.read_blocks(qa, first, g), group_old)  # [B, K, g, D]
            here = (jnp.arange(g) == (slot - first)[..., None])[..., None]
            x = jnp.where(here, new[:, :, None].astype(dt), x)
            return self.write_blocks(qa, quantize(x, group_new), first, mask)

        return dataclasses.replace(
            self, pos=new_pos,
            kq=regroup(self.kq, k, lambda qa, p: q.dequantize_keys(qa, p, dt), q.quantize_keys),
            vq=regroup(self.vq, v, lambda qa, p: q.dequantize_values(qa, dt), lambda x, p: q.quantize_values(x)))

    # ---------------------------------------------------------------------------------- reading
    def attention_parts(self, block: int | None = None, base=None, dequantized: bool = False) -> list:
        """`kvjax.attention.online_attention` parts over what each head holds: its sink, its store
        slots [0, n_q) from its `address` start (`base`: pool regions), and its residual slots [0, n_r).

        The store is read `block` slots at a time (rounded to a multiple of R; None: the whole store in
        one block) as `KeyBlock` / `ValueBlock`s, scored with the scales folded into the query and the
        probabilities: no full-precision copy of the store is made, and blocks no head uses are not
        read (KVQuant's keys are dequantized, outliers written back and RoPE applied per block).
        `dequantized`: blocks come as dequantized arrays instead (readers that transform the keys and
        values themselves: MLA's [c; k^R] blocks).
        """
        r, s = self.residual, self.slots
        blk = s if block is None else min(round_to(block, r), s)  # S is a multiple of R
        n_q = self.per_head(self.n_q)
        kq, vq = quant.as_bytes(self.kq), quant.as_bytes(self.vq)

        def read_store(i):
            first = i * blk
            start = jnp.minimum(first, s - blk)  # a multiple of R: groups are read whole
            if base is None:  # rows: one slice of every head's row
                read = lambda tree: jax.tree_util.tree_map(  # noqa: E731
                    lambda x: jax.lax.dynamic_slice_in_dim(x, start // (s // x.shape[2]), blk // (s // x.shape[2]),
                                                           axis=2), tree)
            else:  # pool: each head's block of its region
                read = lambda tree: self.read_blocks(tree, base + start, blk)  # noqa: E731
            pos = read(self.pos)
            slot = (start + jnp.arange(blk))[None, None, :]
            k, v = KeyBlock(read(kq), pos, self.quantizer), ValueBlock(read(vq), self.quantizer)
            if dequantized:
                dt = self.k_res.dtype
                k, v = self.quantizer.dequantize_keys(k.qa, pos, dt), self.quantizer.dequantize_values(v.qa, dt)
            return k, v, pos, (slot < first) | (slot >= n_q[..., None])

        def side(k, v, pos, n):
            return lambda i: (k, v, pos, jnp.arange(pos.shape[2])[None, None, :] >= n[..., None])

        def fused(qf, qf_pos, carry):  # the native kernel over every head's store slots, or None
            if qf.shape[2] > native.MAX_ROWS or not native.enabled():
                return None
            first = jnp.zeros_like(n_q) if base is None else base
            return native.quant_attend(qf, qf_pos, carry, self.kq, self.vq, self.pos, first, n_q)

        parts = [(side(self.k_res, self.v_res, self.pos_res, self.per_head(self.n_r)), None)]
        if s:
            store = (read_store, (jnp.max(n_q) + blk - 1) // blk)
            if not dequantized and self.quantizer.plain_codes and native.supports(kq) and native.supports(vq):
                store += (fused,)
            parts.insert(0, store)
        if self.k_sink.shape[2]:
            parts.insert(0, (side(self.k_sink, self.v_sink, self.pos_sink, self.n_sink), None))
        return parts

    def slot_positions(self) -> jax.Array:
        """Rows layout: int32 [B, K, N + S + R] positions of the sink, store and residual slots."""
        return jnp.concatenate([self.pos_sink, self.pos, self.pos_res], axis=2)

    def dense(self):
        """Rows layout: (k [B, K, N + S + R, D], v, pos) the sink, the dequantized store and the
        residual side by side (unused slots hold `EMPTY_POS`)."""
        dt = self.k_res.dtype
        k = jnp.concatenate([self.k_sink, self.quantizer.dequantize_keys(self.kq, self.pos, dt), self.k_res], axis=2)
        v = jnp.concatenate([self.v_sink, self.quantizer.dequantize_values(self.vq, dt), self.v_res], axis=2)
        return k, v, self.slot_positions()

    # ----------------------------------------------------------------------------------- memory
    def nbytes(self) -> int:
        return tree_nbytes(self)

    def memory_parts(self) -> dict:
        """Bytes of codes, scales, zeros, outliers (values + indices), residual, sink and metadata
        (positions, counts); `elements` K/V numbers held, `itemsize` their full-precision width."""
        out = dict(codes=0, scales=0, zeros=0, outliers=0)
        for qa in (self.kq, self.vq):
            out["codes"] += tree_nbytes(qa.codes)
            out["scales"] += tree_nbytes(qa.scale)
            out["zeros"] += tree_nbytes(qa.zero)
            out["outliers"] += tree_nbytes((qa.outlier_val, qa.outlier_idx))
        out["residual"] = tree_nbytes((self.k_res, self.v_res))
        out["sink"] = tree_nbytes((self.k_sink, self.v_sink))
        data = tree_nbytes((self.kq, self.vq, self.k_res, self.v_res, self.k_sink, self.v_sink))
        out["metadata"] = self.nbytes() - data
        slots = self.pos.size + self.pos_res.size + self.pos_sink.size
        out["elements"] = slots * (self.k_res.shape[-1] + self.v_res.shape[-1])
        out["itemsize"] = self.k_res.dtype.itemsize
        return out


class QuantLayout(LayerState):
    """Base of the layouts holding a `QuantStore` field `store`: its arrays read as the layout's own
    (the names the Pallas kernels take). A layout adds `pos` and `length` in its shapes."""

    kq = property(lambda self: self.store.kq)
    n_q = property(lambda self: self.store.n_q)  # int32 [B] (dense layout) or [B, K] (per-head pool)
    n_r = property(lambda self: self.store.n_r)
    vq = property(lambda self: self.store.vq)
    k_res = property(lambda self: self.store.k_res)
    v_res = property(lambda self: self.store.v_res)
    pos_res = property(lambda self: self.store.pos_res)
    k_sink = property(lambda self: self.store.k_sink)
    v_sink = property(lambda self: self.store.v_sink)
    pos_sink = property(lambda self: self.store.pos_sink)
    quantizer = property(lambda self: self.store.quantizer)
    residual = property(lambda self: self.store.residual)

    @property
    def capacity(self) -> int:
        return self.store.slots
