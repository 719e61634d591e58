"""States read by several layers, each layer (a *member*) rebuilding its own K/V from what is held once:
MiniCache's merged pairs (`SlerpKV`) and xKV's shared SVD bases (`SharedBasisKV`).

A group of layers shares one state (`KVCache.share`). The prompt's tokens are held once, in a `store` (a
`DenseKV`, or the same quantized: `QuantKV`), and member j rebuilds its keys and values from a store
block and what it holds of its own (MiniCache: per-token magnitudes; xKV: its slice of the shared basis),
one key block at a time inside the online softmax (`kvjax.attention.online_attention`): nothing is
rebuilt whole. Tokens fed after the prompt (decoding, a question) are not merged: every member appends
its own K/V to its own `tails[j]` (`readers_write`), per-layer dense (or quantized) as in any layer.

The model reads such a state through `LayerState.reading(j)` (`models.decoder.decoder_stack` passes
`KVCache.reader(layer)`): `reader` is a static field, so member j's attention is traced for that member;
the decoder sets it back to 0 before storing the state, so the cache's tree structure never changes.

`nbytes` is what is held: the store once, the per-member parts, the retained tokens and the tails.

Legend: B batch, T prompt slots, K KV heads, D head dim, M members (layers sharing the state), R retained
slots, r rank, blk a key block.
"""
from __future__ import annotations

import abc
import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax.attention import online_attention, score_block, slot_blocks
from kvjax.models.rope import apply_rope
from kvjax.states.base import EMPTY_POS, LayerState
from kvjax.states.dense import DenseKV, QuantKV


def state_parts(state, block: int | None) -> list:
    """`online_attention` parts of a `DenseKV` or `QuantKV` (none for a state of 0 slots)."""
    if isinstance(state, QuantKV):
        return state.store.attention_parts(block)
    if state.capacity == 0:
        return []
    return [slot_blocks((state.k, state.v, state.pos), state.length, block)]


def store_parts(store, block: int | None) -> list:
    """Parts of a store whose blocks come as arrays (a `QuantKV` dequantized block by block)."""
    if isinstance(store, QuantKV):
        return store.store.attention_parts(block, dequantized=True)
    if store.capacity == 0:
        return []
    return [slot_blocks((store.k, store.v, store.pos), store.length, block)]


