"""Scoring prefill: causal flash attention for a prefill chunk, plus what eviction scorers observe.

Three kernels, none of which holds a [T, S] matrix:

* `prefill_attention`: FlashAttention-2 forward (Dao 2023, arXiv 2307.08691). Grid (B, H, T/bq); a
  program keeps a block of bq queries of one head in registers and streams the key blocks of its KV
  head (up to the row's length), with an online softmax; it writes the output and the log-sum-exp.
  Key slot s is visible to query t iff s < length[b] and kv_pos[b, k, s] <= q_pos[b, t] (the cache's
  one visibility rule: causal prefill, padded rows, compressed caches with arbitrary kept positions).
* `attention_column_sums`: the attention each key slot receives, summed over the chunk's queries
  (H2O, Zhang et al. 2023; kvpress ObservedAttentionPress). A second, key-major pass (the layout of
  FlashAttention-2's backward): grid (B, H, S/bk), a program holds one key block and streams the
  query blocks, recomputing p = exp(q.k / sqrt(D) - lse) with the exact lse of the forward pass.
* `window_attention`: the softmax attention [W, S] of a few observation-window queries (SnapKV,
  PyramidKV, TOVA) over all keys: the forward pass for their lse, then the key-major pass writing
  p instead of summing it.

Legend: B batch, T chunk queries, S cache slots, H query heads, K KV heads, G = H/K, D head dim,
W window queries, bq query block, bk key block.

Memory traffic per call (chunk of T queries over L_b = length[b] used slots, rounded up to bk):

    prefill_attention:     sum_b H * ceil(T / bq) * L_b * D * 2 * e_kv    # K/V streamed per query block
                           + B * T * H * D * e_q * 2 + B * H * T * 4      # q, o, lse
                           + sum_b K * L_b * 4 * H / K * ceil(T / bq)     # key positions
    attention_column_sums: sum_b H * L_b * D * e_kv                       # each key block read once
                           + B * H * (S / bk) * T * (D * e_q + 12)        # queries (+ lse, pos, weight) per key block
                           + B * H * S * 4                                # column sums
    window_attention:      sum_b H * L_b * D * e_kv * 2      # keys only: an lse pass, then the key-major pass
                           + B * H * W * S * 4                # probabilities written

Prefill is compute-bound at T >= 64 (each K/V byte feeds bq query rows): the model for it is
4 * B * H * T * L * D flops (two matmuls), reported beside the bytes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvjax.kernels import _common as C
from kvjax.kernels.block_sizes import PREFILL


def _forward_kernel(len_ref, qpos_ref, q_ref, k_ref, *refs, block_k: int, scale: float, values: bool):
    """Program (b, h, i). Refs: length (`C.scalar`); q_pos [1, bq]; q [bq, D]; k (and v with `values`)
    [S, D] of KV head h // G; kv_pos [1, S]; outputs (o [bq, D] with `values`,) lse [1, bq] float32.
    Without `values` only the log-sum-exp is computed (V is never read)."""
    v_ref, kpos_ref, o_ref, lse_ref = refs if values else (None, refs[0], None, refs[1])
    q, qpos = q_ref[...], qpos_ref[0]
    length = C.scalar(len_ref)

    def body(i, carry):
        sl = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        valid = i * block_k + jnp.arange(block_k) < length
        seen = valid[None, :] & (kpos_ref[0, sl][None, :] <= qpos[:, None])
        s = jnp.where(seen, C.dot_nt(q, k_ref[sl, :]) * scale, -jnp.inf)
        if values:
            v = jnp.where(valid[:, None], v_ref[sl, :], 0).astype(v_ref.dtype)
            return C.online_softmax_step(carry, s, v)
        m, l = carry
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        return m_new, l * jnp.exp(m - m_safe) + jnp.exp(s - m_safe[:, None]).sum(axis=-1)

    n_blocks = jnp.minimum(pl.cdiv(length, block_k), k_ref.shape[0] // block_k)
    init = C.init_carry(q.shape[0], q.shape[1])
    out = jax.lax.fori_loop(0, n_blocks, body, init if values else init[:2])
    m, l = out[:2]
    if values:
        o_ref[...] = (out[2] / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), -jnp.inf)[None, :]


def _probs_kernel(len_ref, qpos_ref, q_ref, lse_ref, w_ref, k_ref, kpos_ref, out_ref, *, block_q: int, scale: float,
                  reduce: bool):
    """Program (b, h, j) owns key block j. Refs: length (`C.scalar`); q_pos, lse, weight [1, T];
    q [T, D]; k [bk, D]; kv_pos [1, bk]. Output: with `reduce` the column sums [1, bk], else the
    probabilities [T, bk]."""
    block_k = k_ref.shape[0]
    slot = pl.program_id(2) * block_k + jnp.arange(block_k)
    length = C.scalar(len_ref)
    valid = slot < length
    k, kpos = k_ref[...], kpos_ref[0]

    def probs(sl):
        s = C.dot_nt(q_ref[sl, :], k) * scale
        seen = valid[None, :] & (kpos[None, :] <= qpos_ref[0, sl][:, None])
        return jnp.where(seen, jnp.exp(s - lse_ref[0, sl][:, None]), 0.0)

    if not reduce:
        out_ref[...] = probs(slice(None))
        return

    def body(i, col):
        sl = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        return col + (probs(sl) * w_ref[0, sl][:, None]).sum(axis=0)

    used = pl.program_id(2) * block_k < length  # key blocks past the row's length get zeros
    n_q_blocks = used.astype(jnp.int32) * (q_ref.shape[0] // block_q)  # not a select of two weak ints: the
    # Triton lowering of that types them as the predicate (i1; found by compiling the module with Triton)
    out_ref[...] = jax.lax.fori_loop(0, n_q_blocks, body, jnp.zeros((block_k,), jnp.float32))[None, :]


def _validate(q, q_pos, k, v, kv_pos, length, who):
    if q.ndim != 4 or k.ndim != 4 or (v is not None and v.shape != k.shape):
        raise ValueError(f"{who}: expected q [B, T, H, D] and k, v [B, K, S, D]; got {q.shape}, {k.shape}")
    b, t, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"{who}: q {q.shape} does not match k {k.shape}")
    if q_pos.shape != (b, t) or kv_pos.shape != k.shape[:3] or length.shape != (b,):
        raise ValueError(f"{who}: expected q_pos [B, T], kv_pos [B, K, S], length [B]; got {q_pos.shape}, "
                         f"{kv_pos.shape}, {length.shape}")


def _blocks(t: int, s: int, block_q, block_k, platform: str, who: str):
    table = PREFILL[platform]
    block_q = block_q or C.pick_block(t, table["block_q"])
    block_k = block_k or C.pick_block(s, table["block_k"])
    least = C.min_block(platform)
    C.check_block(t, block_q, "block_q (query block, dividing the chunk length)", who)
    C.check_block(s, block_k, "block_k (key block, dividing the cache capacity)", who)
    if min(block_q, block_k) < least:
        raise C.unsupported(f"{who}: blocks {block_q} x {block_k} are below the {platform} minimum of {least} "
                            f"(chunk length {t}, cache capacity {s})")
    return block_q, block_k, table


def _forward_call(q, q_pos, k, v, kv_pos, length, block_q, block_k, interpret, who):
    """The forward pass: (out [B, T, H, D], lse [B, K, G*T]) with values v, lse alone when v is None."""
    platform = C.backend(interpret)
    b, t, h, d = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    g = h // n_kv
    C.check_common(q, k.dtype, d, platform, who)
    block_q, block_k, table = _blocks(t, s, block_q, block_k, platform, who)
    values = v is not None
    _check_vmem(s, d, k.dtype, 2 if values else 1, platform, who)
    kv = pl.BlockSpec((None, None, s, d), lambda i, hh, n, *_: (i, hh // g, 0, 0))
    o_spec = pl.BlockSpec((None, None, block_q, d), lambda i, hh, n, *_: (i, hh, n, 0))
    lse_spec = pl.BlockSpec((None, None, 1, block_q), lambda i, hh, n, *_: (i, hh, 0, n))
    lse_shape = jax.ShapeDtypeStruct((b, h, 1, t), jnp.float32)
    out = C.call(
        functools.partial(_forward_kernel, block_k=block_k, scale=d ** -0.5, values=values),
        grid=(b, h, t // block_q),
        scalars=[length.astype(jnp.int32)],
        in_specs=[pl.BlockSpec((None, 1, block_q), lambda i, hh, n, *_: (i, 0, n)),
                  pl.BlockSpec((None, None, block_q, d), lambda i, hh, n, *_: (i, hh, n, 0)),
                  *([kv, kv] if values else [kv]),
                  pl.BlockSpec((None, None, 1, s), lambda i, hh, n, *_: (i, hh // g, 0, 0))],
        args=[C.vec(q_pos.astype(jnp.int32)), q.transpose(0, 2, 1, 3), k, *([v] if values else []),
              C.vec(kv_pos.astype(jnp.int32))],
        out_specs=[o_spec, lse_spec] if values else [lse_spec],
        out_shape=[jax.ShapeDtypeStruct((b, h, t, d), q.dtype), lse_shape] if values else [lse_shape],
        platform=platform, table=table, interpret=interpret, name="kvjax_prefill_attention")
    lse = out[-1].reshape(b, n_kv, g * t)
    return (out[0].transpose(0, 2, 1, 3), lse) if values else lse


def _check_vmem(s: int, d: int, dtype, n_arrays: int, platform: str, who: str):
    """TPU: a program holds its KV head's whole K (and V) [S, D] in VMEM, double-buffered."""
    need = 2 * n_arrays * s * d * jnp.dtype(dtype).itemsize
    if platform == "tpu" and need > PREFILL["tpu"]["vmem_bytes"]:
        raise C.unsupported(f"{who}: on TPU a program holds its KV head's K/V ({s} slots x {d}, {need >> 20} MiB "
                            f"double-buffered) in VMEM, over the {PREFILL['tpu']['vmem_bytes'] >> 20} MiB budget")


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret"))
def prefill_attention(q, q_pos, k, v, kv_pos, length, *, block_q: int | None = None, block_k: int | None = None,
                      interpret: bool = False):
    """Causal attention of a chunk of queries over the cache (the chunk's own K/V already appended).

    Args:
      q: [B, T, H, D] post-RoPE.  q_pos: int32 [B, T].  k, v: [B, K, S, D].  kv_pos: int32 [B, K, S].
      length: int32 [B] slots in use.  block_q / block_k: powers of two dividing T / S (defaults per
        backend, `block_sizes.PREFILL`).  interpret: Pallas interpreter (CPU tests).
    Returns:
      out [B, T, H, D] in q's dtype; lse float32 [B, K, G*T] (row g*T + t, as
      `kvjax.attention.blockwise_attention`), -inf for queries that see no key.
    """
    _validate(q, q_pos, k, v, kv_pos, length, "prefill_attention")
    return _forward_call(q, q_pos, k, v, kv_pos, length, block_q, block_k, interpret, "prefill_attention")


