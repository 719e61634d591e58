"""Observations: what eviction scorers need from the prefill, gathered chunk by chunk (never T x T).

`ObsSpec` (static) says what to gather; `LayerObs` (a pytree, one per layer) holds it:

* window queries (SnapKV, PyramidKV, TOVA): post-RoPE queries of each row's last `window` prompt
  tokens, captured from whichever prefill chunk holds them;
* column sums (H2O / ObservedAttention): sum over all prompt queries of the attention each key slot
  receives, from a second blockwise pass with the exact log-sum-exp (`attention_column_sums`);
* query statistics (ExpectedAttention): sum and sum of outer products of pre-RoPE queries at
  positions >= `qstats_from`, per query head.

Legend: B batch, T chunk tokens, W window, S cache slots, H query heads, D head dim.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from kvjax.attention import attention_column_sums
from kvjax.kernels import dispatch


@dataclasses.dataclass(frozen=True)
class ObsSpec:
    window: int = 0  # window queries to keep (0: none)
    col_sums: bool = False
    qstats_from: int | None = None  # first position counted in query statistics (None: no stats)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerObs:
    """Attributes (fields a spec does not ask for have a zero-sized axis):
      q_win: [B, W, H, D] post-RoPE queries at positions `win_pos`.
      win_pos: int32 [B, W] positions of the window queries (negative: before the prompt, unused).
      col_sum: float32 [B, H, S] attention received by each slot, summed over prompt queries.
      q_sum: float32 [B, H, D]; q_sq: float32 [B, H, D, D]; q_cnt: float32 [B]: pre-RoPE query stats.
    """

    q_win: jax.Array
    win_pos: jax.Array
    col_sum: jax.Array
    q_sum: jax.Array
    q_sq: jax.Array
    q_cnt: jax.Array


def init_layer_obs(spec: ObsSpec, lengths, n_heads: int, head_dim: int, capacity: int, dtype) -> LayerObs:
    """Empty observations for rows of total prompt lengths `lengths` [B]."""
    b = lengths.shape[0]
    w = spec.window
    s = capacity if spec.col_sums else 0
    dq = head_dim if spec.qstats_from is not None else 0
    return LayerObs(
        q_win=jnp.zeros((b, w, n_heads, head_dim), dtype),
        win_pos=(jnp.asarray(lengths, jnp.int32)[:, None] - w + jnp.arange(w, dtype=jnp.int32)),
        col_sum=jnp.zeros((b, n_heads, s), jnp.float32),
        q_sum=jnp.zeros((b, n_heads, dq), jnp.float32),
        q_sq=jnp.zeros((b, n_heads, dq, dq), jnp.float32),
        q_cnt=jnp.zeros((b,), jnp.float32),
    )


def observe_chunk(spec: ObsSpec, obs: LayerObs, q_pre, q, positions, n_valid, state, lse, block,
                  attention_impl: str = "xla") -> LayerObs:
    """Fold one prefill chunk into a layer's observations.

    Args:
      q_pre, q: [B, T, H, D] queries before / after RoPE.  positions: int32 [B, T].
      n_valid: int32 [B] real tokens of each row in this chunk.  state: the layer state after the
        chunk was appended.  lse: [B, K, G*T] log-sum-exp of the chunk's attention (col sums only).
      attention_impl: "pallas"/"auto" sum columns with the key-major kernel (`kvjax.kernels`), "xla" in jnp.
    """
    valid = jnp.arange(q.shape[1])[None, :] < n_valid[:, None]  # [B, T]
    updates = {}
    if spec.window:
        idx = obs.win_pos - positions[:, :1]  # [B, W] index of each window position in this chunk
        here = (idx >= 0) & (idx < n_valid[:, None])
        picked = jnp.take_along_axis(q, jnp.clip(idx, 0, q.shape[1] - 1)[:, :, None, None], axis=1)
        updates["q_win"] = jnp.where(here[:, :, None, None], picked.astype(obs.q_win.dtype), obs.q_win)
    if spec.col_sums:
        if attention_impl in ("pallas", "auto"):
            col = dispatch.column_sums(q, positions, valid, state, lse)
        else:
            col = attention_column_sums(q, positions, valid, state.k, state.pos, state.length, lse, block)
        updates["col_sum"] = obs.col_sum + col
    if spec.qstats_from is not None:
        m = (valid & (positions >= spec.qstats_from)).astype(jnp.float32)  # [B, T]
        q32 = q_pre.astype(jnp.float32)
        updates["q_sum"] = obs.q_sum + jnp.einsum("bt,bthd->bhd", m, q32)
        updates["q_sq"] = obs.q_sq + jnp.einsum("bt,bthd,bthe->bhde", m, q32, q32)
        updates["q_cnt"] = obs.q_cnt + m.sum(1)
    return dataclasses.replace(obs, **updates)

