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


def _masked_scores(qf, qf_pos, kb, pb, slot0, length):
    """Scores [B, K, G*T, S_blk] of one key block, -inf where a key is not visible."""
    sc = jnp.einsum("bkqd,bksd->bkqs", qf, kb.astype(jnp.float32))
    used = (slot0 + jnp.arange(kb.shape[2]))[None, :] < length[:, None]  # [B, S_blk]
    visible = used[:, None, None, :] & (pb[:, :, None, :] <= qf_pos[:, None, :, None])
    return jnp.where(visible, sc, -jnp.inf)


def _over_blocks(fn, init, arrays, length, block):
    """fold `fn(carry, *blocks, slot0)` over key blocks of `arrays` ([B, K, S, ...]) in use."""
    s = arrays[0].shape[2]
    if block is None or block >= s:
        return fn(init, *arrays, 0)
    if s % block:
        raise ValueError(f"cache capacity {s} is not a multiple of the attention block {block}")

    def body(i, carry):
        start = i * block
        return fn(carry, *(jax.lax.dynamic_slice_in_dim(x, start, block, axis=2) for x in arrays), start)

    return jax.lax.fori_loop(0, (jnp.max(length) + block - 1) // block, body, init)


def blockwise_attention(q, q_pos, k, v, kv_pos, length, block: int | None = None, return_lse: bool = False):
    """Causal softmax attention with GQA over key blocks with an online softmax (flash attention).

    Never materializes more than [G*T, block] scores per KV head. Slots past `length` get exactly
    zero weight, so they must hold finite values (caches are zero-initialized and only ever written
    with real or padding tokens' K/V).

    Args:
      q: [B, T, H, D] queries (post-RoPE).  q_pos: int32 [B, T].
      k: [B, K, S, D].  v: [B, K, S, Dv] (Dv = D except for latent states).  kv_pos: int32 [B, K, S].
      length: int32 [B].
      block: key block size; None (or >= S) attends over all S slots in one pass. S must be a
        multiple of `block`. Blocks past the longest row's length are skipped.
      return_lse: also return the log-sum-exp of each query's scores, float32 [B, K, G*T].
    Returns:
      [B, T, H, Dv] in q's dtype (and the lse).
    """
    b, t, h, _ = q.shape
    n_kv, dv = k.shape[1], v.shape[-1]  # values may have another width than keys (`LatentKV` ranks)
    g = h // n_kv
    qf, qf_pos = _fold_queries(q, q_pos, n_kv)

    def one_block(carry, kb, vb, pb, slot0):
        m, l, acc = carry  # [B, K, GT], [B, K, GT], [B, K, GT, D]
        sc = _masked_scores(qf, qf_pos, kb, pb, slot0, length)
        m_new = jnp.maximum(m, sc.max(-1))
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p = jnp.exp(sc - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bkqs,bksd->bkqd", p, vb.astype(jnp.float32))
        return m_new, l, acc

    init = (jnp.full((b, n_kv, g * t), -jnp.inf, jnp.float32), jnp.zeros((b, n_kv, g * t), jnp.float32),
            jnp.zeros((b, n_kv, g * t, dv), jnp.float32))
    m, l, acc = _over_blocks(one_block, init, (k, v, kv_pos), length, block)
    out = acc / jnp.maximum(l, 1e-30)[..., None]  # rows with no visible key (padding) give 0
    out = out.reshape(b, n_kv, g, t, dv).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dv).astype(q.dtype)
    if return_lse:
        return out, m + jnp.log(jnp.maximum(l, 1e-30))
    return out


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

    def one_block(col, kb, pb, slot0):
        p = jnp.exp(_masked_scores(qf, qf_pos, kb, pb, slot0, length) - lse[..., None]) * weight[:, None, :, None]
        part = p.reshape(b, n_kv, g, t, -1).sum(3)  # [B, K, G, S_blk]
        return jax.lax.dynamic_update_slice_in_dim(col, part, slot0, axis=3)

    col = _over_blocks(one_block, jnp.zeros((b, n_kv, g, s), jnp.float32), (k, kv_pos), length, block)
    return col.reshape(b, h, s)
