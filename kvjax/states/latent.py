"""`LatentKV`: keys and values stored in per-head orthogonal subspaces (MatryoshkaKV).

MatryoshkaKV (Lin et al. 2024, arXiv 2410.14731) learns, per layer and KV head, orthogonal
matrices U_k, U_v [D, D] and keeps only the first r columns of each. The cache stores the
projections instead of the keys and values,

    c_k = k · U_k[:, :r_k]      [B, K, S, r_k]        c_v = v · U_v[:, :r_v]      [B, K, S, r_v]

and attention runs in the projected space: with P = U_k[:, :r_k] (orthonormal columns),
q · (k P P^T) = (q P) · c_k, so the query is projected with P and scored against c_k directly; the
attention-weighted sum of c_v is mapped back with U_v[:, :r_v]^T. At r = D this is exact attention.
Keys are projected after RoPE (the cached key is what is compressed; attention of the projected
query and key equals attention of q with the key's reconstruction k P P^T).

Legend: B batch, T new tokens, S cache slots, H query heads, K KV heads, G = H/K, D head dim,
R rank of the key (R_k) or value (R_v) subspace.

`nbytes` is the real memory: the projected arrays, positions and lengths, plus the bases themselves
(K·D·(R_k + R_v) numbers per layer, independent of S).

Quantized (`quantize`): the store of projections becomes a `QuantKV` (codes of c_k and c_v, its
residual and sink); appending, attention and growth go through the store as before.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.states.base import StoreBacked
from kvjax.states.cache import KVCache
from kvjax.states.dense import DenseKV, QuantKV


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentKV(StoreBacked):
    """One layer's keys and values in learned orthogonal subspaces: a `DenseKV` of the projections
    (its slots, positions, lengths and growth unchanged) plus the bases.

    Attributes:
      store: `DenseKV` with k = c_k [B, K, S, R_k] (post-RoPE keys projected on `uk`) and
        v = c_v [B, K, S, R_v] (values projected on `uv`), or the same stored quantized (`QuantKV`).
      uk: [K, D, R_k] orthonormal columns (U_k[:, :R_k] of each KV head).
      uv: [K, D, R_v] orthonormal columns (U_v[:, :R_v]).
    """

    store: DenseKV | QuantKV
    uk: jax.Array
    uv: jax.Array

    AXES = {"uk": ("kv_heads",), "uv": ("kv_heads",)}  # logical axes (`kvjax.sharding`): bases per KV head

    @property
    def ck(self) -> jax.Array:
        return self.store.k

    @property
    def cv(self) -> jax.Array:
        return self.store.v

    @classmethod
    def init(cls, batch: int, capacity: int, uk: jax.Array, uv: jax.Array, dtype) -> "LatentKV":
        """An empty state of `capacity` slots per row with bases uk [K, D, R_k], uv [K, D, R_v]."""
        store = DenseKV.init(batch, uk.shape[0], capacity, uk.shape[2], dtype, value_dim=uv.shape[2])
        return cls(store=store, uk=jnp.asarray(uk, dtype), uv=jnp.asarray(uv, dtype))

    def append(self, k: jax.Array, v: jax.Array, pos: jax.Array, n_valid: jax.Array, features=None) -> "LatentKV":
        """Project and write T tokens (k, v [B, K, T, D], pos int32 [B, T]) at slots [length, length + T)."""
        ck = jnp.einsum("bktd,kdr->bktr", k, self.uk.astype(k.dtype))
        cv = jnp.einsum("bktd,kdr->bktr", v, self.uv.astype(v.dtype))
        return dataclasses.replace(self, store=self.store.append(ck, cv, pos, n_valid))

    def attend_jnp(self, q: jax.Array, q_pos: jax.Array, block: int | None = None, return_lse: bool = False):
        """Attention of q [B, T, H, D] in the projected space -> [B, T, H, D] (and the lse [B, K, G*T]).

        q is projected with U_k[:, :R_k] per KV head and rescaled by sqrt(R_k / D), so the softmax
        scale stays 1/sqrt(D) (blockwise_attention divides by the square root of its query width)."""
        b, t, h, d = q.shape
        n_kv, rk = self.uk.shape[0], self.uk.shape[2]
        qg = q.reshape(b, t, n_kv, h // n_kv, d)
        qp = jnp.einsum("btkgd,kdr->btkgr", qg, self.uk.astype(q.dtype)) * jnp.asarray((rk / d) ** 0.5, q.dtype)
        out = self.store.attend_jnp(qp.reshape(b, t, h, rk), q_pos, block, return_lse)
        out, lse = out if return_lse else (out, None)
        full = jnp.einsum("btkgr,kdr->btkgd", out.reshape(b, t, n_kv, h // n_kv, -1), self.uv.astype(out.dtype))
        full = full.reshape(b, t, h, d)
        return (full, lse) if return_lse else full

    def with_room(self, n: int, round_up=lambda c: c) -> "LatentKV":
        return dataclasses.replace(self, store=self.store.with_room(n, round_up))

    def quantize(self, quantizer, tokens: int, room: int = 0) -> "LatentKV":
        """The projections stored quantized (`DenseKV.quantize`), for up to `tokens` per row. The
        quantizer sees c_k, c_v as it would keys and values (its groups must divide R_k / R_v); a
        quantizer of pre-RoPE keys (KVQuant) does not apply: projected keys have no RoPE to undo."""
        if getattr(quantizer, "rotate", None) is not None:
            raise ValueError(f"{getattr(quantizer, 'name', quantizer)!r} quantizes pre-RoPE keys; a latent state "
                             "stores projected keys (no RoPE to undo)")
        return dataclasses.replace(self, store=self.store.quantize(quantizer, tokens, room))


def latent_cache(bases_k, bases_v, batch: int, capacity: int, dtype) -> KVCache:
    """An empty cache of `LatentKV` layers: bases_k[l] [K, D, R_k(l)], bases_v[l] [K, D, R_v(l)]."""
    layers = tuple(LatentKV.init(batch, capacity, uk, uv, dtype) for uk, uv in zip(bases_k, bases_v))
    return KVCache(layers=layers, next_pos=jnp.zeros((batch,), jnp.int32))
