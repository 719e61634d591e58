"""KV-cache state pytrees and the small pure interface every layer state provides.

A cache (`KVCache`) is one *layer state* per layer plus each row's next position. The attention layer
only calls the layer-state interface, so it never knows which compression method produced a state:

    append(state, k, v, pos, n_valid) -> state     write new tokens after each row's last slot
    attend(state, q, q_pos)           -> out        softmax attention of queries over the stored tokens
    nbytes(state)                     -> int        bytes of the arrays the state holds (real memory)
    positions(state)                  -> [B, K, S]  original token position of every slot

Legend: B batch, T new tokens, S cache slots, H query heads, K KV heads, G = H/K group, D head dim.

`DenseKV` is the full-precision state. Rows of a batch may hold different numbers of tokens: slots at
or past a row's `length` are garbage and masked out (they are overwritten by the next append).
"""
from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import blockwise_attention

# Position stored in slots that hold no token: larger than any query position, so causal masks drop it.
EMPTY_POS = np.iinfo(np.int32).max


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKV:
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
    def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype) -> "DenseKV":
        shape = (batch, n_kv_heads, capacity, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            pos=jnp.full(shape[:3], EMPTY_POS, jnp.int32),
            length=jnp.zeros((batch,), jnp.int32),
        )

    @classmethod
    def abstract(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype) -> "DenseKV":
        """Shapes and dtypes only: the memory a state will take, without allocating it."""
        return jax.eval_shape(lambda: cls.init(batch, n_kv_heads, capacity, head_dim, dtype))

    def append(self, k: jax.Array, v: jax.Array, pos: jax.Array, n_valid: jax.Array) -> "DenseKV":
        """Write T new tokens at slots [length, length + T) of each row; `length += n_valid`.

        Args:
          k, v: [B, K, T, D] new keys (post-RoPE) and values.
          pos: int32 [B, T] their positions.
          n_valid: int32 [B] how many of the T tokens are real for each row (the rest is padding that
            lands past `length` and is overwritten later). The caller guarantees `length + T <= S`.
        """
        b, n_kv, t = k.shape[:3]
        pos_bkt = jnp.broadcast_to(pos[:, None, :], (b, n_kv, t)).astype(jnp.int32)
        return DenseKV(k=write_slots(self.k, k, self.length), v=write_slots(self.v, v, self.length),
                       pos=write_slots(self.pos, pos_bkt, self.length),
                       length=self.length + n_valid.astype(jnp.int32))

    def attend(self, q: jax.Array, q_pos: jax.Array, block: int | None = None, return_lse: bool = False):
        """Causal attention of q [B, T, H, D] (positions q_pos [B, T]) over the stored tokens -> [B, T, H, D]
        (and the log-sum-exp [B, K, G*T] with `return_lse`)."""
        return blockwise_attention(q, q_pos, self.k, self.v, self.pos, self.length, block, return_lse)

    def observe_query(self, q, q_pos) -> "DenseKV":
        """Hook after attention for states that evict by what queries attend to (`RollingKV`)."""
        return self

    def nbytes(self) -> int:
        return tree_nbytes(self)

    def positions(self) -> jax.Array:
        return self.pos

    def has_room(self, n: int = 1) -> jax.Array:
        """bool []: every row can take `n` more tokens."""
        return jnp.max(self.length) + n <= self.capacity

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


class StoreBacked:
    """Mixin of layer states built around a `DenseKV` field `store` (its slots, positions and lengths),
    adding what they keep beside it (bases, scores): the interface delegated to the store."""

    @property
    def capacity(self) -> int:
        return self.store.capacity

    @property
    def length(self) -> jax.Array:
        return self.store.length

    def observe_query(self, q, q_pos):
        return self

    def nbytes(self) -> int:
        return tree_nbytes(self)

    def positions(self) -> jax.Array:
        return self.store.positions()

    def has_room(self, n: int = 1) -> jax.Array:
        return self.store.has_room(n)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The whole cache: one layer state per layer and each row's next token position.

    Attributes:
      layers: tuple of layer states (may differ by layer: budgets, sharing, quantization).
      next_pos: int32 [B] the position the next token of each row gets (= tokens seen so far,
        compressed or not, as in kvpress).
    """

    layers: tuple
    next_pos: jax.Array

    @property
    def batch(self) -> int:
        return self.next_pos.shape[0]

    @property
    def capacity(self) -> int:
        return min(layer.capacity for layer in self.layers)

    def with_room(self, n: int, round_up=lambda c: c) -> "KVCache":
        """Grow each layer so it has at least `n` free slots past its longest row (host-side).

        `round_up` maps a slot count to the capacity to allocate (e.g. a bucket)."""
        return dataclasses.replace(self, layers=tuple(layer.with_room(n, round_up) for layer in self.layers))


def write_slots(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """buf [B, K, S, ...] with new [B, K, T, ...] written at slots [start[b], start[b] + T) of each row.

    One scatter with in-bounds, unique indices, so XLA updates the buffer in place (a vmapped
    dynamic_update_slice lowers to a select that copies the whole cache every decode step).
    The caller guarantees start + T <= S.
    """
    b, n_kv, t = new.shape[:3]
    idx = (jnp.arange(b)[:, None, None], jnp.arange(n_kv)[None, :, None],
           (start[:, None] + jnp.arange(t))[:, None, :])  # broadcast to [B, K, T]
    return buf.at[idx].set(new.astype(buf.dtype), mode="promise_in_bounds", unique_indices=True)


def tree_nbytes(tree) -> int:
    """Exact bytes held by the arrays of a pytree (works on abstract `ShapeDtypeStruct` trees too)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


def cache_nbytes(cache: KVCache) -> int:
    """Exact bytes held by a cache's arrays: the memory the KV cache really takes."""
    return tree_nbytes(cache)


def init_cache(n_layers: int, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype) -> KVCache:
    layers = tuple(DenseKV.init(batch, n_kv_heads, capacity, head_dim, dtype) for _ in range(n_layers))
    return KVCache(layers=layers, next_pos=jnp.zeros((batch,), jnp.int32))


def kept_positions(cache: KVCache) -> list:
    """Per layer, int32 [B, K, n] original positions held, sorted (rows must hold equal counts);
    for a layer whose heads keep different counts (`RaggedKV`), a list per KV head of [B, n_k]."""
    out = []
    for layer in cache.layers:
        pos = layer.positions()
        if isinstance(pos, list):  # per-head lists already
            out.append(pos)
            continue
        pos, length = np.asarray(pos), np.asarray(layer.length)
        if len(set(length.tolist())) > 1:
            raise ValueError("rows hold different numbers of tokens; select one row first")
        out.append(np.sort(pos[:, :, : int(length[0])], axis=-1))
    return out
