"""Ragged per-head decode attention (`RaggedKV`: Ada-KV / per-head budgets in one flat pool per row).

KV head k of row b owns the pool slots [start[b, k], start[b, k] + length[b, k]); heads keep different
numbers of tokens. Program (b, k, j) reads only split j of its own head's slots (never another
head's, never past its length), for the G query heads of the group at once, with FlashAttention-2's
online softmax (Dao 2023, arXiv 2307.08691); splits are merged as in flash-decoding (Dao et al. 2023).
The plain-jnp `RaggedKV.attend` instead scores every query against the whole pool (K x the work).

Regions start anywhere. On GPU a block is loaded at the region offset, shifted left to stay inside
the pool when it would run past the end (the shifted-in slots are masked), never read out of bounds.
On TPU a block must be aligned, so program (b, k, n) reads the n-th aligned window of `split` pool
slots that the head's region touches (windows past the region repeat the last one: no DMA) and masks
the region's ends.

Legend: B batch, T query tokens (1 when decoding), H query heads, K KV heads, G = H/K, D head dim,
P pool slots, M folded query rows (G*T padded to a power of two >= 16), N splits of a region, bk key block.

Memory traffic per call, with L_bk = length[b, k] rounded up to bk:

    bytes = sum_{b,k} L_bk * D * 2 * e_kv          # each head's own K and V, once
          + B * K * 2 * 4                           # region start and length
          + B * H * D * e_q * 2                     # queries in, output out
          + B * K * N * M * (D + 2) * 4 * 2         # split partials written and combined
    (+ sum L_bk * 4 + B * T * 4 for positions when T > 1.)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvjax.kernels import _common as C
from kvjax.kernels.block_sizes import DECODE


def _tile(carry, q, qpos, k, v, pos, slot, lo, hi, scale: float):
    """One online-softmax step over the slots `slot` int32 [bk] (k, v [bk, D]; pos [bk] or None),
    masked to [lo, hi) and, when positions are given, causally to qpos [M]."""
    valid = (slot >= lo) & (slot < hi)
    seen = valid[None, :] if pos is None else valid[None, :] & (pos[None, :] <= qpos[:, None])
    s = jnp.where(seen, C.dot_nt(q, k) * scale, -jnp.inf)
    return C.online_softmax_step(carry, s, jnp.where(valid[:, None], v, 0).astype(v.dtype))


def _ragged_kernel(start_ref, len_ref, q_ref, k_ref, v_ref, *refs, block_k: int, split: int, scale: float,
                   causal: bool):
    """GPU program (b, k, j) over split j of the head's region. Refs: start, length (`C.scalar`);
    q [M, D]; k, v the row's whole pool [P, D]; with `causal` q_pos [1, M] and pos [1, P]; outputs
    o [M, D], m, l [1, M] float32. A block is loaded at the region offset, shifted left to stay inside
    the pool."""
    qpos_ref, pos_ref, *out_refs = refs if causal else (None, None, *refs)
    first = C.scalar(start_ref) + pl.program_id(2) * split  # first slot of this split
    end = C.scalar(start_ref) + C.scalar(len_ref)
    n_pool = k_ref.shape[0]
    n_blocks = jnp.clip(pl.cdiv(end - first, block_k), 0, split // block_k)
    q = q_ref[...]
    qpos = qpos_ref[0] if causal else None

    def body(i, carry):
        base = jnp.minimum(first + i * block_k, n_pool - block_k)  # stay inside the pool
        sl = pl.ds(base, block_k)
        return _tile(carry, q, qpos, k_ref[sl, :], v_ref[sl, :], pos_ref[0, sl] if causal else None,
                     base + jnp.arange(block_k), first + i * block_k, end, scale)

    C.write_partials(jax.lax.fori_loop(0, n_blocks, body, C.init_carry(q.shape[0], q.shape[1])), *out_refs)


def _window(start, length, n, split: int):
    """TPU: the pool window (a block of `split` slots) that program n of a head reads: its region's
    n-th window, clamped to the last one (a repeated block: no DMA)."""
    first = start // split
    return jnp.minimum(first + n, jnp.maximum(C.last_block(start + length, split), first))


def _ragged_kernel_tpu(start_ref, len_ref, q_ref, k_ref, v_ref, *refs, block_k: int, split: int, scale: float,
                       causal: bool):
    """TPU program (b, k, n) over the n-th pool window of `split` slots that the head's region touches.
    Refs as `_ragged_kernel` but k, v [split, D] (and pos [1, split]) hold that window: windows are
    aligned blocks the pipeline can fetch, the region's ends are masked."""
    qpos_ref, pos_ref, *out_refs = refs if causal else (None, None, *refs)
    start, length, n = C.scalar(start_ref), C.scalar(len_ref), pl.program_id(2)
    w0 = _window(start, length, n, split) * split
    lo, hi = jnp.maximum(start, w0), start + length
    mine = (length > 0) & (start // split + n == w0 // split)  # not a repeat of the last window
    first_tile = (lo - w0) // block_k
    n_tiles = jnp.where(mine, jnp.clip(pl.cdiv(hi - w0, block_k), 0, split // block_k) - first_tile, 0)
    q = q_ref[...]
    qpos = qpos_ref[0] if causal else None

    def body(i, carry):
        off = pl.multiple_of((first_tile + i) * block_k, block_k)
        sl = pl.ds(off, block_k)
        return _tile(carry, q, qpos, k_ref[sl, :], v_ref[sl, :], pos_ref[0, sl] if causal else None,
                     w0 + off + jnp.arange(block_k), lo, hi, scale)

    C.write_partials(jax.lax.fori_loop(0, n_tiles, body, C.init_carry(q.shape[0], q.shape[1])), *out_refs)


def _validate(q, k, v, start, length, q_pos, pos, who):
    if q.ndim != 4 or k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"{who}: expected q [B, T, H, D] and a pool k, v [B, P, D]; "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    b, t, h, d = q.shape
    if k.shape[0] != b or k.shape[2] != d or start.ndim != 2 or start.shape != length.shape or start.shape[0] != b:
        raise ValueError(f"{who}: q {q.shape}, pool {k.shape}, start {start.shape}, length {length.shape} do not match")
    if h % start.shape[1]:
        raise ValueError(f"{who}: {h} query heads are not a multiple of {start.shape[1]} KV heads")
    if (t > 1) != (q_pos is not None) or (q_pos is None) != (pos is None):
        raise ValueError(f"{who}: with T > 1 query tokens pass q_pos and pos (causal masks); with T = 1 neither")


@functools.partial(jax.jit, static_argnames=("block_k", "n_splits", "interpret"))
def ragged_decode_attention(q, k, v, start, length, q_pos=None, pos=None, *, block_k: int | None = None,
                            n_splits: int | None = None, interpret: bool = False):
    """Attention of each query head over its KV head's own region of a flat pool.

    Args:
      q: [B, T, H, D] (post-RoPE); T = 1 when decoding.
      k, v: [B, P, D] the pool.  start, length: int32 [B, K] region start and slots used per KV head.
      q_pos: int32 [B, T]; pos: int32 [B, P]: positions for the causal mask, needed (only) when T > 1.
      block_k: slots per inner step (a power of two <= P); default per backend.
      n_splits: splits of a region (GPU; default: fill the chip; TPU reads aligned windows of the pool).
      interpret: Pallas interpreter (CPU tests).
    Returns:
      [B, T, H, D] in q's dtype.
    """
    who = "ragged_decode_attention"
    _validate(q, k, v, start, length, q_pos, pos, who)
    platform = C.backend(interpret)
    table = DECODE[platform]
    b, t, h, d = q.shape
    n_kv, n_pool = start.shape[1], k.shape[1]
    C.check_common(q, k.dtype, d, platform, who)
    if block_k is None:
        block_k = 1 << (min(table["block_k"], n_pool).bit_length() - 1)
    if block_k & (block_k - 1) or not C.min_block(platform) <= block_k <= n_pool:
        raise C.unsupported(f"{who}: block_k {block_k} must be a power of two in [{C.min_block(platform)}, "
                            f"{n_pool}] (the pool's slots) on {platform}")
    causal = q_pos is not None
    qf = C.fold_queries(q, n_kv)
    rows = qf.shape[2]
    args = [qf, k, v] + ([C.fold_positions(q_pos, h // n_kv), C.vec(pos.astype(jnp.int32))] if causal else [])
    q_spec = pl.BlockSpec((None, None, rows, d), lambda i, j, n, *_: (i, j, 0, 0))
    qpos_spec = pl.BlockSpec((None, 1, rows), lambda i, j, n, *_: (i, 0, 0))
    if platform == "tpu":  # aligned windows of the pool, as many as the pool has
        split = block_k * max(1, min(table["max_split"], n_pool) // block_k)
        n_splits = -(-n_pool // split)
        window = lambda i, j, n, start, length: _window(start[i, j], length[i, j], n, split)  # noqa: E731
        specs = [q_spec, *[pl.BlockSpec((None, split, d), lambda *a: (a[0], window(*a), 0))] * 2]
        specs += [qpos_spec, pl.BlockSpec((None, 1, split), lambda *a: (a[0], 0, window(*a)))] if causal else []
        body = _ragged_kernel_tpu
    else:  # the whole pool per row (Triton reads through pointers); splits of each region
        max_blocks = -(-n_pool // block_k)
        n_splits = n_splits or min(max_blocks, -(-table["programs"] // (b * n_kv)))
        split = block_k * -(-max_blocks // n_splits)
        pool = pl.BlockSpec((None, n_pool, d), lambda i, j, n, *_: (i, 0, 0))
        specs = [q_spec, pool, pool]
        specs += [qpos_spec, pl.BlockSpec((None, 1, n_pool), lambda i, j, n, *_: (i, 0, 0))] if causal else []
        body = _ragged_kernel
    kernel = functools.partial(body, block_k=block_k, split=split, scale=d ** -0.5, causal=causal)
    return C.split_decode(kernel, (b, n_kv, n_splits), [start.astype(jnp.int32), length.astype(jnp.int32)], specs,
                          args, rows=rows, d=d, t=t, h=h, dtype=q.dtype, platform=platform, table=table,
                          interpret=interpret, name="kvjax_ragged_decode_attention")


def ragged_decode_attention_reference(q, k, v, start, length, q_pos=None, pos=None):
    """Plain-jnp float32 reference: every query head scores the whole pool, other heads' slots masked."""
    _validate(q, k, v, start, length, q_pos, pos, "ragged_decode_attention_reference")
    b, t, h, d = q.shape
    n_kv, n_pool = start.shape[1], k.shape[1]
    slot = jnp.arange(n_pool)[None, None, :]
    own = (slot >= start[:, :, None]) & (slot < (start + length)[:, :, None])  # [B, K, P]
    qg = q.reshape(b, t, n_kv, h // n_kv, d).astype(jnp.float32) * d ** -0.5
    sc = jnp.einsum("btkgd,bpd->bkgtp", qg, k.astype(jnp.float32), precision="highest")
    seen = own[:, :, None, None, :]
    if q_pos is not None:
        seen = seen & (pos[:, None, None, None, :] <= q_pos[:, None, None, :, None])
    sc = jnp.where(seen, sc, -jnp.inf)
    m = sc.max(-1, keepdims=True)
    p = jnp.exp(sc - jnp.where(jnp.isneginf(m), 0.0, m))
    v32 = jnp.where(own.any(1)[:, :, None], v.astype(jnp.float32), 0.0)  # slots no head uses may hold NaN
    out = jnp.einsum("bkgtp,bpd->btkgd", p, v32, precision="highest")
    out = out / jnp.maximum(p.sum(-1), 1e-30).transpose(0, 3, 1, 2)[..., None]
    return out.reshape(b, t, h, d).astype(q.dtype)