class MemberKV(LayerState):
    """Base of the merged states: fields `store`, `tails` (one `DenseKV` / `QuantKV` per member) and the
    static `reader`; a subclass says how member j rebuilds a store block (`rebuild`) and what else it attends
    (`extra_parts`)."""

    readers_write = True

    def reading(self, reader: int) -> "MemberKV":
        if not 0 <= reader < len(self.tails):
            raise ValueError(f"a {type(self).__name__} of {len(self.tails)} members has no reader {reader}")
        return dataclasses.replace(self, reader=reader)

    @property
    def members(self) -> int:
        return len(self.tails)

    @property
    def capacity(self) -> int:
        """Tokens a member can hold: the prompt's slots plus its tail's."""
        return self.store.capacity + min(t.capacity for t in self.tails)

    @property
    def length(self) -> jax.Array:
        return self.store.length + self.tails[self.reader].length

    def positions(self) -> jax.Array:
        """int32 [B, K, S] the positions the reading member holds: the prompt's (retained tokens from its
        exact copy), then its tail's."""
        store = self.store.positions()
        store = jnp.broadcast_to(store, (store.shape[0], self.n_kv, store.shape[2]))
        return jnp.concatenate([store, *self.extra_positions(self.reader), self.tails[self.reader].positions()],
                               axis=2)

    def extra_positions(self, j: int) -> list:
        return []

    def append(self, k, v, pos, n_valid, features=None) -> "MemberKV":
        """New tokens of the reading member go to its own tail (not merged)."""
        tails = list(self.tails)
        tails[self.reader] = tails[self.reader].append(k, v, pos, n_valid)
        return dataclasses.replace(self, tails=tuple(tails))

    @abc.abstractmethod
    def rebuild(self, j: int, k, v, pos):
        """Member j's keys and values [B, K, blk, D] of a store block (k, v, pos as the store holds them)."""

    def extra_parts(self, j: int, block: int | None) -> list:
        return []

    def attend_jnp(self, q, q_pos, block: int | None = None, return_lse: bool = False):
        """The reading member's attention over its rebuilt prompt, its extra tokens and its tail."""
        j = self.reader
        block = score_block(block, q, self.n_kv)

        def rebuilt(read):
            def f(i):
                k, v, pos, hidden = read(i)
                k, v, pos = self.rebuild(j, k, v, pos)
                return k, v, pos, jnp.broadcast_to(hidden, pos.shape)
            return f

        parts = [(rebuilt(read), n) for read, n in store_parts(self.store, block)]
        parts += self.extra_parts(j, block) + state_parts(self.tails[j], block)
        return online_attention(q, q_pos, parts, return_lse)

    def has_room(self, n: int = 1) -> jax.Array:
        return jnp.all(jnp.stack([t.has_room(n) for t in self.tails]))

    def with_room(self, n: int, round_up=lambda c: c) -> "MemberKV":
        """Every member's tail grown to take `n` more tokens (the tail's slots rounded up by `round_up`)."""
        tails = tuple(t.with_room(n, round_up) for t in self.tails)
        return dataclasses.replace(self, tails=tails)

    def quantize(self, quantizer, tokens: int, room: int = 0) -> "MemberKV":
        """The store quantized (`DenseKV.quantize`: the quantizer sees its arrays as keys and values), and the
        tails that have slots; retained tokens and per-member parts stay in full precision."""
        tails = tuple(t.quantize(quantizer, t.capacity) if t.capacity else t for t in self.tails)
        store = self.store.quantize(quantizer, self.store.capacity) if self.store.capacity else self.store
        return dataclasses.replace(self, store=store, tails=tails)

    def memory_parts(self) -> dict:
        parts = self.store.memory_parts()
        for t in self.tails:
            for key, value in t.memory_parts().items():
                if key != "itemsize":
                    parts[key] = parts.get(key, 0) + value
        parts["metadata"] += self.nbytes() - self.store.nbytes() - sum(t.nbytes() for t in self.tails)
        return parts


def empty_tails(members: int, batch: int, n_kv: int, slots: int, head_dim: int, dtype) -> tuple:
    return tuple(DenseKV.init(batch, n_kv, slots, head_dim, dtype) for _ in range(members))


