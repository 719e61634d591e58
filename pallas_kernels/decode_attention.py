"""Decode attention over a dense KV cache (`DenseKV`, `RollingKV`): flash-decoding with GQA.

One new query token per row attends over the slots [0, length[b]) of its row. The work is split
along the cache (flash-decoding, Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for long-context
inference"): grid (B, K, N), program (b, k, j) runs FlashAttention-2's online softmax (Dao 2023,
arXiv 2307.08691) over split j of KV head k of row b, for all G query heads of that group at once
(they share one read of K and V), and writes its unnormalized output with its running max and sum;
a small jnp step merges the N splits. A split stops at the row's length: no block past it is read.

Legend: B batch, T = 1 query token, H query heads, K KV heads, G = H/K, D head dim, S cache slots,
M folded query rows (G padded to a power of two >= 16), N splits, bk key block.

Memory traffic per call (the roofline model `bench_kernels.py` divides by time), with L_b =
min(length[b], S) rounded up to bk, itemsizes e_kv (cache) and e_q (queries):

    bytes = sum_b K * L_b * D * 2 * e_kv          # K and V, each slot read once per KV head
          + B * H * D * e_q                       # queries
          + B * K * N * M * (D + 2) * 4 * 2       # split partials written, then read by the combine
          + B * H * D * e_q                       # output

At long context the first line dominates: attention is bound by reading the cache once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvjax.kernels import _common as C
from kvjax.kernels.block_sizes import DECODE


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, block_k: int, split: int,
                   scale: float):
    """Program (b, k, j). Refs: length (`C.scalar`); q [M, D]; k, v [split, D]; out o [M, D], m/l [1, M]."""
    start = pl.program_id(2) * split
    length = C.scalar(len_ref)
    n_blocks = jnp.clip(pl.cdiv(length - start, block_k), 0, split // block_k)
    q = q_ref[...]

    def body(i, carry):
        sl = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        valid = start + i * block_k + jnp.arange(block_k) < length  # [bk]
        s = jnp.where(valid[None, :], C.dot_nt(q, k_ref[sl, :]) * scale, -jnp.inf)
        v = jnp.where(valid[:, None], v_ref[sl, :], 0).astype(v_ref.dtype)  # unused slots may hold NaN
        return C.online_softmax_step(carry, s, v)

    C.write_partials(jax.lax.fori_loop(0, n_blocks, body, C.init_carry(q.shape[0], q.shape[1])), o_ref, m_ref, l_ref)


def _validate(q, k, v, length, who="decode_attention"):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"{who}: expected q [B, T, H, D] and k, v [B, K, S, D]; got {q.shape}, {k.shape}, {v.shape}")
    b, t, h, d = q.shape
    if t != 1:
        raise ValueError(f"{who}: one query token per row (decode), got T = {t}; prefill chunks use prefill_attention")
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"{who}: q {q.shape} does not match k {k.shape} (batch, head dim, H a multiple of K)")
    if length.shape != (b,):
        raise ValueError(f"{who}: length must be int32 [B] = [{b}], got {length.shape}")


@functools.partial(jax.jit, static_argnames=("block_k", "n_splits", "interpret"))
def decode_attention(q, k, v, length, *, block_k: int | None = None, n_splits: int | None = None,
                     interpret: bool = False):
    """Attention of one query token per row over its row's first `length` cache slots.

    Args:
      q: [B, 1, H, D] (post-RoPE).  k, v: [B, K, S, D].  length: int32 [B] slots in use (the query's
        own token included); every used slot precedes the query, so no position mask is needed.
      block_k: key slots per inner step (a power of two dividing S); default per backend
        (`block_sizes.DECODE`), shrunk to divide S.
      n_splits: cache splits (dividing S / block_k); default fills the chip.
      interpret: run the kernel in the Pallas interpreter (CPU tests).
    Returns:
      [B, 1, H, D] in q's dtype; a row with length 0 gives zeros.
    """
    _validate(q, k, v, length)
    platform = C.backend(interpret)
    table = DECODE[platform]
    b, t, h, d = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    C.check_common(q, k.dtype, d, platform, "decode_attention")
    if block_k is None:
        block_k = C.pick_block(s, table["block_k"])
    C.check_block(s, block_k, "block_k", "decode_attention")
    if block_k < C.min_block(platform):
        raise C.unsupported(f"decode_attention: block_k {block_k} (cache capacity {s}) is below the "
                            f"{platform} minimum of {C.min_block(platform)}")
    n_blocks = s // block_k
    n_splits = n_splits or C.pick_splits(n_blocks, b * n_kv, table["programs"], C.least_splits(s, table))
    if n_blocks % n_splits:
        raise C.unsupported(f"decode_attention: n_splits {n_splits} does not divide the {n_blocks} key blocks")
    split = s // n_splits
    qf = C.fold_queries(q, n_kv)  # [B, K, M, D]
    rows = qf.shape[2]
    kernel = functools.partial(_decode_kernel, block_k=block_k, split=split, scale=d ** -0.5)

    def kv_map(i, j, n, *lengths):  # TPU: splits past the row's length repeat its last block (no DMA)
        return (i, j, jnp.minimum(n, C.last_block(lengths[0][i], split)) if lengths else n, 0)

    in_specs = [pl.BlockSpec((None, None, rows, d), lambda i, j, n, *_: (i, j, 0, 0)),
                pl.BlockSpec((None, None, split, d), kv_map), pl.BlockSpec((None, None, split, d), kv_map)]
    return C.split_decode(kernel, (b, n_kv, n_splits), [length.astype(jnp.int32)], in_specs, (qf, k, v), rows=rows,
                          d=d, t=t, h=h, dtype=q.dtype, platform=platform, table=table, interpret=interpret,
                          name="kvjax_decode_attention")


def decode_attention_reference(q, k, v, length):
    """Plain-jnp float32 reference of `decode_attention` (same arguments, no blocks)."""
    _validate(q, k, v, length, "decode_attention_reference")
    b, _, h, d = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    qg = q[:, 0].reshape(b, n_kv, h // n_kv, d).astype(jnp.float32) * d ** -0.5
    sc = jnp.einsum("bkgd,bksd->bkgs", qg, k.astype(jnp.float32), precision="highest")
    used = (jnp.arange(s)[None, :] < length[:, None])[:, None, None, :]
    sc = jnp.where(used, sc, -jnp.inf)
    m = sc.max(-1, keepdims=True)
    p = jnp.exp(sc - jnp.where(jnp.isneginf(m), 0.0, m))
    v32 = jnp.where(used[:, :, 0, :, None], v.astype(jnp.float32), 0.0)
    out = jnp.einsum("bkgs,bksd->bkgd", p, v32, precision="highest") / jnp.maximum(p.sum(-1), 1e-30)[..., None]
    return out.reshape(b, 1, h, d).astype(q.dtype)
