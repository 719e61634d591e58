"""Shared pieces of the attention kernels: backend checks, block choice, GQA folding, the split combine.

Legend: B batch, T query tokens, H query heads, K KV heads, G = H/K, D head dim, M folded query rows
(G*T padded to a power of two >= 16), N cache splits (flash-decoding), S cache slots.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

FALLBACK = 'attention_impl="xla"'
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_ROWS = 16  # Triton's tensor-core dot needs every dimension >= 16


class Unsupported(ValueError):
    """Input a kernel does not handle (a ValueError naming the plain-jnp fallback)."""


def unsupported(msg: str) -> Unsupported:
    """An `Unsupported` error for input a kernel does not handle, naming the plain-jnp fallback."""
    return Unsupported(f"{msg}; use {FALLBACK} (the plain-jnp attention) instead")


def backend(interpret: bool) -> str:
    """"gpu", "tpu", or "cpu" (interpret mode). Compiling for the CPU is not possible: raise.

    The abstract mesh's device comes first (`lowering.target` names one to lower for a GPU or TPU
    that is not attached, or to run that backend's variant of a kernel in the interpreter), then
    interpret mode ("cpu"), then the default backend.
    """
    device = jax.sharding.get_abstract_mesh().abstract_device  # also set by a concrete mesh in use
    if device is not None and device.platform in ("gpu", "tpu"):
        return device.platform
    if interpret:
        return "cpu"
    platform = jax.default_backend()
    if platform not in ("gpu", "tpu"):
        raise unsupported(f"Pallas kernels compile for GPU or TPU, not {platform!r} (interpret=True runs "
                          "them on CPU, slowly)")
    return platform


def check_common(q, k_dtype, head_dim: int, platform: str, who: str) -> None:
    """Head dim and dtypes every kernel shares: D a power of two in [16, 256]; float32/bfloat16/float16."""
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise unsupported(f"{who}: head dim {head_dim} is not a power of two in [16, 256]")
    for name, dt in (("queries", q.dtype), ("keys/values", k_dtype)):
        if jnp.dtype(dt) not in DTYPES or (platform == "tpu" and jnp.dtype(dt) == jnp.float16):
            raise unsupported(f"{who}: {name} dtype {jnp.dtype(dt)} is not supported on {platform}")


def min_block(platform: str) -> int:
    """Smallest key/query block the backend takes (Triton's dot: 16)."""
    return MIN_ROWS if platform == "gpu" else 1


def check_block(n: int, block: int, what: str, who: str, multiple_of: int = 1) -> None:
    if block <= 0 or block & (block - 1) or n % block or block % multiple_of:
        raise unsupported(f"{who}: {what} {block} must be a power of two that divides {n}"
                          + (f" and a multiple of {multiple_of}" if multiple_of > 1 else ""))


def pick_block(n: int, want: int, multiple_of: int = 1) -> int:
    """The largest power of two <= `want` that divides `n` and is a multiple of `multiple_of` (0: none)."""
    b = 1 << (max(want, 1).bit_length() - 1)
    while b >= multiple_of and b >= 1:
        if n % b == 0 and b % multiple_of == 0:
            return b
        b //= 2
    return 0


def pick_splits(n_blocks: int, parallel: int, programs: int, least: int = 1) -> int:
    """Splits of the cache (a divisor of n_blocks) so that parallel * splits ~ programs, and at least
    `least` of them (a split no longer than the backend's `max_split`; the smallest divisor >= least)."""
    want = max(1, min(n_blocks, -(-programs // max(parallel, 1))))
    if want >= least:
        return max(d for d in range(1, want + 1) if n_blocks % d == 0)
    return min(d for d in range(least, n_blocks + 1) if n_blocks % d == 0)


def least_splits(n_slots: int, table: dict) -> int:
    """Splits needed so that no split is longer than the table's `max_split` (TPU: its VMEM tile)."""
    return -(-n_slots // table.get("max_split", n_slots or 1))


def last_block(length, size: int):
    """Index of the block of `size` slots holding slot length - 1 (0 for an empty row): an index map
    clamped to it fetches nothing new past a row's length (TPU's pipeline skips a repeated block)."""
    return jnp.maximum(pl.cdiv(length, size) - 1, 0)


def scalar(ref):
    """A per-row (or per-row-and-head) int32 of a `call`: the squeezed block on GPU, this program's
    entry of the scalar-prefetched array (SMEM) on TPU."""
    if ref.ndim == 0:
        return ref[...]
    return ref[tuple(pl.program_id(i) for i in range(ref.ndim))]


def vec(x):
    """[..., X] -> [..., 1, X]: a per-row vector (positions, lse, softmax statistics) as a block whose last
    two dims are (1, X), a full dim and a tiled one: the shape TPU blocks need."""
    return x[..., None, :]


def call(kernel, *, grid, scalars, in_specs, args, out_specs, out_shape, platform: str, table: dict,
         interpret: bool, name: str):
    """`pallas_call` with per-row int32 `scalars` ([B] or [B, K], indexed by the first grid axes) placed
    as each backend wants them: squeezed blocks on GPU (and the interpreter), scalar prefetch into SMEM
    on TPU. Index maps take `(*grid indices, *scalar refs)`; the scalar refs exist on TPU only, where a
    map may clamp to a row's last used block (`last_block`). Kernels read scalars with `scalar`."""
    params = dict(out_shape=out_shape, compiler_params=compiler_params(platform, len(grid), table),
                  interpret=interpret, name=name)
    if platform == "tpu":
        spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(scalars), grid=grid, in_specs=in_specs,
                                            out_specs=out_specs)
        return pl.pallas_call(kernel, grid_spec=spec, **params)(*scalars, *args)
    scalar_specs = [pl.BlockSpec((None,) * x.ndim, lambda *idx, nd=x.ndim: idx[:nd]) for x in scalars]
    return pl.pallas_call(kernel, grid=grid, in_specs=scalar_specs + list(in_specs), out_specs=out_specs,
                          **params)(*scalars, *args)


def compiler_params(platform: str, n_grid: int, table: dict):
    if platform == "gpu":
        return plgpu.CompilerParams(num_warps=table["num_warps"], num_stages=table["num_stages"])
    if platform == "tpu":
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_grid)
    return None


def part_spec(*tail: int):
    """BlockSpec of a per-split partial output [B, K, N, *tail] on the (b, k, split) grid."""
    return pl.BlockSpec((None, None, None, *tail), lambda i, j, n, *_: (i, j, n) + (0,) * len(tail))


def rows_for(g: int, t: int) -> int:
    """M: folded query rows G*T padded to a power of two >= 16."""
    return max(MIN_ROWS, 1 << (g * t - 1).bit_length())


def fold_queries(q, n_kv: int):
    """q [B, T, H, D] -> [B, K, M, D] with row g*T + t holding query head k*G + g at token t (zero pad)."""
    b, t, h, d = q.shape
    g = h // n_kv
    qf = q.reshape(b, t, n_kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, n_kv, g * t, d)
    return jnp.pad(qf, ((0, 0), (0, 0), (0, rows_for(g, t) - g * t), (0, 0)))


def fold_positions(q_pos, g: int):
    """q_pos [B, T] -> int32 [B, 1, M] (row g*T + t, `vec` layout), padding rows at -1 (they see nothing)."""
    b, t = q_pos.shape
    p = jnp.tile(q_pos.astype(jnp.int32), (1, g))
    return vec(jnp.pad(p, ((0, 0), (0, rows_for(g, t) - g * t)), constant_values=-1))


def split_decode(kernel, grid, scalars, in_specs, args, *, rows: int, d: int, t: int, h: int, dtype,
                 platform: str, table: dict, interpret: bool, name: str):
    """Run a flash-decoding kernel on the (b, kv head, split) grid (`call`) and merge its splits.

    The kernel writes per split an unnormalized output [M, D] and its running max and sum [1, M]
    (`part_spec`); `combine_splits` merges them and `unfold` returns [B, T, H, D] in `dtype`.
    """
    shape = tuple(grid)
    o, m, l = call(kernel, grid=grid, scalars=scalars, in_specs=in_specs, args=args,
                   out_specs=[part_spec(rows, d), part_spec(1, rows), part_spec(1, rows)],
                   out_shape=[jax.ShapeDtypeStruct(shape + (rows, d), jnp.float32),
                              jax.ShapeDtypeStruct(shape + (1, rows), jnp.float32),
                              jax.ShapeDtypeStruct(shape + (1, rows), jnp.float32)],
                   platform=platform, table=table, interpret=interpret, name=name)
    return unfold(combine_splits(o, m[..., 0, :], l[..., 0, :]), t, h, dtype)


def write_partials(carry, o_ref, m_ref, l_ref):
    """Store a split's online-softmax state (m, l [M], acc [M, D]) into its partial outputs."""
    m, l, acc = carry
    o_ref[...] = acc
    m_ref[...] = m[None, :]
    l_ref[...] = l[None, :]


def unfold(o, t: int, h: int, dtype):
    """[B, K, M, D] -> [B, T, H, D] (drops the padding rows)."""
    b, n_kv, _, d = o.shape
    g = h // n_kv
    return o[:, :, : g * t].reshape(b, n_kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(dtype)


def combine_splits(o, m, l):
    """Merge per-split partial softmaxes (flash-decoding's reduction, Dao et al. 2023).

    o: float32 [..., N, M, D] unnormalized sums; m, l: float32 [..., N, M] running max and sum.
    Returns float32 [..., M, D]; rows no split saw (l = 0 everywhere) give 0.
    """
    m_max = m.max(axis=-2)
    m_safe = jnp.where(jnp.isneginf(m_max), 0.0, m_max)
    w = jnp.exp(m - m_safe[..., None, :])  # [..., N, M]
    den = (l * w).sum(-2)
    return (o * w[..., None]).sum(-3) / jnp.maximum(den, 1e-30)[..., None]


def dot_nt(a, b):
    """a [m, d] @ b [n, d]^T -> float32 [m, n]; exact float32 products for float32 inputs."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """a [m, n] @ b [n, d] -> float32 [m, d]."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)


def online_softmax_step(carry, s, v):
    """One FlashAttention-2 step: fold scores s float32 [M, n] (-inf where masked) and values v [n, D].

    carry = (m [M], l [M], acc [M, D]) float32; p is cast to v's dtype for the second matmul.
    """
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    corr = jnp.exp(m - m_safe)
    return m_new, l * corr + p.sum(axis=-1), acc * corr[:, None] + dot_nn(p.astype(v.dtype), v)


def init_carry(m_rows: int, d: int):
    return (jnp.full((m_rows,), -jnp.inf, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
            jnp.zeros((m_rows, d), jnp.float32))