# ---------------------------------------------------------------------------------------------- MiniCache
def slerp(a, b, t: float, eps: float = 1e-6):
    """MiniCache's merge of two layers' vectors a (the lower layer), b [..., D] (Liu et al. 2024, arXiv
    2405.14366, eq. 3): the unit direction SLERP(a/|a|, b/|b|; t) = sin((1-t)W)/sin W a/|a| + sin(tW)/sin W b/|b|
    with W = arccos of their cosine, the magnitudes |a|, |b| and the angular distance W / pi (eq. 4).
    Where W < eps the directions are interpolated linearly and renormalized (the limit).
    Returns (direction [..., D] float32, |a| [...], |b| [...], distance [...])."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    na, nb = jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(b, axis=-1)
    ua, ub = a / jnp.maximum(na, 1e-30)[..., None], b / jnp.maximum(nb, 1e-30)[..., None]
    omega = jnp.arccos(jnp.clip(jnp.sum(ua * ub, -1), -1.0, 1.0))
    small = omega < eps
    sin = jnp.where(small, 1.0, jnp.sin(omega))
    wa = jnp.where(small, 1 - t, jnp.sin((1 - t) * omega) / sin)
    wb = jnp.where(small, t, jnp.sin(t * omega) / sin)
    e = wa[..., None] * ua + wb[..., None] * ub
    e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1), 1e-30)[..., None]
    return e, na, nb, omega / jnp.pi


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlerpKV(MemberKV):
    """A MiniCache pair of layers (arXiv 2405.14366, sec. 4): per prompt token and KV head one merged unit
    direction of the keys and one of the values (held once), each member's magnitudes, and the retained
    tokens each member keeps exactly (not merged).

    Attributes:
      store: `DenseKV` (or `QuantKV`) with k, v = the merged key / value directions [B, K, T, D]; the retained
        tokens' slots hold `EMPTY_POS` (attention reads them from `kept` instead).
      mag_k, mag_v: [M, B, K, T] each member's key / value norms, indexed by position (prompt positions are
        0..T-1).
      kept: per member a `DenseKV` [B, K, R, D] of its exact K/V at the retained tokens (`EMPTY_POS` where a
        head retains fewer than R).
      tails: per member its tokens after the prompt.
      reader: static, the member reading.
    """

    store: DenseKV | QuantKV
    mag_k: jax.Array
    mag_v: jax.Array
    kept: tuple
    tails: tuple
    reader: int = dataclasses.field(default=0, metadata=dict(static=True))

    AXES = {"mag_k": (None, "batch", "kv_heads"), "mag_v": (None, "batch", "kv_heads")}  # `kvjax.sharding`

    @property
    def n_kv(self) -> int:
        return self.mag_k.shape[2]

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, tokens: int, head_dim: int, dtype, retained: int = 0,
             members: int = 2, tail: int = 0) -> "SlerpKV":
        """A state of `tokens` merged prompt slots, `retained` retained slots and `tail` slots per member
        (zeros: the shapes `merge_pair` gives)."""
        mag = jnp.zeros((members, batch, n_kv_heads, tokens), dtype)
        return cls(store=DenseKV.init(batch, n_kv_heads, tokens, head_dim, dtype), mag_k=mag, mag_v=mag,
                   kept=empty_tails(members, batch, n_kv_heads, retained, head_dim, dtype),
                   tails=empty_tails(members, batch, n_kv_heads, tail, head_dim, dtype))

    def rebuild(self, j: int, k, v, pos):
        idx = jnp.clip(pos, 0, self.mag_k.shape[3] - 1)
        mk = jnp.take_along_axis(self.mag_k[j], idx, axis=2)[..., None]
        mv = jnp.take_along_axis(self.mag_v[j], idx, axis=2)[..., None]
        return k * mk.astype(k.dtype), v * mv.astype(v.dtype), pos

    def extra_parts(self, j: int, block: int | None) -> list:
        return state_parts(self.kept[j], block)

    def extra_positions(self, j: int) -> list:
        return [self.kept[j].pos]

    def retained(self) -> jax.Array:
        """int32 [B, K] tokens each head of each row retains unmerged."""
        return jnp.sum(self.kept[0].pos != EMPTY_POS, axis=2)


RETENTION = ("threshold", "distinct")


def merge_pair(a: DenseKV, b: DenseKV, t: float, gamma: float, rule: str, tail: int) -> SlerpKV:
    """MiniCache's merge of two layers' prompt caches a (lower), b (upper), [B, K, T, D] in the same slots.

    Retention (both layers keep those tokens exactly): a token's distance is the mean of its key and value
    angular distances; per row and head, at most R = ceil(gamma T) tokens are retained:
      "threshold": the paper's eq. 5 read literally, I = {i : d_i < d_min + (d_max - d_min) gamma} (the most
        *similar* tokens), the R nearest if more qualify;
      "distinct": the ceil(gamma n) most distant tokens (n the row's tokens), the reading in which the
        retained tokens are the ones merging would harm.
    """
    bsz, n_kv, s, d = a.k.shape
    dk, ma_k, mb_k, dist_k = slerp(a.k, b.k, t)
    dv, ma_v, mb_v, dist_v = slerp(a.v, b.v, t)
    dist = (dist_k + dist_v) / 2  # [B, K, T]
    valid = (jnp.arange(s)[None, None, :] < a.length[:, None, None])
    r = min(s, math.ceil(gamma * s - 1e-9))  # R = ceil(gamma T)
    if r:
        if rule == "threshold":
            lo = jnp.min(jnp.where(valid, dist, jnp.inf), axis=2, keepdims=True)
            hi = jnp.max(jnp.where(valid, dist, -jnp.inf), axis=2, keepdims=True)
            score = jnp.where(valid & (dist < lo + (hi - lo) * gamma), -dist, -jnp.inf)  # nearest first
            top_score, idx = jax.lax.top_k(score, r)  # [B, K, R]
            take = jnp.isfinite(top_score)
        else:
            top_score, idx = jax.lax.top_k(jnp.where(valid, dist, -jnp.inf), r)  # most distant first
            n = jnp.ceil(gamma * a.length.astype(jnp.float32) - 1e-6).astype(jnp.int32)  # ceil(gamma n) per row
            take = jnp.isfinite(top_score) & (jnp.arange(r)[None, None, :] < n[:, None, None])
        rows, heads = jnp.arange(bsz)[:, None, None], jnp.arange(n_kv)[None, :, None]
        hit = jnp.zeros((bsz, n_kv, s), jnp.int32).at[rows, heads, idx].max(take.astype(jnp.int32)) > 0
    else:
        hit, idx, take = jnp.zeros((bsz, n_kv, s), bool), jnp.zeros((bsz, n_kv, 0), jnp.int32), None

    def exact(state):
        g = lambda x: jnp.take_along_axis(x, idx[..., None], axis=2)  # noqa: E731
        pos = jnp.take_along_axis(state.pos, idx, axis=2)
        pos = pos if take is None else jnp.where(take, pos, EMPTY_POS)
        return DenseKV(k=g(state.k), v=g(state.v), pos=pos, length=jnp.full((bsz,), r, jnp.int32))

    dt = a.k.dtype
    store = DenseKV(k=dk.astype(dt), v=dv.astype(dt), pos=jnp.where(hit, EMPTY_POS, a.pos), length=a.length)
    return SlerpKV(store=store, mag_k=jnp.stack([ma_k, mb_k]).astype(dt), mag_v=jnp.stack([ma_v, mb_v]).astype(dt),
                   kept=(exact(a), exact(b)), tails=empty_tails(2, bsz, n_kv, tail, d, dt))


# --------------------------------------------------------------------------------------------------- xKV
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedBasisKV(MemberKV):
    """An xKV group of layers (Chang et al. 2025, arXiv 2503.18893, sec. 3): the pre-RoPE keys of the group's
    M layers, side by side per token ([T, M K D]), factored by one SVD, X ~ U_r (S_r V_r^T); per token the r
    coefficients U_r are held once, per member its slice of S_r V_r^T [r, K D]. Values the same (no RoPE).
    Member j's keys are RoPE(c_k B_k[j]) at the tokens' positions: RoPE is re-applied after reconstruction.

    Attributes:
      store: `DenseKV` of one "head": k = key coefficients [B, 1, T, r_k], v = value coefficients
        [B, 1, T, r_v], pos [B, 1, T] (or the same quantized, `QuantKV`).
      basis_k: [M, B, r_k, K D]; basis_v: [M, B, r_v, K D] each member's slice of the right singular vectors.
      tails: per member its tokens after the prompt.
      inv_freq: static, the RoPE inverse frequencies (a tuple) the keys are rotated by.
      reader: static, the member reading.
    """

    store: DenseKV | QuantKV
    basis_k: jax.Array
    basis_v: jax.Array
    tails: tuple
    inv_freq: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    reader: int = dataclasses.field(default=0, metadata=dict(static=True))

    AXES = {"basis_k": (None, "batch"), "basis_v": (None, "batch")}  # `kvjax.sharding`: [M, B, r, K D]

    @property
    def n_kv(self) -> int:
        return self.tails[0].pos.shape[1]

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, tokens: int, head_dim: int, dtype, rank_k: int = 1, rank_v: int = 1,
             members: int = 2, tail: int = 0, inv_freq: tuple = ()) -> "SharedBasisKV":
        kd = n_kv_heads * head_dim
        return cls(store=DenseKV.init(batch, 1, tokens, rank_k, dtype, value_dim=rank_v),
                   basis_k=jnp.zeros((members, batch, rank_k, kd), dtype),
                   basis_v=jnp.zeros((members, batch, rank_v, kd), dtype),
                   tails=empty_tails(members, batch, n_kv_heads, tail, head_dim, dtype),
                   inv_freq=inv_freq or tuple([1.0] * (head_dim // 2)))

    def rebuild(self, j: int, ck, cv, pos):
        """ck [B, 1, blk, r_k], cv [B, 1, blk, r_v], pos [B, 1, blk] -> k, v [B, K, blk, D], pos [B, K, blk]."""
        b, _, blk, _ = ck.shape
        n_kv = self.n_kv
        d = self.basis_k.shape[3] // n_kv
        k = jnp.einsum("bsr,brn->bsn", ck[:, 0], self.basis_k[j].astype(ck.dtype)).reshape(b, blk, n_kv, d)
        v = jnp.einsum("bsr,brn->bsn", cv[:, 0], self.basis_v[j].astype(cv.dtype)).reshape(b, blk, n_kv, d)
        at = jnp.where(pos[:, 0] == EMPTY_POS, 0, pos[:, 0])[:, :, None]  # unused slots: any finite angle
        k = apply_rope(k, at, jnp.asarray(self.inv_freq, jnp.float32))
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), jnp.broadcast_to(pos, (b, n_kv, blk))

    def quantize(self, quantizer, tokens: int, room: int = 0) -> "SharedBasisKV":
        if getattr(quantizer, "rotate", None) is not None:
            raise ValueError(f"{getattr(quantizer, 'name', quantizer)!r} quantizes pre-RoPE keys; an xKV state stores "
                             "key coefficients (no RoPE to undo)")
        group = getattr(quantizer, "group", None)
        ranks = (self.basis_k.shape[2], self.basis_v.shape[2])
        if group and any(r % group for r in ranks):
            raise ValueError(f"xkv: the quantizer's group {group} does not divide the ranks {ranks} (choose ranks "
                             f"that are multiples of {group})")
        return super().quantize(quantizer, tokens, room)


def low_rank(x, valid, rank: int):
    """x [B, T, N] float32 -> (coefficients [B, T, rank], basis [B, rank, N]) of its rank-`rank` truncated SVD
    X ~ U_r (S_r V_r^T) over the rows where `valid` [B, T] (the others are zeroed first and get zero
    coefficients); ranks above min(T, N) are padded with zeros. The singular values go with the basis, so every
    coefficient column has unit norm: a quantizer grouping a token's coefficients (KIVI's values) sees entries
    of one scale, not the singular values' range."""
    x = jnp.where(valid[..., None], x, 0.0)
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)  # [B, T, m], [B, m], [B, m, N]
    m = s.shape[-1]
    c, basis = u[..., :rank], (s[:, :, None] * vt)[:, :rank]
    if rank > m:
        c = jnp.pad(c, [(0, 0), (0, 0), (0, rank - m)])
        basis = jnp.pad(basis, [(0, 0), (0, rank - m), (0, 0)])
    return c, basis


