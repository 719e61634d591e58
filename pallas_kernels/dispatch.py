"""Attention over any layer state through its Pallas kernel: what `attention_impl="pallas"` runs.

    out = attend(state, q, q_pos)                         # [B, T, H, D]
    out, lse = attend(state, q, q_pos, return_lse=True)   # dense prefill chunks (observations)

Dispatch is on the state type: `DenseKV` prefill chunks -> `prefill_attention`, decode steps ->
`decode_attention` (also `RollingKV`); `QuantKV` -> `quant_decode_attention`; `RaggedKV` ->
`ragged_decode_attention`. With `attention_impl="pallas"` a state or layout with no kernel raises a
ValueError naming the fallback `attention_impl="xla"`; the default on GPU/TPU, "auto", uses the
kernels where they exist and the plain-jnp attention elsewhere (e.g. KVQuant's non-uniform codes,
quantized per-head pools). On CPU the kernels run in the Pallas interpreter (slow; for tests).

Legend: B batch, T query tokens, H query heads, D head dim.
"""
from __future__ import annotations

import jax

from kvjax.kernels import _common as C
from kvjax.kernels.decode_attention import decode_attention
from kvjax.kernels.prefill_attention import attention_column_sums, prefill_attention, window_attention
from kvjax.kernels.quant_decode_attention import quant_decode_attention
from kvjax.kernels.ragged_decode_attention import ragged_decode_attention
from kvjax.kv_state import DenseKV
from kvjax.ragged_kv import RaggedKV
from kvjax.rolling_kv import RollingKV

IMPLS = ("xla", "pallas", "auto")
QUANTIZERS = ("kivi", "per_token", "int8", "fp8")  # quantizers whose layouts the kernel reads


def resolve_impl(impl: str | None) -> str:
    """None picks "auto" (kernels where a state has one) on GPU/TPU and "xla" on CPU."""
    if impl is None:
        return "auto" if jax.default_backend() in ("gpu", "tpu") else "xla"
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS} (or None: auto on GPU/TPU, xla on CPU), "
                         f"got {impl!r}")
    return impl


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def attend(state, q, q_pos, return_lse: bool = False, strict: bool = True):
    """Attention of q [B, T, H, D] (positions q_pos int32 [B, T]) over a layer state, by its kernel.

    Same contract as the states' own `attend` (the plain-jnp path); `return_lse` (the log-sum-exp
    [B, K, G*T] that column-sum observations reuse) is available for dense prefill chunks. A state
    with no kernel: ValueError if `strict`, else the state's own plain-jnp `attend`.
    """
    return kernel_or(lambda: _kernel_attend(state, q, q_pos, return_lse),
                     lambda: state.attend(q, q_pos, return_lse=return_lse), strict)


def kernel_or(kernel, fallback, strict: bool):
    """`kernel()`, or, when it raises `Unsupported` (at trace time) and not `strict`, `fallback()`."""
    try:
        return kernel()
    except C.Unsupported:
        if strict:
            raise
        return fallback()


def _kernel_attend(state, q, q_pos, return_lse: bool):
    from kvjax.quant_kv import QuantKV  # quantizers import the methods, whose modules import the model

    interpret = _interpret()
    t = q.shape[1]
    if isinstance(state, (DenseKV, RollingKV)):
        if t == 1 and not return_lse:  # decode: every used slot precedes the query
            return decode_attention(q, state.k, state.v, state.length, interpret=interpret)
        out, lse = prefill_attention(q, q_pos, state.k, state.v, state.pos, state.length, interpret=interpret)
        return (out, lse) if return_lse else out
    if return_lse:
        raise C.unsupported(f"{type(state).__name__} gives no prefill observations in the Pallas path")
    causal = {} if t == 1 else dict(q_pos=q_pos)
    if isinstance(state, QuantKV):
        name = getattr(state.quantizer, "name", type(state.quantizer).__name__)
        sink = getattr(state, "pos_sink", None)
        if name not in QUANTIZERS or (sink is not None and sink.shape[2]):
            raise C.unsupported(f"no Pallas kernel for the {name!r} quantized cache (kernels read "
                                f"{', '.join(QUANTIZERS)} without a sink)")
        if t > 1:
            causal.update(pos=state.pos, pos_res=state.pos_res)
        return quant_decode_attention(q, state.kq, state.vq, state.n_q, state.k_res, state.v_res, state.n_r,
                                      **causal, interpret=interpret)
    if isinstance(state, RaggedKV):
        if t > 1:
            causal.update(pos=state.pos)
        return ragged_decode_attention(q, state.k, state.v, state.start, state.length, **causal,
                                       interpret=interpret)
    raise C.unsupported(f"no Pallas kernel for a {type(state).__name__} layer state")


def window_probs(q_win, win_pos, k, kv_pos, length):
    """Observation-window attention float32 [B, H, W, S] by the scoring-prefill kernel (SnapKV, TOVA, ...)."""
    return window_attention(q_win.astype(k.dtype), win_pos, k, kv_pos, length, interpret=_interpret())


def column_sums(q, q_pos, q_valid, state, lse):
    """H2O column sums float32 [B, H, S] of a dense prefill chunk by the key-major kernel."""
    return attention_column_sums(q, q_pos, q_valid, state.k, state.pos, state.length, lse, interpret=_interpret())