def _probs_call(q, q_pos, weight, k, kv_pos, length, lse, block_q, block_k, interpret, reduce: bool, who: str):
    """The key-major pass: column sums [B, H, S] (`reduce`) or probabilities [B, H, T, S]."""
    platform = C.backend(interpret)
    b, t, h, d = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    g = h // n_kv
    C.check_common(q, k.dtype, d, platform, who)
    block_q, block_k, table = _blocks(t, s, block_q if reduce else t, block_k, platform, who)
    per_query = pl.BlockSpec((None, None, 1, t), lambda i, hh, n, *_: (i, hh, 0, 0))
    out_spec, out_shape = ((pl.BlockSpec((None, None, 1, block_k), lambda i, hh, n, *_: (i, hh, 0, n)), (b, h, 1, s))
                           if reduce else
                           (pl.BlockSpec((None, None, t, block_k), lambda i, hh, n, *_: (i, hh, 0, n)), (b, h, t, s)))
    out = C.call(
        functools.partial(_probs_kernel, block_q=block_q, scale=d ** -0.5, reduce=reduce),
        grid=(b, h, s // block_k),
        scalars=[length.astype(jnp.int32)],
        in_specs=[pl.BlockSpec((None, 1, t), lambda i, hh, n, *_: (i, 0, 0)),
                  pl.BlockSpec((None, None, t, d), lambda i, hh, n, *_: (i, hh, 0, 0)),
                  per_query, per_query,
                  pl.BlockSpec((None, None, block_k, d), lambda i, hh, n, *_: (i, hh // g, n, 0)),
                  pl.BlockSpec((None, None, 1, block_k), lambda i, hh, n, *_: (i, hh // g, 0, n))],
        args=[C.vec(q_pos.astype(jnp.int32)), q.transpose(0, 2, 1, 3), C.vec(lse.reshape(b, h, t)),
              C.vec(jnp.broadcast_to(weight.astype(jnp.float32)[:, None, :], (b, h, t))), k,
              C.vec(kv_pos.astype(jnp.int32))],
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
        platform=platform, table=table, interpret=interpret, name="kvjax_attention_probs")
    return out[:, :, 0] if reduce else out


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret"))
def attention_column_sums(q, q_pos, q_valid, k, kv_pos, length, lse, *, block_q: int | None = None,
                          block_k: int | None = None, interpret: bool = False):
    """Sum over the chunk's valid queries of the attention each key slot receives: float32 [B, H, S].

    Args as `prefill_attention`, plus q_valid bool [B, T] (padding queries add nothing) and lse
    float32 [B, K, G*T] from `prefill_attention` (exact probabilities, no second softmax).
    """
    who = "attention_column_sums"
    _validate(q, q_pos, k, None, kv_pos, length, who)
    return _probs_call(q, q_pos, q_valid, k, kv_pos, length, lse, block_q, block_k, interpret, True, who)


@functools.partial(jax.jit, static_argnames=("block_k", "interpret"))
def window_attention(q_win, win_pos, k, kv_pos, length, *, block_k: int | None = None, interpret: bool = False):
    """Softmax attention float32 [B, H, W, S] of W window queries (positions win_pos [B, W]) over the cache.

    Causal by positions, like `prefill_attention`; q_win [B, W, H, D] post-RoPE. The window is padded
    to a power of two >= 16 (padding rows see nothing and are dropped).
    """
    who = "window_attention"
    _validate(q_win, win_pos, k, None, kv_pos, length, who)
    w = q_win.shape[1]
    w_pad = max(C.MIN_ROWS, 1 << (w - 1).bit_length())
    q = jnp.pad(q_win, ((0, 0), (0, w_pad - w), (0, 0), (0, 0)))
    q_pos = jnp.pad(win_pos.astype(jnp.int32), ((0, 0), (0, w_pad - w)), constant_values=-1)
    lse = _forward_call(q, q_pos, k, None, kv_pos, length, w_pad, block_k, interpret, who)
    probs = _probs_call(q, q_pos, jnp.ones(q_pos.shape), k, kv_pos, length, lse, None, block_k, interpret, False, who)
    return probs[:, :, :w]


# ----------------------------------------------------------------------------------- references


def _ref_scores(q, q_pos, k, kv_pos, length):
    """float32 scaled scores [B, K, G, T, S] (-inf where not visible) and the used-slot mask [B, S]."""
    b, t, h, d = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, n_kv, h // n_kv, d).astype(jnp.float32) * d ** -0.5
    sc = jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(jnp.float32), precision="highest")
    used = jnp.arange(s)[None, :] < length[:, None]
    seen = used[:, None, None, None, :] & (kv_pos[:, :, None, None, :] <= q_pos[:, None, None, :, None])
    return jnp.where(seen, sc, -jnp.inf), used


def _ref_probs(q, q_pos, k, kv_pos, length):
    """float32 [B, H, T, S] softmax probabilities (rows that see nothing: 0)."""
    b, t, h, _ = q.shape
    sc, _ = _ref_scores(q, q_pos, k, kv_pos, length)
    m = sc.max(-1, keepdims=True)
    p = jnp.exp(sc - jnp.where(jnp.isneginf(m), 0.0, m))
    return (p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)).reshape(b, h, t, -1)


def prefill_attention_reference(q, q_pos, k, v, kv_pos, length):
    """float32 jnp reference of `prefill_attention` (materializes [T, S] per head: tests only)."""
    _validate(q, q_pos, k, v, kv_pos, length, "prefill_attention_reference")
    b, t, h, d = q.shape
    n_kv = k.shape[1]
    sc, used = _ref_scores(q, q_pos, k, kv_pos, length)
    lse = jax.nn.logsumexp(sc, axis=-1)  # [B, K, G, T]
    p = jnp.exp(sc - jnp.where(jnp.isneginf(lse), 0.0, lse)[..., None])
    v32 = jnp.where(used[:, None, :, None], v.astype(jnp.float32), 0.0)
    out = jnp.einsum("bkgts,bksd->btkgd", p, v32, precision="highest")
    return out.reshape(b, t, h, d).astype(q.dtype), lse.reshape(b, n_kv, -1)


def attention_column_sums_reference(q, q_pos, q_valid, k, kv_pos, length, lse=None):
    """float32 jnp reference of `attention_column_sums` (full softmax; `lse` accepted and unused)."""
    _validate(q, q_pos, k, None, kv_pos, length, "attention_column_sums_reference")
    p = _ref_probs(q, q_pos, k, kv_pos, length)
    return jnp.einsum("bhts,bt->bhs", p, q_valid.astype(jnp.float32), precision="highest")


def window_attention_reference(q_win, win_pos, k, kv_pos, length):
    """float32 jnp reference of `window_attention`."""
    _validate(q_win, win_pos, k, None, kv_pos, length, "window_attention_reference")
    return _ref_probs(q_win, win_pos, k, kv_pos, length)
