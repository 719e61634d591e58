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

**Quantized** (`quantize`): the K/V live in a `QuantKV` (`quant`; its store has more slots than C,
the sink N + store S + residual R; `limit` = C). Until a row holds C tokens, tokens stream through the
residual and flush as in any `QuantKV`, except that a row reaching C keeps its residual (1 to R
tokens) instead of flushing it. Then each step evicts one token per head by the same rule, over the
same scores (kept slot by slot beside the store's [sink | store | residual] slots), and the new token
takes the victim's place; the counts of the sink, store and residual never change again.
Per-channel key groups are kept exact by **re-quantizing the victim's group**, not by restricting
eviction to the residual (which would change the method's choice of victims):

* a victim in the sink or the residual is overwritten in full precision;
* a victim in the quantized store is replaced by the residual's oldest token, its group (the g
  tokens sharing its key scales; values are per token) dequantized, updated and quantized again,
  and the new token enters the residual in the slot that token left. The residual keeps holding the
  newest tokens in full precision (KIVI's premise); with an empty residual the new token itself is
  written into the store's group.

Scores move with their tokens (a flush, the residual's oldest token entering the store).

Legend: B batch, K KV heads, C capacity, D head dim, H query heads, G = H/K; quantized: N sink,
S store and R residual slots per head, C' = N + S + R.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.attention import blockwise_attention
from kvjax.states.base import EMPTY_POS, LayerState
from kvjax.states.dense import DenseKV, QuantKV

RULES = ("streaming", "h2o", "tova")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RollingKV(LayerState):
    """Attributes:
      k, v: [B, K, C, D]; pos: int32 [B, K, C] original positions (None when quantized).
      length: int32 [B] tokens held per row.
      score: float32 [B, K, C] (quantized: [B, K, C']) the rule's keep-score of each slot (unused by
        "streaming").
      rule, n_sink, recent: static eviction rule and its protected tokens.
      quant: the K/V stored quantized (`QuantKV`), or None.  limit: static C when quantized.
    """

    k: jax.Array | None
    v: jax.Array | None
    pos: jax.Array | None
    length: jax.Array
    score: jax.Array
    rule: str = dataclasses.field(metadata=dict(static=True), default="streaming")
    n_sink: int = dataclasses.field(metadata=dict(static=True), default=4)
    recent: int = dataclasses.field(metadata=dict(static=True), default=0)
    quant: QuantKV | None = None
    limit: int | None = dataclasses.field(metadata=dict(static=True), default=None)

    @property
    def capacity(self) -> int:
        return self.k.shape[2] if self.quant is None else self.limit

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype, rule: str = "streaming",
             n_sink: int = 4, recent: int = 0) -> "RollingKV":
        shape = (batch, n_kv_heads, capacity)
        return cls(k=jnp.zeros(shape + (head_dim,), dtype), v=jnp.zeros(shape + (head_dim,), dtype),
                   pos=jnp.full(shape, EMPTY_POS, jnp.int32), length=jnp.zeros((batch,), jnp.int32),
                   score=jnp.zeros(shape, jnp.float32), rule=rule, n_sink=n_sink, recent=recent)

    def has_room(self, n: int = 1) -> jax.Array:
        return jnp.asarray(True)  # never full: it evicts instead

    def slot_positions(self) -> jax.Array:
        """int32 [B, K, C] (quantized: [B, K, C'], `EMPTY_POS` where unused) position in every slot."""
        return self.pos if self.quant is None else self.quant.store.slot_positions()

    def victim(self, newest) -> jax.Array:
        """int32 [B, K]: the slot each head evicts next under the rule; `newest` int32 [B] is the
        sequence's latest position (the recent window is counted from it, not from what a head holds)."""
        pos = self.slot_positions()
        if self.rule == "streaming":
            key = jnp.where(pos < self.n_sink, jnp.inf, pos.astype(jnp.float32))
        else:
            key = jnp.where(pos > (newest[:, None, None] - self.recent), jnp.inf, self.score)
        return jnp.argmin(key, axis=2).astype(jnp.int32)

    def append(self, k, v, pos, n_valid, features=None) -> "RollingKV":
        """Write one new token per row (T = 1), first evicting a token of every head if the row is full.

        k, v: [B, K, 1, D]; pos: int32 [B, 1]; n_valid: int32 [B] (0: the row is done, nothing kept).
        """
        if k.shape[2] != 1:
            raise ValueError("a capacity-bounded cache takes one token per step (decode); prefill first")
        if self.quant is not None:
            return self._append_quantized(k, v, pos, n_valid)
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

    def _append_quantized(self, k, v, pos, n_valid) -> "RollingKV":
        """`append` of a quantized state: rows with room stream through the residual; full rows evict
        (see the module docstring: the victim's group re-quantized, the residual kept newest)."""
        before = self.quant.store
        n, s = before.k_sink.shape[2], before.slots
        full = self.length >= self.capacity  # [B]
        hold = self.length + n_valid >= self.capacity  # rows full after this token keep their residual
        st = before.append(k, v, pos, jnp.where(full, 0, n_valid), hold=hold)
        score = _follow_flush(self.score, before, st)
        # full rows: the rule's victim per head (the streaming write above left them unchanged)
        victim = dataclasses.replace(self, quant=QuantKV(st), score=score).victim(pos[:, 0] - 1)  # [B, K]
        do = (full & (n_valid > 0))[:, None]  # [B, 1]
        oldest = jnp.argmin(st.pos_res, axis=2).astype(jnp.int32)  # [B, K]: unused slots hold EMPTY_POS
        rotate = (victim >= n) & (victim < n + s) & (st.per_head(st.n_r) > 0)
        res_slot = n + s + oldest
        at_oldest = lambda x: jnp.take_along_axis(x, oldest[:, :, None, None], axis=2)[:, :, 0]  # noqa: E731
        new_k, new_v = k[:, :, 0], v[:, :, 0]
        new_pos = jnp.broadcast_to(pos[:, :1], victim.shape).astype(jnp.int32)
        into = lambda old, new: jnp.where(rotate[..., None], old, new)  # noqa: E731  the victim's replacement
        st = st.replaced(victim, into(at_oldest(st.k_res), new_k), into(at_oldest(st.v_res), new_v),
                         jnp.where(rotate, jnp.take_along_axis(st.pos_res, oldest[..., None], axis=2)[..., 0],
                                   new_pos), do)
        st = st.replaced(res_slot, new_k, new_v, new_pos, do & rotate)
        # scores follow: the victim's slot takes the moved token's, the new token starts at 0
        moved = jnp.take_along_axis(score, res_slot[..., None], axis=2)[..., 0]
        slots = jnp.arange(score.shape[2])
        score = jnp.where(do[..., None] & (slots == victim[..., None]),
                          jnp.where(rotate, moved, 0.0)[..., None], score)
        score = jnp.where((do & rotate)[..., None] & (slots == res_slot[..., None]), 0.0, score)
        return dataclasses.replace(self, quant=QuantKV(st), score=score,
                                   length=jnp.minimum(self.length + n_valid.astype(jnp.int32), self.capacity))

    def attend_jnp(self, q, q_pos, block=None, return_lse: bool = False):
        if self.quant is not None:
            return self.quant.attend_jnp(q, q_pos, block, return_lse)
        return blockwise_attention(q, q_pos, self.k, self.v, self.pos, self.length, None, return_lse)

    def attend_kernel(self, q, q_pos, return_lse: bool, interpret: bool):
        """The dense kernels (slots are in no order, but a decode query sees every used one), or the
        quantized store's (the used slots are still the first n_q of the store and n_r of the residual)."""
        if self.quant is not None:
            return self.quant.attend_kernel(q, q_pos, return_lse, interpret)
        return DenseKV.attend_kernel(self, q, q_pos, return_lse, interpret)

    def observe_query(self, q, q_pos) -> "RollingKV":
        """Fold the newest query's attention (q [B, 1, H, D]) into the scores the rule evicts by."""
        if self.rule == "streaming":
            return self
        b, _, h, d = q.shape
        if self.quant is None:
            keys, pos = self.k, self.pos
            used = (jnp.arange(self.capacity)[None, :] < self.length[:, None])[:, None, None, :]
        else:  # the keys attention saw: the store dequantized
            keys, _, pos = self.quant.store.dense()
            used = (pos != EMPTY_POS)[:, :, None, :]
        n_kv = keys.shape[1]
        qg = q[:, 0].reshape(b, n_kv, h // n_kv, d).astype(jnp.float32) * (d ** -0.5)
        sc = jnp.einsum("bkgd,bksd->bkgs", qg, keys.astype(jnp.float32))
        visible = used & (pos[:, :, None, :] <= q_pos[:, :1, None, None])
        p = jax.nn.softmax(jnp.where(visible, sc, -jnp.inf), axis=-1)  # [B, K, G, C]
        if self.rule == "h2o":
            return dataclasses.replace(self, score=self.score + p.mean(2))
        shared = jnp.broadcast_to(p.mean(axis=(1, 2))[:, None, :], self.score.shape)  # tova: all heads
        return dataclasses.replace(self, score=shared)

    def positions(self) -> jax.Array:
        return self.pos if self.quant is None else self.quant.positions()

    def memory_parts(self) -> dict:
        if self.quant is None:
            return super().memory_parts()
        parts = self.quant.memory_parts()
        parts["metadata"] += self.nbytes() - self.quant.nbytes()  # scores, lengths
        return parts

    def quantize(self, quantizer, tokens: int = 0, room: int = 0) -> "RollingKV":
        """The same tokens, rule and scores with the K/V in a `QuantKV` sized for the capacity C (a
        rolling state never holds more, so `tokens` and `room` are not needed). Tokens are taken in
        position order: the first go to the sink, then whole residuals to the store, the rest to the
        residual (a full row keeps 1 to R there: its newest tokens stay in full precision while it
        evicts); each keeps its score."""
        if self.quant is not None:
            raise ValueError("this RollingKV is already quantized")
        used = jnp.arange(self.capacity)[None, None, :] < self.length[:, None, None]
        order = jnp.argsort(jnp.where(used, self.pos, EMPTY_POS), axis=2)  # held tokens by position, then unused
        take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 3)), axis=2)  # noqa: E731
        dense = DenseKV(k=take(self.k), v=take(self.v), pos=jnp.where(used, take(self.pos), EMPTY_POS),
                        length=self.length)
        q = QuantKV.from_dense(dense, quantizer, self.capacity, hold=self.length >= self.capacity)
        st = q.store
        # the score of each slot of [sink | store | residual]: its token's index in position order
        n, s, r = st.k_sink.shape[2], st.slots, st.residual
        n_sink, n_q = st.n_sink[..., None], st.n_q[:, None, None]
        token = jnp.concatenate([jnp.broadcast_to(jnp.arange(n), n_sink.shape[:2] + (n,)), n_sink + jnp.arange(s),
                                 n_sink + n_q + jnp.arange(r)], axis=2)
        score = jnp.take_along_axis(take(self.score), jnp.clip(token, 0, self.capacity - 1), axis=2)
        score = jnp.where(st.slot_positions() != EMPTY_POS, score, 0.0)
        return RollingKV(k=None, v=None, pos=None, length=self.length, score=score.astype(jnp.float32),
                         rule=self.rule, n_sink=self.n_sink, recent=self.recent, quant=q, limit=self.capacity)


def _follow_flush(score, before, after):
    """score [B, K, C'] laid out over `before`'s [sink | store | residual] slots, moved as a flush from
    `before` to `after` (rows store layout) moved the tokens: a flushed residual's scores go to the store
    slots it was written to, and its slots start again at 0."""
    n, s, r = before.k_sink.shape[2], before.slots, before.residual
    flushed = (after.n_q > before.n_q)[:, None, None]  # [B, 1, 1]
    sink, store, res = score[:, :, :n], score[:, :, n:n + s], score[:, :, n + s:]
    j = jnp.arange(s)[None, None, :] - before.n_q[:, None, None]  # offset in the flushed block
    block = jnp.take_along_axis(res, jnp.broadcast_to(jnp.clip(j, 0, r - 1), store.shape), axis=2)
    store = jnp.where(flushed & (j >= 0) & (j < r), block, store)
    return jnp.concatenate([sink, store, jnp.where(flushed, 0.0, res)], axis=2)
