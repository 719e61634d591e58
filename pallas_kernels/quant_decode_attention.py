"""Decode attention over a quantized KV cache (`QuantKV`): dequantization inside the kernel.

The store is read as bit-packed codes plus scales (and zero-points) and dequantized block by block in
registers (GPU) / VMEM (TPU); no dequantized copy of the cache is ever written to HBM. Layouts
(`kvjax.quant`): KIVI (Liu et al. 2024, arXiv 2402.02750) keys per channel (scales [Q/n, D], groups of
n tokens) and values per token (scales [Q, D/n]); per-token keys (HF QuantizedCache); 2/4/8-bit
asymmetric codes packed little-endian along D; int8 (symmetric) and fp8 e4m3 codes with one scale
per token per head. The newest tokens sit in a full-precision residual window [R, D].

The loop is flash-decoding (Dao et al. 2023) as in `decode_attention`: grid (B, K, N + 1); programs
j < N run FlashAttention-2's online softmax (arXiv 2307.08691) over split j of the store, program N
over the residual; a jnp step merges the N + 1 partial softmaxes. All G query heads of a KV group
share one read of the codes. Unpacking a byte gives its codes as bit planes; `jnp.stack` along the
minor axis (Triton's `join`) interleaves them back into channel order.

Legend: B batch, T query tokens (1 when decoding), H query heads, K KV heads, G = H/K, D head dim,
Q store slots, R residual slots, P packed bytes per token (D * bits / 8), n quantization group,
M folded query rows (G*T padded to a power of two >= 16), N store splits, bk key block.

Memory traffic per call, with Q_b = n_q[b] rounded up to bk, e_kv the residual itemsize, e_s the
scale itemsize, z = 2 with zero-points (2/4/8-bit) and 1 without (int8, fp8):

    bytes = sum_b K * Q_b * 2 * D * bits / 8            # codes of keys and values
          + sum_b K * Q_b * (D / n_k + D / n_v) * z * e_s   # scales (+ zeros); KIVI keys: D / n per token
          + B * K * R * D * 2 * e_kv                     # residual K and V
          + B * H * D * e_q * 2                          # queries in, output out
          + B * K * (N + 1) * M * (D + 2) * 4 * 2        # split partials written and combined
    (+ B * K * (Q + R) * 4 + B * T * 4 for positions when T > 1.)

At 2 bits with D = 64, KIVI moves 32 B of codes and 16 B of bf16 scales/zeros per token and head
against 256 B for bf16 K/V: the roofline speed-up over dense decode is ~5x, 4 bits ~3.2x.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvjax import quant
from kvjax.kernels import _common as C
from kvjax.kernels.block_sizes import QUANT_DECODE


@dataclasses.dataclass(frozen=True)
class _Fmt:
    """Static description of one quantized operand (from its `QuantizedArray`)."""

    kind: str
    bits: int
    axis: int
    group: int

    @classmethod
    def of(cls, qa: quant.QuantizedArray) -> "_Fmt":
        return cls(qa.kind, qa.bits, qa.axis, qa.group)

    @property
    def has_zero(self) -> bool:
        return self.kind == "uniform"


def _interleave(planes):
    """Bit planes (each [bk, P], plane j = code j of every byte) -> [bk, P, len(planes)] in code order.

    Only two-way stacks on the minor axis (what Triton's `join` provides): recurse on even/odd planes.
    """
    if len(planes) == 1:
        return planes[0][..., None]
    even, odd = _interleave(planes[0::2]), _interleave(planes[1::2])
    stacked = jnp.stack([even, odd], axis=-1)  # [bk, P, n/2, 2]: [.., x, y] = plane 2x + y
    return stacked.reshape(*stacked.shape[:-2], len(planes))


def _dequant(codes, scale, zero, fmt: _Fmt, d: int):
    """One block: codes [bk, P], scale/zero per `fmt` -> float32 [bk, D]."""
    bk = codes.shape[0]
    if fmt.kind == "uniform" and fmt.bits < 8:
        c = codes.astype(jnp.int32)
        mask = (1 << fmt.bits) - 1
        planes = [(c >> (fmt.bits * j)) & mask for j in range(8 // fmt.bits)]
        vals = _interleave(planes).reshape(bk, d).astype(jnp.float32)
    else:
        vals = codes.astype(jnp.float32)

    def expand(a):  # per-group scale -> per element [bk, D]
        a = a.astype(jnp.float32)
        if fmt.axis == -2:  # [bk/n, D]: one row per group of n tokens
            return jnp.broadcast_to(a[:, None, :], (bk // fmt.group, fmt.group, d)).reshape(bk, d)
        return jnp.broadcast_to(a[:, :, None], (bk, d // fmt.group, fmt.group)).reshape(bk, d)

    out = vals * expand(scale)
    return out + expand(zero) if fmt.has_zero else out


def _quant_kernel(*refs, kf: _Fmt, vf: _Fmt, causal: bool, block_k: int, block_r: int, split: int,
                  n_splits: int, scale: float):
    """Program (b, k, j). Refs, in order: n_q, n_r (`C.scalar`); q [M, D]; key codes [split, P], key
    scale (+ zero) [split or split/n, ...]; the same for values; k_res, v_res [R, D]; with `causal`:
    q_pos, pos, pos_res [1, M / split / R]. Outputs o [M, D], m, l [1, M] float32."""
    refs = list(refs)
    take = lambda n: [refs.pop(0) for _ in range(n)]  # noqa: E731
    nq_ref, nr_ref, q_ref = take(3)
    kc_ref, ks_ref, kz_ref = take(3) if kf.has_zero else (*take(2), None)
    vc_ref, vs_ref, vz_ref = take(3) if vf.has_zero else (*take(2), None)
    kr_ref, vr_ref = take(2)
    qpos_ref, pos_ref, posr_ref = take(3) if causal else (None, None, None)
    out_refs = refs
    j = pl.program_id(2)
    n_q, n_r = C.scalar(nq_ref), C.scalar(nr_ref)  # read outside `pl.when` (the interpreter needs it)
    q = q_ref[...]
    d = q.shape[1]
    dt = kr_ref.dtype
    qpos = qpos_ref[0] if causal else None

    def scores_and_values(k, v, valid, pos):
        """k, v [bk, D] in the model dtype; valid bool [bk]; pos int32 [bk] (causal only)."""
        s = C.dot_nt(q, k) * scale
        seen = valid[None, :] & (pos[None, :] <= qpos[:, None]) if causal else valid[None, :]
        return jnp.where(seen, s, -jnp.inf), jnp.where(valid[:, None], v, 0).astype(dt)

    @pl.when(j < n_splits)
    def _store():
        start = j * split

        def body(i, carry):
            sl = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)

            def scales(ref, fmt):
                if ref is None:
                    return None
                if fmt.axis == -2:
                    per = block_k // fmt.group
                    return ref[pl.ds(pl.multiple_of(i * per, per), per), :]
                return ref[sl, :]

            k = _dequant(kc_ref[sl, :], scales(ks_ref, kf), scales(kz_ref, kf), kf, d).astype(dt)
            v = _dequant(vc_ref[sl, :], scales(vs_ref, vf), scales(vz_ref, vf), vf, d).astype(dt)
            valid = start + i * block_k + jnp.arange(block_k) < n_q
            s, v = scores_and_values(k, v, valid, pos_ref[0, sl] if causal else None)
            return C.online_softmax_step(carry, s, v)

        n_blocks = jnp.clip(pl.cdiv(n_q - start, block_k), 0, split // block_k)
        C.write_partials(jax.lax.fori_loop(0, n_blocks, body, C.init_carry(q.shape[0], d)), *out_refs)

    @pl.when(j == n_splits)
    def _residual():

        def body(i, carry):
            sl = pl.ds(pl.multiple_of(i * block_r, block_r), block_r)
            valid = i * block_r + jnp.arange(block_r) < n_r
            s, v = scores_and_values(kr_ref[sl, :], vr_ref[sl, :], valid, posr_ref[0, sl] if causal else None)
            return C.online_softmax_step(carry, s, v)

        C.write_partials(jax.lax.fori_loop(0, pl.cdiv(n_r, block_r), body, C.init_carry(q.shape[0], d)),
                         *out_refs)


def _validate(q, kq, vq, n_q, k_res, v_res, n_r, q_pos, pos, pos_res, who):
    if q.ndim != 4 or k_res.ndim != 4 or k_res.shape != v_res.shape:
        raise ValueError(f"{who}: expected q [B, T, H, D] and k_res, v_res [B, K, R, D]; got {q.shape}, "
                         f"{k_res.shape}, {v_res.shape}")
    b, t, h, d = q.shape
    n_kv = k_res.shape[1]
    if k_res.shape[0] != b or k_res.shape[3] != d or h % n_kv:
        raise ValueError(f"{who}: q {q.shape} does not match the residual {k_res.shape}")
    if kq.shape[:2] != (b, n_kv) or kq.shape != vq.shape or kq.shape[3] != d:
        raise ValueError(f"{who}: quantized store {kq.shape} / {vq.shape} does not match q {q.shape}")
    if n_q.shape != (b,) or n_r.shape != (b,):
        raise ValueError(f"{who}: n_q and n_r must be int32 [B] = [{b}]")
    if (t > 1) != (q_pos is not None) or (q_pos is None) != (pos is None) or (pos is None) != (pos_res is None):
        raise ValueError(f"{who}: with T > 1 query tokens pass q_pos, pos and pos_res (causal masks); "
                         "with T = 1 pass none of them")
    for name, qa in (("keys", kq), ("values", vq)):
        f = _Fmt.of(qa)
        if getattr(qa, "outlier_val", None) is not None:
            raise C.unsupported(f"{who}: {name} carry a sparse outlier store (KVQuant), which has no kernel")
        if f.kind not in ("uniform", "int8", "fp8") or (f.kind == "uniform" and f.bits not in (2, 4, 8)):
            raise C.unsupported(f"{who}: {name} stored as {f.kind} at {f.bits} bits have no kernel "
                                "(uniform 2/4/8-bit, int8 and fp8 do)")
        if f.axis not in (-1, -2) or f.group & (f.group - 1) or (f.axis == -1 and d % f.group):
            raise C.unsupported(f"{who}: {name} grouped along axis {f.axis} in groups of {f.group}: the kernel "
                                "takes power-of-two groups along D (per token) or along tokens (per channel)")


@functools.partial(jax.jit, static_argnames=("block_k", "n_splits", "interpret"))
def quant_decode_attention(q, kq: quant.QuantizedArray, vq: quant.QuantizedArray, n_q, k_res, v_res, n_r,
                           q_pos=None, pos=None, pos_res=None, *, block_k: int | None = None,
                           n_splits: int | None = None, interpret: bool = False):
    """Attention of the query tokens over a quantized store plus its full-precision residual.

    Args:
      q: [B, T, H, D] (post-RoPE); T = 1 when decoding.
      kq, vq: `QuantizedArray`s of [B, K, Q, D] (codes [B, K, Q, P], scales per their layout).
      n_q: int32 [B] store slots in use.  k_res, v_res: [B, K, R, D].  n_r: int32 [B] residual slots used.
      q_pos: int32 [B, T]; pos: int32 [B, K, Q]; pos_res: int32 [B, K, R]: positions for the causal mask,
        needed (only) when T > 1. With T = 1 every stored token precedes the query.
      block_k: store slots per inner step (a power of two dividing Q, a multiple of the KIVI key group);
        default per backend. n_splits: store splits (dividing Q / block_k); default fills the chip.
      interpret: run in the Pallas interpreter (CPU tests).
    Returns:
      [B, T, H, D] in q's dtype.
    """
    who = "quant_decode_attention"
    _validate(q, kq, vq, n_q, k_res, v_res, n_r, q_pos, pos, pos_res, who)
    platform = C.backend(interpret)
    table = QUANT_DECODE[platform]
    b, t, h, d = q.shape
    n_kv, cap, r = k_res.shape[1], kq.shape[2], k_res.shape[2]
    kf, vf = _Fmt.of(kq), _Fmt.of(vq)
    C.check_common(q, k_res.dtype, d, platform, who)
    token_group = max([f.group for f in (kf, vf) if f.axis == -2], default=1)
    if block_k is None:
        block_k = C.pick_block(cap, table["block_k"], max(token_group, C.min_block(platform))) or cap
    C.check_block(cap, block_k, "block_k", who, max(token_group, C.min_block(platform)))
    block_r = C.pick_block(r, block_k)
    if block_r < C.min_block(platform):
        raise C.unsupported(f"{who}: the residual of {r} slots has no power-of-two block >= {C.min_block(platform)}")
    n_blocks = cap // block_k
    n_splits = n_splits or C.pick_splits(n_blocks, b * n_kv, table["programs"], C.least_splits(cap, table))
    if n_blocks % n_splits:
        raise C.unsupported(f"{who}: n_splits {n_splits} does not divide the {n_blocks} store blocks")
    split = cap // n_splits
    causal = q_pos is not None
    qf = C.fold_queries(q, n_kv)
    rows = qf.shape[2]

    def split_index(i, n, scalars):
        n = jnp.minimum(n, n_splits - 1)  # the residual program (n = n_splits) reads no store block
        return jnp.minimum(n, C.last_block(scalars[0][i], split)) if scalars else n  # TPU: no DMA past n_q

    def whole(*shape):  # the (b, k) block of a per-head array
        return pl.BlockSpec((None, None, *shape), lambda i, j, n, *_: (i, j) + (0,) * len(shape))

    def store(x, per_token: int):
        """Split j of a store leaf [B, K, Q / per_token, ...]."""
        tail = x.shape[3:]
        return pl.BlockSpec((None, None, split // per_token, *tail),
                            lambda i, j, n, *s: (i, j, split_index(i, n, s)) + (0,) * len(tail))

    pos_spec = pl.BlockSpec((None, None, 1, split), lambda i, j, n, *s: (i, j, 0, split_index(i, n, s)))
    args, specs = [qf], [whole(rows, d)]
    for qa in (kq, vq):
        for leaf in ([qa.codes, qa.scale] + ([qa.zero] if qa.zero is not None else [])):
            args.append(leaf)
            specs.append(store(leaf, cap // leaf.shape[2]))
    args += [k_res, v_res]
    specs += [whole(r, d), whole(r, d)]
    if causal:
        args += [C.fold_positions(q_pos, h // n_kv), C.vec(pos.astype(jnp.int32)), C.vec(pos_res.astype(jnp.int32))]
        specs += [pl.BlockSpec((None, 1, rows), lambda i, j, n, *_: (i, 0, 0)), pos_spec, whole(1, r)]
    kernel = functools.partial(_quant_kernel, kf=kf, vf=vf, causal=causal, block_k=block_k, block_r=block_r,
                               split=split, n_splits=n_splits, scale=d ** -0.5)
    return C.split_decode(kernel, (b, n_kv, n_splits + 1), [n_q.astype(jnp.int32), n_r.astype(jnp.int32)], specs,
                          args, rows=rows, d=d, t=t, h=h, dtype=q.dtype, platform=platform, table=table,
                          interpret=interpret, name="kvjax_quant_decode_attention")


def quant_decode_attention_reference(q, kq, vq, n_q, k_res, v_res, n_r, q_pos=None, pos=None, pos_res=None):
    """Plain-jnp float32 reference: dequantize the whole store (to the residual dtype), attend over
    store + residual with slot masks (and position masks when T > 1)."""
    _validate(q, kq, vq, n_q, k_res, v_res, n_r, q_pos, pos, pos_res, "quant_decode_attention_reference")
    b, t, h, d = q.shape
    n_kv, cap, r = k_res.shape[1], kq.shape[2], k_res.shape[2]
    dt = k_res.dtype
    k = jnp.concatenate([quant.dequantize(kq, dt), k_res], axis=2).astype(jnp.float32)
    v = jnp.concatenate([quant.dequantize(vq, dt), v_res], axis=2).astype(jnp.float32)
    used = jnp.concatenate([jnp.arange(cap)[None, :] < n_q[:, None], jnp.arange(r)[None, :] < n_r[:, None]], 1)
    qg = q.reshape(b, t, n_kv, h // n_kv, d).astype(jnp.float32) * d ** -0.5
    sc = jnp.einsum("btkgd,bksd->bkgts", qg, k, precision="highest")
    seen = used[:, None, None, None, :]
    if q_pos is not None:
        kv_pos = jnp.concatenate([pos, pos_res], axis=2)
        seen = seen & (kv_pos[:, :, None, None, :] <= q_pos[:, None, None, :, None])
    sc = jnp.where(seen, sc, -jnp.inf)
    m = sc.max(-1, keepdims=True)
    p = jnp.exp(sc - jnp.where(jnp.isneginf(m), 0.0, m))
    v = jnp.where(used[:, None, :, None], v, 0.0)
    out = jnp.einsum("bkgts,bksd->btkgd", p, v, precision="highest")
    out = out / jnp.maximum(p.sum(-1), 1e-30).transpose(0, 3, 1, 2)[..., None]
    return out.reshape(b, t, h, d).astype(q.dtype)