def factor_group(states, inv_freq, rank_k: int, rank_v: int, tail: int) -> SharedBasisKV:
    """xKV's shared factorization of the prompt caches of a group of layers (`DenseKV`s [B, K, T, D] holding
    the same tokens in the same slots): keys rotated back to pre-RoPE, concatenated over the group's layers
    and heads per token, truncated to `rank_k` (values: `rank_v`)."""
    first = states[0]
    b, n_kv, s, d = first.k.shape
    pos = first.pos[:, 0]  # [B, T] every head holds the prompt's positions
    valid = jnp.arange(s)[None, :] < first.length[:, None]
    freq = jnp.asarray(inv_freq, jnp.float32)
    at = jnp.where(valid, pos, 0)[:, :, None]
    keys = [apply_rope(st.k.transpose(0, 2, 1, 3).astype(jnp.float32), -at, freq).reshape(b, s, n_kv * d)
            for st in states]
    values = [st.v.transpose(0, 2, 1, 3).astype(jnp.float32).reshape(b, s, n_kv * d) for st in states]
    ck, bk = low_rank(jnp.concatenate(keys, -1), valid, rank_k)
    cv, bv = low_rank(jnp.concatenate(values, -1), valid, rank_v)
    dt, m = first.k.dtype, len(states)
    store = DenseKV(k=ck[:, None].astype(dt), v=cv[:, None].astype(dt), pos=first.pos[:, :1], length=first.length)
    split = lambda basis: jnp.stack(jnp.split(basis, m, axis=-1)).astype(dt)  # noqa: E731  [M, B, r, K D]
    return SharedBasisKV(store=store, basis_k=split(bk), basis_v=split(bv),
                         tails=empty_tails(m, b, n_kv, tail, d, dt), inv_freq=tuple(float(f) for f in inv_freq))


__all__ = ["MemberKV", "SlerpKV", "SharedBasisKV", "slerp", "merge_pair", "factor_group", "low_rank", "RETENTION"]
