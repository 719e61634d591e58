"""Locret inference (Huang et al. 2024, arXiv 2410.01805): retaining heads and chunked-prefill eviction.

A **retaining head** per layer maps the concatenated pre-RoPE projections [q, k, v] of a token,
(H + 2K)·D numbers, through `fc1` (no bias) -> SiLU -> `fc2` (no bias) to one score per KV head:
the predicted *causal importance* of the token (Locret §3.2; reference `LlamaAttention.fc1/fc2`).
Its parameters travel inside the layer state (`LocretKV.head`), which scores each token's pre-RoPE
features as it is appended: the model knows nothing of Locret.

**Chunked prefill with eviction** (Locret Algorithm 1): the prompt is fed in chunks; each chunk
attends over what the cache kept plus itself; its tokens are scored once by the head as they enter
(scores are stored beside the cache and never recomputed); before the next chunk each KV head keeps
its own top-`budget` tokens by stored score, the `stabilizers` most recent entries of the head forced
in. After the last chunk the cache is cut to the budget by score, keeping the prompt's last `local`
tokens (the reference prefills its last 100 tokens, the question, after the final cut, so they are
never evicted; here they count within the budget), and decoding then appends without evicting
(`finish` returns a plain `DenseKV`).

Differences from the reference, on purpose: tokens keep their original positions (the reference
caches pre-RoPE keys and re-rotates them at compacted positions 0..n-1, kvjax keeps kvpress's
convention), and the chunk is the prefill chunk of `kvjax.generation` (512; the reference: 3072).

Legend: B batch, T new tokens, S slots, K KV heads, H query heads, D head dim, F head hidden size.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvjax.states.base import StoreBacked, write_slots
from kvjax.states.dense import DenseKV

HIDDEN = 1024  # retaining-head hidden size (the paper's, for every model)


class RetainingHead(nn.Module):
    """[..., (H + 2K) D] pre-RoPE q, k, v of each token -> float32 [..., K] predicted importance."""

    hidden: int
    n_kv_heads: int

    @nn.compact
    def __call__(self, qkv):
        init = nn.initializers.normal(0.02)  # the reference's HF `_init_weights` (initializer_range)
        h = nn.silu(nn.Dense(self.hidden, use_bias=False, kernel_init=init, name="fc1")(qkv))
        return nn.Dense(self.n_kv_heads, use_bias=False, kernel_init=init, name="fc2")(h).astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LocretKV(StoreBacked):
    """A layer's cache during a Locret prefill: kept tokens, their stored scores, the budget.

    Attributes:
      store: `DenseKV` of S = budget + chunk slots, tokens in position order.
      score: float32 [B, K, S] each slot's retaining-head score (from when it entered).
      budget: int32 [B] tokens each KV head keeps per row.
      stabilizers: int32 [B] most recent entries of each head kept at every eviction but the last.
      local: int32 [B] most recent entries kept at the last eviction (the prompt's tail).
      head: the layer's retaining head {fc1: {kernel [E, F]}, fc2: {kernel [F, K]}} (E = (H + 2K) D).
    """

    store: DenseKV
    score: jax.Array
    budget: jax.Array
    stabilizers: jax.Array
    local: jax.Array
    head: dict

    AXES = {"head": ()}  # logical axes (`kvjax.sharding`): the retaining head's weights are replicated

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype, budget, stabilizers, local,
             head: dict) -> "LocretKV":
        return cls(store=DenseKV.init(batch, n_kv_heads, capacity, head_dim, dtype),
                   score=jnp.zeros((batch, n_kv_heads, capacity), jnp.float32),
                   budget=jnp.asarray(budget, jnp.int32), stabilizers=jnp.asarray(stabilizers, jnp.int32),
                   local=jnp.asarray(local, jnp.int32), head=jax.tree_util.tree_map(jnp.asarray, head))

    def append(self, k, v, pos, n_valid, features=None) -> "LocretKV":
        """Score the T new tokens with the layer's retaining head (`features` [B, T, (H + 2K) D], their
        pre-RoPE q, k, v), then `append_scored`."""
        if features is None:
            raise ValueError("a Locret cache scores every token with its retaining head, from the token's "
                             "pre-RoPE q, k, v: pass features=")
        hidden, n_kv = self.head["fc2"]["kernel"].shape
        score = RetainingHead(hidden, n_kv).apply({"params": self.head}, features)  # [B, T, K]
        return self.append_scored(k, v, pos, n_valid, score)

    def append_scored(self, k, v, pos, n_valid, score) -> "LocretKV":
        """Cut rows over budget, then write the T new tokens (k, v [B, K, T, D], pos int32 [B, T],
        n_valid int32 [B]) and their scores (float32 [B, T, K]). Rows receiving tokens keep their
        stabilizers; a row with none has seen its last chunk, so its cut is the final one (its `local`
        tail kept, as `finish` would make it: later cuts leave it unchanged)."""
        state = self.evicted(jnp.where(n_valid > 0, self.stabilizers, self.local))
        return dataclasses.replace(state, store=state.store.append(k, v, pos, n_valid),
                                   score=write_slots(state.score, score.transpose(0, 2, 1), state.length))

    def evicted(self, stabilizers, capacity: int | None = None) -> "LocretKV":
        """Every row holding more than its budget cut to it: each KV head keeps its top scores, its last
        `stabilizers` (int32 [B]) entries always in. `capacity`: slots afterwards (default: unchanged)."""
        slot = jnp.arange(self.capacity)[None, None, :]
        recent = slot >= (self.length - stabilizers)[:, None, None]
        ranked = jnp.where(recent, jnp.finfo(jnp.float32).max, self.score)
        store, score = self.store.keep_top(ranked, jnp.minimum(self.length, self.budget), capacity or self.capacity,
                                           carry=self.score)
        return dataclasses.replace(self, store=store, score=score)

    def finish(self, capacity: int) -> DenseKV:
        """The final cut to the budget (by score, the `local` tail kept) as a plain dense state of
        `capacity` slots."""
        return self.evicted(self.local, capacity).store

    def attend_jnp(self, q, q_pos, block=None, return_lse: bool = False):
        return self.store.attend_jnp(q, q_pos, block, return_lse)

    def attend_kernel(self, q, q_pos, return_lse: bool, interpret: bool):
        return self.store.attend_kernel(q, q_pos, return_lse, interpret)

