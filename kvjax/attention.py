"""Attention over a KV state in plain jnp: flash-style blockwise softmax, and the column sums of the
attention matrix that H2O-style scorers need, both without a [T, S] matrix per head.

Legend: B batch, T queries, S key slots, H query heads, K KV heads, G = H/K, D head dim.
Key slot s of row b is visible to query t iff `s < length[b]` and `kv_pos[b, k, s] <= q_pos[b, t]`.
The G query heads of a KV group are folded into the query axis (`[B, K, G*T, D]`): one matmul per
KV head, ~2.5x faster on CPU than a separate G axis. Scores and statistics are float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _fold_queries(q, q_pos, n_kv):
    """q [B, T, H, D] -> scaled float32 [B, K, G*T, D]; q_pos [B, T] -> [B, G*T] (row g*T + t)."""
    b, t, h, d = q.shape
    g = h // n_kv
    qf = q.reshape(b, t, n_kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, n_kv, g * t, d)
    return qf.astype(jnp.float32) * (d ** -0.5), jnp.tile(q_pos, (1, g))


def _visible(qf_pos, pb, hidden, window: int | None = None, sink: int = 0):
    """Visibility [B, K, G*T, S_blk] of one key block: slot not `hidden` [B, K, S_blk] and pos <= q_pos
    (and, with a sliding `window`, pos > q_pos - window: the query and the window - 1 tokens before it;
    or pos < `sink`: the attention sinks of a streaming head, DuoAttention's Λ-shaped mask)."""
    vis = ~hidden[:, :, None, :] & (pb[:, :, None, :] <= qf_pos[:, None, :, None])
    if window is not None:
        vis &= (pb[:, :, None, :] > qf_pos[:, None, :, None] - window) | (pb[:, :, None, :] < sink)
    return vis


def online_attention(q, q_pos, parts, return_lse: bool = False, window: int | None = None, sink: int = 0):
    """Causal softmax attention with GQA, accumulated block by block with an online softmax (flash
    attention) over any number of key sources read one block at a time.

    Each part is `(read, n)`: `read(i)` gives block i as (k [B, K, S_blk, D], v [B, K, S_blk, Dv],
    pos int32 [B, K, S_blk], hidden bool [B, K, S_blk]), where `hidden` marks slots to skip (unused,
    or read twice); k and v may also be pytrees standing for them (quantized blocks,
    `kvjax.states.quantized.KeyBlock` / `ValueBlock`) with a `shape`, k with `scores(qf)` -> q.k^T
    [B, K, G*T, S_blk] and v with `mix(p)` -> p.v [B, K, G*T, Dv], so a block is never dequantized
    whole (the scales fold into q and p); `n` is None (one block, `read(0)`) or an int32 count of
    blocks (a `fori_loop`, so a store is read and scored one block at a time, never materialized whole).
    A part may carry a third item `fused(qf, qf_pos, carry)` that continues the online softmax (m, l,
    acc) over the same keys in one call (`kvjax.native`'s kernel over a quantized store) or returns
    None where it does not apply; it is used only without a `window`.
    A key slot is visible to query t iff it is not hidden and its position is <= q_pos[b, t] (and, with
    a sliding `window` (static), > q_pos[b, t] - window: Gemma 3's local layers, HF's
    `sliding_window_overlay`; with `sink` (static) too, positions below it stay visible: a streaming
    head's sinks + recent window).

    Args:
      q: [B, T, H, D] queries (post-RoPE).  q_pos: int32 [B, T].
      return_lse: also return the log-sum-exp of each query's scores, float32 [B, K, G*T].
    Returns:
      [B, T, H, Dv] in q's dtype (and the lse). Queries that see no key get 0.
    """
    b, t, h, _ = q.shape
    k0, v0 = jax.eval_shape(lambda: parts[0][0](0)[:2])  # the shapes of a block, nothing computed
    n_kv, dv = k0.shape[1], v0.shape[-1]  # values may have another width than keys (`LatentKV` ranks)
    g = h // n_kv
    qf, qf_pos = _fold_queries(q, q_pos, n_kv)

    def one_block(carry, kb, vb, pb, hidden):
        m, l, acc = carry  # [B, K, GT], [B, K, GT], [B, K, GT, Dv]
        sc = kb.scores(qf) if hasattr(kb, "scores") else jnp.einsum("bkqd,bksd->bkqs", qf, kb.astype(jnp.float32))
        sc = jnp.where(_visible(qf_pos, pb, hidden, window, sink), sc, -jnp.inf)
        m_new = jnp.maximum(m, sc.max(-1))
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p = jnp.exp(sc - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        l = l * corr + p.sum(-1)
        pv = vb.mix(p) if hasattr(vb, "mix") else jnp.einsum("bkqs,bksd->bkqd", p, vb.astype(jnp.float32))
        acc = acc * corr[..., None] + pv
        return m_new, l, acc

    carry = (jnp.full((b, n_kv, g * t), -jnp.inf, jnp.float32), jnp.zeros((b, n_kv, g * t), jnp.float32),
             jnp.zeros((b, n_kv, g * t, dv), jnp.float32))
    for read, n, *fused in parts:
        done = fused[0](qf, qf_pos, carry) if fused and window is None else None
        if done is not None:
            carry = done
        elif n is None:
            carry = one_block(carry, *read(0))
        else:
            carry = jax.lax.fori_loop(0, n, lambda i, c, read=read: one_block(c, *read(i)), carry)
    m, l, acc = carry
    out = acc / jnp.maximum(l, 1e-30)[..., None]  # rows with no visible key (padding) give 0
    out = out.reshape(b, n_kv, g, t, dv).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dv).astype(q.dtype)
    if return_lse:
        return out, m + jnp.log(jnp.maximum(l, 1e-30))
    return out


SCORE_TILE = 1 << 15  # float32 scores per KV head a key block may produce (128 KiB)


def score_block(block: int | None, q, n_kv: int) -> int | None:
    """The key block for `block` and queries q [B, T, H, D]: `block` widened to a multiple of itself
    while the [G*T, block] score tile stays within `SCORE_TILE`. A decode step (T = 1) scores a few
    thousand keys in one pass (one pass is ~2x faster than 512-key blocks on CPU for a 2k context);
    a 512-query prefill chunk keeps `block`. None stays None (one pass)."""
    if block is None:
        return None
    rows = q.shape[1] * (q.shape[2] // n_kv)
    return max(block, SCORE_TILE // rows // block * block)


def _block_size(s: int, block: int | None) -> int:
    return s if block is None or block >= s else block


def _slot_block(arrays, length, block: int, i):
    """Block i of arrays [B, K, S, ...] (the last: positions [B, K, S]): (start, blocks, hidden), read
    from `start` = min(i * block, S - block); slots past `length` [B] or [B, K], or before i * block
    (read by the previous block when `block` does not divide S), are hidden."""
    s = arrays[0].shape[2]
    first = i * block
    start = jnp.minimum(first, s - block)
    slot = start + jnp.arange(block)
    length = length.reshape(length.shape + (1,) * (arrays[-1].ndim - length.ndim))  # [B, 1, 1] or [B, K, 1]
    blocks = tuple(jax.lax.dynamic_slice_in_dim(x, start, block, axis=2) for x in arrays)
    return start, blocks, jnp.broadcast_to((slot < first) | (slot >= length), blocks[-1].shape)


def _n_blocks(length, block: int, s: int):
    """Blocks some row uses (None: one block covers every slot)."""
    return None if block == s else (jnp.max(length) + block - 1) // block


def slot_blocks(arrays, length, block: int | None):
    """`online_attention`'s part over the first `length[b]` slots of (k, v, pos) [B, K, S, ...]:
    blocks of `block` slots (None or >= S: one block), only those some row uses."""
    s = arrays[0].shape[2]
    block = _block_size(s, block)

    def read(i):
        _, blocks, hidden = _slot_block(arrays, length, block, i)
        return blocks + (hidden,)

    return read, _n_blocks(length, block, s)


def blockwise_attention(q, q_pos, k, v, kv_pos, length, block: int | None = None, return_lse: bool = False):
    """Causal softmax attention with GQA over the first `length` slots of a dense state, by key blocks
    with an online softmax (`online_attention`); never more than [G*T, block] scores per KV head.

    Args:
      q: [B, T, H, D] queries (post-RoPE).  q_pos: int32 [B, T].
      k: [B, K, S, D].  v: [B, K, S, Dv] (Dv = D except for latent states).  kv_pos: int32 [B, K, S].
      length: int32 [B] slots in use.
      block: key block size; None (or >= S) attends over all S slots in one pass. Blocks past the
        longest row's length are skipped.
      return_lse: also return the log-sum-exp of each query's scores, float32 [B, K, G*T].
    Returns:
      [B, T, H, Dv] in q's dtype (and the lse).
    """
    return online_attention(q, q_pos, [slot_blocks((k, v, kv_pos), length, block)], return_lse)


def attention_column_sums(q, q_pos, q_valid, k, kv_pos, length, lse, block: int | None = None):
    """Sum over queries of the attention each key slot receives, per query head: float32 [B, H, S].

    A second blockwise pass with the final `lse` of `blockwise_attention(..., return_lse=True)`, so
    the probabilities are exact and no [T, S] matrix is held. Rows where `q_valid` [B, T] is False
    (padding) contribute nothing. Reference: H2O (Zhang et al. 2023) accumulated attention; kvpress
    ObservedAttentionPress (`attentions.sum(2)`).
    """
    b, t, h, _ = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    g = h // n_kv
    qf, qf_pos = _fold_queries(q, q_pos, n_kv)
    weight = jnp.tile(q_valid, (1, g)).astype(jnp.float32)  # [B, G*T]

    block = _block_size(s, block)

    def one_block(i, col):
        start, (kb, pb), hidden = _slot_block((k, kv_pos), length, block, i)
        sc = jnp.einsum("bkqd,bksd->bkqs", qf, kb.astype(jnp.float32))
        sc = jnp.where(_visible(qf_pos, pb, hidden), sc, -jnp.inf)
        p = jnp.exp(sc - lse[..., None]) * weight[:, None, :, None]
        part = p.reshape(b, n_kv, g, t, -1).sum(3)  # [B, K, G, S_blk]; hidden slots add 0
        old = jax.lax.dynamic_slice_in_dim(col, start, block, axis=3)
        return jax.lax.dynamic_update_slice_in_dim(col, old + part, start, axis=3)

    col = jnp.zeros((b, n_kv, g, s), jnp.float32)
    n = _n_blocks(length, block, s)
    col = one_block(0, col) if n is None else jax.lax.fori_loop(0, n, one_block, col)
    return col.reshape(b, h, s)
