"""The layer-state protocol: what every KV layer state provides, written once here.

A cache (`KVCache`) holds layer states; the attention layer only calls this interface, so it never
knows which compression method produced a state:

    append(k, v, pos, n_valid, features) -> state   write new tokens after each row's (head's) last slot
    attend(q, q_pos, block, return_lse, impl) -> out softmax attention of queries over the stored tokens
    observe_query(q, q_pos)               -> state   hook after attention (decode-time eviction scores)
    positions()                           -> [B, K, S] (or a list per KV head) original positions held
    nbytes()                              -> int     bytes of the arrays the state holds (real memory)
    abstract(*init_args)                  -> state   shapes and dtypes only: exact bytes before anything runs
    has_room(n) / with_room(n, round_up)           room for n more tokens (traced test / host-side growth)
    memory_parts()                        -> dict    bytes by component (`memory_report`)
    quantize(quantizer, tokens, room)     -> state   the same tokens stored quantized

A subclass writes `init` (a classmethod building an empty state), `append`, `attend_jnp` (plain-jnp
attention), `positions`, and optionally `attend_kernel` (its Pallas kernel), `quantize` and room
growth. States are frozen dataclasses registered as pytrees: arrays are leaves, sizes and rules are
static fields.

Legend: B batch, T new tokens, S cache slots, H query heads, K KV heads, G = H/K group, D head dim.
"""
from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.kernels.dispatch import interpret, kernel_or, unsupported

# Position stored in slots that hold no token: larger than any query position, so causal masks drop it.
EMPTY_POS = np.iinfo(np.int32).max


