"""`ChannelKV`: keys stored in fewer channels than the head dim (ThinK's key-channel pruning, real bytes).

ThinK (Xu et al. 2024, arXiv 2407.21018) keeps, per KV head, the D' key channels j with the largest
query-driven importance and drops the others. Attention only needs q . k, a sum over channels, so the
query is gathered to the same D' channels per KV head and scored against the narrow keys: the result
is exactly attention over keys whose pruned channels are zero (ThinK's masked keys), but the pruned
channels are not stored. The softmax scale stays 1/sqrt(D) (the engine divides by the square root of
its query width D', so the gathered query is rescaled by sqrt(D'/D)). Values keep all D channels.

New tokens (decode) are stored in the same channels: the channel choice of the prefill holds for the
whole cache, and every key of a head has the same width (static shapes).

Legend: B batch, T new tokens, S slots, H query heads, K KV heads, G = H/K, D head dim, D' kept channels.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.states.base import StoreBacked
from kvjax.states.dense import DenseKV, QuantKV


def gather_channels(x: jax.Array, channels: jax.Array) -> jax.Array:
    """x [B, K, T, D] -> [B, K, T, D'] the channels `channels` int32 [B, K, D'] of each KV head."""
    return jnp.take_along_axis(x, channels[:, :, None, :].astype(jnp.int32), axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChannelKV(StoreBacked):
    """Keys pruned to D' channels per KV head (ThinK), values whole.

    Attributes:
      store: `DenseKV` with k [B, K, S, D'] (the kept channels of the post-RoPE keys) and v [B, K, S, D],
        or the same stored quantized (`QuantKV`).
      channels: int32 [B, K, D'] the head-dim index of each stored key channel, ascending.
      head_dim: D (static), the queries' width.
    """

    store: DenseKV | QuantKV
    channels: jax.Array
    head_dim: int = dataclasses.field(metadata=dict(static=True), default=0)

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype, channels) -> "ChannelKV":
        """An empty state keeping `channels` [B, K, D'] of each head's keys."""
        channels = jnp.asarray(channels, jnp.int32)
        store = DenseKV.init(batch, n_kv_heads, capacity, channels.shape[-1], dtype, value_dim=head_dim)
        return cls(store=store, channels=channels, head_dim=head_dim)

    @classmethod
    def from_dense(cls, state: DenseKV, channels: jax.Array) -> "ChannelKV":
        """A dense state's keys cut to `channels` [B, K, D'] (slots, positions and lengths unchanged)."""
        store = dataclasses.replace(state, k=gather_channels(state.k, channels))
        return cls(store=store, channels=channels.astype(jnp.int32), head_dim=state.k.shape[-1])

    def append(self, k, v, pos, n_valid, features=None) -> "ChannelKV":
        """Write T tokens (k, v [B, K, T, D]): keys in the kept channels only."""
        return dataclasses.replace(self, store=self.store.append(gather_channels(k, self.channels), v, pos, n_valid))

    def attend_jnp(self, q, q_pos, block: int | None = None, return_lse: bool = False):
        """q [B, T, H, D] gathered per KV head to its kept channels, scale kept at 1/sqrt(D)."""
        b, t, h, d = q.shape
        n_kv, kept = self.channels.shape[1], self.channels.shape[2]
        qg = q.reshape(b, t, n_kv, h // n_kv, d)
        qk = jnp.take_along_axis(qg, self.channels[:, None, :, None, :], axis=-1)  # [B, T, K, G, D']
        qk = qk.reshape(b, t, h, kept) * jnp.asarray((kept / d) ** 0.5, q.dtype)
        return self.store.attend_jnp(qk, q_pos, block, return_lse)

    def with_room(self, n: int, round_up=lambda c: c) -> "ChannelKV":
        return dataclasses.replace(self, store=self.store.with_room(n, round_up))

    def shrunk(self, capacity: int, room: int = 0, round_up=lambda c: c) -> "ChannelKV":
        return dataclasses.replace(self, store=self.store.shrunk(capacity, room, round_up))

    def quantize(self, quantizer, tokens: int, room: int = 0) -> "ChannelKV":
        """The pruned keys and the values in a quantized store. KVQuant's pre-RoPE keys need every
        channel pair to undo RoPE: refused."""
        if getattr(quantizer, "rotate", None) is not None:
            raise ValueError(f"{getattr(quantizer, 'name', quantizer)!r} rotates keys back before quantizing; "
                             "ThinK's pruned keys lack the channels RoPE pairs them with")
        return dataclasses.replace(self, store=self.store.quantize(quantizer, tokens, room))
