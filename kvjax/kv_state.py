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
        # One scatter with in-bounds, unique indices: XLA updates the buffer in place (a vmapped
        # dynamic_update_slice lowers to a select that copies the whole cache every decode step).
        idx = (jnp.arange(b)[:, None, None], jnp.arange(n_kv)[None, :, None],
               (self.length[:, None] + jnp.arange(t))[:, None, :])  # broadcast to [B, K, T]
        write = lambda buf, new: buf.at[idx].set(new.astype(buf.dtype), mode="promise_in_bounds",  # noqa: E731
                                                 unique_indices=True)
        return DenseKV(k=write(self.k, k), v=write(self.v, v), pos=write(self.pos, pos_bkt),
                       length=self.length + n_valid.astype(jnp.int32))

    def attend(self, q: jax.Array, q_pos: jax.Array, block: int | None = None) -> jax.Array:
        """Causal attention of q [B, T, H, D] (positions q_pos [B, T]) over the stored tokens -> [B, T, H, D]."""
        return blockwise_attention(q, q_pos, self.k, self.v, self.pos, self.length, block)

    def nbytes(self) -> int:
        return tree_nbytes(self)

    def positions(self) -> jax.Array:
        return self.pos

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

    def with_capacity(self, capacity: int) -> "KVCache":
        return dataclasses.replace(self, layers=tuple(l.with_capacity(capacity) for l in self.layers))


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


def kept_positions(cache: KVCache) -> list[np.ndarray]:
    """Per layer, int32 [B, K, n] original positions held (sorted; rows must hold equal counts)."""
    out = []
    for layer in cache.layers:
        pos, length = np.asarray(layer.positions()), np.asarray(layer.length)
        if len(set(length.tolist())) > 1:
            raise ValueError("rows hold different numbers of tokens; select one row first")
        out.append(np.sort(pos[:, :, : int(length[0])], axis=-1))
    return out


# ------------------------------------------------------------------------------------- attention
def blockwise_attention(q, q_pos, k, v, kv_pos, length, block: int | None = None):
    """Causal softmax attention with GQA, over key blocks with an online softmax (flash attention).

    Never materializes more than [G*T, block] scores per KV head, so a long prompt prefilled in
    chunks costs O(chunk * block) memory. Key slot s of row b is visible to query t iff
    `s < length[b]` and `kv_pos[b, k, s] <= q_pos[b, t]`. Scores and softmax statistics are float32.
    The G query heads of a group are folded into the query axis (one [G*T, D] x [D, S] matmul per KV
    head), which on CPU is ~2.5x faster than a separate G axis.

    Slots past `length` are multiplied by exactly zero weights, so they must hold finite values
    (caches are zero-initialized and only ever written with real or padding tokens' K/V).

    Args:
      q: [B, T, H, D] queries (post-RoPE).  q_pos: int32 [B, T].
      k, v: [B, K, S, D].  kv_pos: int32 [B, K, S].  length: int32 [B].
      block: key block size; None (or >= S) attends over all S slots in one pass. S must be a
        multiple of `block`. Blocks past the longest row's length are skipped.
    Returns:
      [B, T, H, D] in q's dtype.
    """
    b, t, h, d = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    g = h // n_kv
    # [B, T, K, G, D] -> [B, K, G*T, D]; query row r = g*T + t has position q_pos[t]
    qf = (q.reshape(b, t, n_kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, n_kv, g * t, d)
          .astype(jnp.float32) * (d ** -0.5))
    qf_pos = jnp.tile(q_pos, (1, g))  # [B, G*T]

    def one_block(carry, kb, vb, pb, slot0):
        m, l, acc = carry  # [B, K, GT], [B, K, GT], [B, K, GT, D]
        sc = jnp.einsum("bkqd,bksd->bkqs", qf, kb.astype(jnp.float32))
        used = (slot0 + jnp.arange(kb.shape[2]))[None, :] < length[:, None]  # [B, S_blk]
        visible = used[:, None, None, :] & (pb[:, :, None, :] <= qf_pos[:, None, :, None])
        sc = jnp.where(visible, sc, -jnp.inf)
        m_new = jnp.maximum(m, sc.max(-1))
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p = jnp.exp(sc - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bkqs,bksd->bkqd", p, vb.astype(jnp.float32))
        return m_new, l, acc

    init = (jnp.full((b, n_kv, g * t), -jnp.inf, jnp.float32), jnp.zeros((b, n_kv, g * t), jnp.float32),
            jnp.zeros((b, n_kv, g * t, d), jnp.float32))
    if block is None or block >= s:
        _, l, acc = one_block(init, k, v, kv_pos, 0)
    else:
        if s % block:
            raise ValueError(f"cache capacity {s} is not a multiple of the attention block {block}")
        n_blocks = (jnp.max(length) + block - 1) // block

        def body(i, carry):
            start = i * block
            sl = lambda x: jax.lax.dynamic_slice_in_dim(x, start, block, axis=2)  # noqa: E731
            return one_block(carry, sl(k), sl(v), sl(kv_pos), start)

        _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]  # rows with no visible key (padding) give 0
    return out.reshape(b, n_kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)
