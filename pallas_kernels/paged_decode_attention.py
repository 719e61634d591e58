"""Paged decode attention (`PagedKV`: a page pool shared by every row and KV head, a page table each).

Logical slot s of KV head k of row b lives in pool page table[b, k, s // P] at offset s % P; a table
entry of -1 is a freed page (a hole left by eviction), and slots that hold no token (evicted, or past
the head's fill) have position `EMPTY_POS`, which no query position reaches. Program (b, k, n) reads
the logical pages of split n of its head's table, `block_k // P` pages per step, with FlashAttention-2's
online softmax (Dao 2023, arXiv 2307.08691); splits are merged as in flash-decoding (Dao et al. 2023).
This is vLLM's PagedAttention (Kwon et al. 2023, arXiv 2309.06180) with one table per KV head, so
per-head eviction (Ada-KV) frees pages too.

The kernel's block is `block_k` slots made of whole pages: a page size that does not tile it (a
power of two dividing block_k; at least 16 on GPU, Triton's smallest dot) is refused with one line.
On GPU a program holds the whole pool through pointers and loads page table[b, k, i] at any index.
On TPU a block must be fetched by the pipeline: the pool is passed once per page of a block, page j's
index map reading the table (scalar-prefetched into SMEM), so program (b, k, n) gets the n-th block's
pages; pages past the head's used ones repeat the last used page (a repeated block: no DMA).

Legend: B batch, T query tokens (1 when decoding), H query heads, K KV heads, G = H/K, D head dim,
NP pool pages, P page size (slots), MP table entries per head, M folded query rows (G*T padded to a
power of two >= 16), N splits of a table.

Memory traffic per call, with U_bk = pages head k of row b uses:

    bytes = sum_{b,k} U_bk * P * (D * 2 * e_kv + 4)   # each used page's K, V and positions, once
          + B * K * (MP + 1) * 4                       # page table and pages used
          + B * T * (H * D * e_q * 2 + 4)              # queries and positions in, output out
          + B * K * N * M * (D + 2) * 4 * 2            # split partials written and combined
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvjax.kernels import _common as C
from kvjax.kernels.block_sizes import DECODE


def check_page_size(page: int, block_k: int | None, platform: str, who: str) -> int:
    """The kernel's block (slots) for pages of `page` slots: `block_k`, or the backend default (at
    least one page). Raises one line unless the page tiles it."""
    if page < 1 or page & (page - 1) or page < C.min_block(platform):
        raise C.unsupported(f"{who}: page size {page} does not tile the kernel's block (a power of two >= "
                            f"{C.min_block(platform)} on {platform})")
    block = block_k or max(page, DECODE[platform]["block_k"])
    if block % page:
        raise C.unsupported(f"{who}: page size {page} does not tile the kernel's block of {block} slots")
    return block


def _page_step(carry, q, qpos, k, v, pos, ok, scale: float):
    """One online-softmax step over one page: k, v [P, D], pos [P]; `ok` false for a freed or unused
    table entry (nothing of the page is read into the result)."""
    seen = ok & (pos[None, :] <= qpos[:, None])
    s = jnp.where(seen, C.dot_nt(q, k) * scale, -jnp.inf)
    return C.online_softmax_step(carry, s, jnp.where(ok, v, 0).astype(v.dtype))


def _entry(table_ref, i):
    """Page id of logical page i (the row's table on GPU, the whole SMEM table on TPU)."""
    if table_ref.ndim == 1:
        return table_ref[i]
    return table_ref[pl.program_id(0), pl.program_id(1), i]


def _paged_kernel(used_ref, table_ref, q_ref, qpos_ref, k_ref, v_ref, pos_ref, *out_refs, ppb: int,
                  blocks: int, n_table: int, scale: float):
    """GPU program (b, k, n): `blocks` blocks of `ppb` logical pages from page n * blocks * ppb. Refs:
    used (`C.scalar`); table [MP]; q [M, D]; q_pos [1, M]; the whole pool k, v [NP, P, D] and
    pos [NP, 1, P]; outputs o [M, D], m, l [1, M] float32."""
    used = C.scalar(used_ref)
    first = pl.program_id(2) * blocks * ppb
    n_blocks = jnp.clip(pl.cdiv(used - first, ppb), 0, blocks)
    q, qpos = q_ref[...], qpos_ref[0]

    def body(i, carry):
        for j in range(ppb):
            lp = first + i * ppb + j
            pid = _entry(table_ref, jnp.minimum(lp, n_table - 1))
            ok = (lp < used) & (pid >= 0)
            pid = jnp.maximum(pid, 0)
            carry = _page_step(carry, q, qpos, k_ref[pid], v_ref[pid], pos_ref[pid][0], ok, scale)
        return carry

    C.write_partials(jax.lax.fori_loop(0, n_blocks, body, C.init_carry(q.shape[0], q.shape[1])), *out_refs)


def _paged_kernel_tpu(used_ref, table_ref, q_ref, qpos_ref, *refs, ppb: int, n_table: int, scale: float):
    """TPU program (b, k, n) over block n: refs are q [M, D], q_pos [1, M], then per page j of the
    block its k, v [P, D] and pos [1, P] (fetched by the index maps), then the outputs."""
    used = C.scalar(used_ref)
    pages, out_refs = refs[:3 * ppb], refs[3 * ppb:]
    q, qpos = q_ref[...], qpos_ref[0]
    carry = C.init_carry(q.shape[0], q.shape[1])
    for j in range(ppb):
        lp = pl.program_id(2) * ppb + j
        ok = (lp < used) & (_entry(table_ref, jnp.minimum(lp, n_table - 1)) >= 0)
        k_ref, v_ref, pos_ref = pages[3 * j: 3 * j + 3]
        carry = _page_step(carry, q, qpos, k_ref[...], v_ref[...], pos_ref[0], ok, scale)
    C.write_partials(carry, *out_refs)


def _validate(q, k, v, pos, table, used, q_pos, who):
    if q.ndim != 4 or k.ndim != 3 or k.shape != v.shape or pos.shape != k.shape[:2]:
        raise ValueError(f"{who}: expected q [B, T, H, D], a pool k, v [NP, P, D] and pos [NP, P]; got "
                         f"{q.shape}, {k.shape}, {v.shape}, {pos.shape}")
    b, t, h, d = q.shape
    if k.shape[2] != d or table.ndim != 3 or table.shape[0] != b or used.shape != table.shape[:2]:
        raise ValueError(f"{who}: q {q.shape}, pool {k.shape}, table {table.shape}, used {used.shape} do not match")
    if h % table.shape[1]:
        raise ValueError(f"{who}: {h} query heads are not a multiple of {table.shape[1]} KV heads")
    if q_pos.shape != (b, t):
        raise ValueError(f"{who}: q_pos {q_pos.shape} is not [B, T] = {(b, t)}")


@functools.partial(jax.jit, static_argnames=("block_k", "n_splits", "interpret"))
def paged_decode_attention(q, k, v, pos, table, used, q_pos, *, block_k: int | None = None,
                           n_splits: int | None = None, interpret: bool = False):
    """Attention of each query head over its KV head's pages.

    Args:
      q: [B, T, H, D] (post-RoPE); T = 1 when decoding.  q_pos: int32 [B, T].
      k, v: [NP, P, D] the page pool; pos: int32 [NP, P] each slot's position (`EMPTY_POS`: no token).
      table: int32 [B, K, MP] page of each logical page (-1: freed).  used: int32 [B, K] logical pages
        in use per head (the table's entries past it are not read).
      block_k: slots per step, whole pages (default per backend); a page size not tiling it raises.
      n_splits: splits of a table (GPU; default: fill the chip; TPU: one block per program).
      interpret: Pallas interpreter (CPU tests).
    Returns:
      [B, T, H, D] in q's dtype (a query that sees no key gets 0).
    """
    who = "paged_decode_attention"
    _validate(q, k, v, pos, table, used, q_pos, who)
    platform = C.backend(interpret)
    b, t, h, d = q.shape
    n_kv, n_table = table.shape[1:]
    page = k.shape[1]
    C.check_common(q, k.dtype, d, platform, who)
    block = check_page_size(page, block_k, platform, who)
    ppb = block // page
    n_blocks = -(-n_table // ppb)
    qf = C.fold_queries(q, n_kv)
    rows = qf.shape[2]
    pos3 = C.vec(pos.astype(jnp.int32))  # [NP, 1, P]
    table, used = table.astype(jnp.int32), used.astype(jnp.int32)
    q_spec = pl.BlockSpec((None, None, rows, d), lambda i, j, n, *_: (i, j, 0, 0))
    qpos_spec = pl.BlockSpec((None, 1, rows), lambda i, j, n, *_: (i, 0, 0))
    args = [qf, C.fold_positions(q_pos, h // n_kv)]
    if platform == "tpu":  # the pool once per page of a block, each page's index map reading the table
        def page_map(j):
            def index(i, kh, n, used, table):
                lp = jnp.clip(jnp.minimum(n * ppb + j, used[i, kh] - 1), 0, n_table - 1)
                return jnp.maximum(table[i, kh, lp], 0), 0, 0
            return index

        specs = [q_spec, qpos_spec]
        for j in range(ppb):
            specs += [pl.BlockSpec((None, page, d), page_map(j))] * 2 + [pl.BlockSpec((None, 1, page), page_map(j))]
            args += [k, v, pos3]
        scalars, grid = [used, table], (b, n_kv, n_blocks)
        kernel = functools.partial(_paged_kernel_tpu, ppb=ppb, n_table=n_table, scale=d ** -0.5)
    else:  # the whole pool (Triton reads through pointers); each program loops over its split's blocks
        n_splits = n_splits or min(n_blocks, -(-DECODE[platform]["programs"] // (b * n_kv)))
        blocks = -(-n_blocks // n_splits)
        n_splits = -(-n_blocks // blocks)
        whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))  # noqa: E731
        specs = [pl.BlockSpec((None, None, n_table), lambda i, j, n, *_: (i, j, 0)), q_spec, qpos_spec,
                 whole(k.shape), whole(v.shape), whole(pos3.shape)]
        args = [table] + args + [k, v, pos3]
        scalars, grid = [used], (b, n_kv, n_splits)
        kernel = functools.partial(_paged_kernel, ppb=ppb, blocks=blocks, n_table=n_table, scale=d ** -0.5)
    return C.split_decode(kernel, grid, scalars, specs, args, rows=rows, d=d, t=t, h=h, dtype=q.dtype,
                          platform=platform, table=DECODE[platform], interpret=interpret,
                          name="kvjax_paged_decode_attention")


def paged_decode_attention_reference(q, k, v, pos, table, used, q_pos):
    """Plain-jnp float32 reference: each head's logical pages gathered whole, then one softmax."""
    _validate(q, k, v, pos, table, used, q_pos, "paged_decode_attention_reference")
    b, t, h, d = q.shape
    n_kv, n_table = table.shape[1:]
    page = k.shape[1]
    ok = (table >= 0) & (jnp.arange(n_table) < used[..., None])  # [B, K, MP]
    ids = jnp.maximum(table, 0)
    kk, vv = (x[ids].reshape(b, n_kv, n_table * page, d).astype(jnp.float32) for x in (k, v))
    kp = jnp.where(ok[..., None], pos[ids], jnp.iinfo(jnp.int32).max).reshape(b, n_kv, n_table * page)
    qg = q.reshape(b, t, n_kv, h // n_kv, d).astype(jnp.float32) * d ** -0.5
    sc = jnp.einsum("btkgd,bksd->bkgts", qg, kk, precision="highest")
    seen = kp[:, :, None, None, :] <= q_pos[:, None, None, :, None]
    sc = jnp.where(seen, sc, -jnp.inf)
    m = sc.max(-1, keepdims=True)
    p = jnp.exp(sc - jnp.where(jnp.isneginf(m), 0.0, m))
    vv = jnp.where(jnp.repeat(ok, page, axis=2)[..., None], vv, 0.0)  # freed pages may hold anything
    out = jnp.einsum("bkgts,bksd->btkgd", p, vv, precision="highest")
    out = out / jnp.maximum(p.sum(-1), 1e-30).transpose(0, 3, 1, 2)[..., None]
    return out.reshape(b, t, h, d).astype(q.dtype)