def tree_nbytes(tree) -> int:
    """Exact bytes held by the arrays of a pytree (works on abstract `ShapeDtypeStruct` trees too)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


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


class LayerState(abc.ABC):
    """Base of every layer state (subclasses are frozen, pytree-registered dataclasses)."""

    sliding = False  # a sliding-window layer's state (`WindowKV`): bounded already, compression leaves it
    # every layer reading the state computes and appends its own K/V (a state read by several layers whose
    # readers keep their own new tokens: `kvjax.states.merged`); False: only the first reader writes (CLA)
    readers_write = False

    def reading(self, reader: int) -> "LayerState":
        """The state as its `reader`-th reading layer sees it (`KVCache.reader`; 0 = the first). States that
        hold something per reader (`kvjax.states.merged.MemberKV`) return themselves marked; others, themselves."""
        return self

    # ----------------------------------------------------------------------------- construction
    @classmethod
    @abc.abstractmethod
    def init(cls, *args, **kwargs) -> "LayerState":
        """An empty state (or, for states built from another, the state built from zeros)."""

    @classmethod
    def abstract(cls, *args, **kwargs) -> "LayerState":
        """The state `init(*args, **kwargs)` would build, as shapes and dtypes only (nothing allocated):
        `abstract(...).nbytes()` is the exact memory of the real one."""
        return jax.eval_shape(lambda: cls.init(*args, **kwargs))

    # ---------------------------------------------------------------------------------- writing
    @abc.abstractmethod
    def append(self, k, v, pos, n_valid, features=None) -> "LayerState":
        """Write T new tokens per row: k, v [B, K, T, D] (post-RoPE keys), pos int32 [B, T], n_valid
        int32 [B] real tokens of each row (the rest is padding). `features` [B, T, (H + 2K) D]: the
        tokens' pre-RoPE q, k, v, for states that score tokens as they enter (Locret)."""

    def observe_query(self, q, q_pos) -> "LayerState":
        """Hook after attention, for states that evict by what queries attend to (`RollingKV`)."""
        return self

    # ---------------------------------------------------------------------------------- reading
    def attend(self, q, q_pos, block: int | None = None, return_lse: bool = False, impl: str = "xla"):
        """Causal attention of q [B, T, H, D] (positions q_pos int32 [B, T]) over the stored tokens ->
        [B, T, H, D] (and the log-sum-exp [B, K, G*T] with `return_lse`).

        `impl`: "xla" the plain-jnp `attend_jnp`; "pallas" the state's kernel (`attend_kernel`; a
        ValueError naming the fallback if it has none); "auto" the kernel where there is one."""
        if impl == "xla":
            return self.attend_jnp(q, q_pos, block, return_lse)
        return kernel_or(lambda: self.attend_kernel(q, q_pos, return_lse, interpret()),
                         lambda: self.attend_jnp(q, q_pos, block, return_lse), strict=impl == "pallas")

    @abc.abstractmethod
    def attend_jnp(self, q, q_pos, block: int | None = None, return_lse: bool = False):
        """Plain-jnp attention (see `attend`)."""

    def attend_kernel(self, q, q_pos, return_lse: bool, interpret: bool):
        """The state's Pallas kernel (same contract as `attend_jnp`); raises `Unsupported` if none."""
        raise unsupported(f"no Pallas kernel for a {type(self).__name__} layer state")

    @abc.abstractmethod
    def positions(self):
        """int32 [B, K, S] original position of every slot (`EMPTY_POS` where unused), or per KV head
        a list of [B, n_k] for states whose heads hold different counts."""

    # ----------------------------------------------------------------------------------- memory
    def nbytes(self) -> int:
        return tree_nbytes(self)

    def memory_parts(self) -> dict:
        """Bytes by component: `kv` (full-precision K/V), `metadata` (positions, lengths, ...); quantized
        states split theirs into codes, scales, zeros, outliers, residual, sink. `elements` counts the
        K/V numbers held and `itemsize` their full-precision width (for bits per element)."""
        kv = tree_nbytes((self.k, self.v))
        return dict(kv=kv, metadata=self.nbytes() - kv, elements=self.k.size + self.v.size,
                    itemsize=self.k.dtype.itemsize)

    # ------------------------------------------------------------------------------------- room
    def has_room(self, n: int = 1) -> jax.Array:
        """bool []: every row (and head) can take `n` more tokens."""
        return jnp.max(self.length) + n <= self.capacity

    def with_room(self, n: int, round_up=lambda c: c) -> "LayerState":
        """At least `n` free slots past the longest row, capacity rounded up by `round_up` (host-side).
        A state that cannot grow returns itself when it has the room, else raises (no silent stop)."""
        if bool(self.has_room(n)):
            return self
        raise ValueError(f"a {type(self).__name__} layer cannot grow to take {n} more tokens")

    def shrunk(self, capacity: int, room: int, round_up=lambda c: c) -> "LayerState":
        """A freshly compressed state laid out compactly: in `capacity` slots per row (every row's
        tokens fit), or, for per-head pools, with `room` free slots after each head's tokens."""
        raise ValueError(f"cannot shrink a {type(self).__name__} layer")

    # ----------------------------------------------------------------------------- quantization
    def quantize(self, quantizer, tokens: int, room: int) -> "LayerState":
        """The same tokens stored quantized by `quantizer` (for this layer), for up to `tokens` tokens
        per row (dense layouts) or `room` more per head (per-head pools)."""
        raise ValueError(f"cannot quantize a {type(self).__name__} layer")


class StoreBacked(LayerState):
    """Base of layer states built around a `DenseKV` field `store` (its slots, positions and lengths),
    adding what they keep beside it (bases, scores): the interface delegated to the store."""

    @property
    def capacity(self) -> int:
        return self.store.capacity

    @property
    def length(self) -> jax.Array:
        return self.store.length

    def positions(self) -> jax.Array:
        return self.store.positions()

    def has_room(self, n: int = 1) -> jax.Array:
        return self.store.has_room(n)

    def memory_parts(self) -> dict:
        parts = self.store.memory_parts()
        parts["metadata"] += self.nbytes() - self.store.nbytes()  # bases, scores: beside the K/V
        return parts
