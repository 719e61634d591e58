"""Choosing between a Pallas kernel and the plain-jnp attention.

Each layer state owns its kernel (`LayerState.attend_kernel` in `kvjax.states`); this module holds
what they share: the `attention_impl` names, `kernel_or` (the fallback rule), and the scoring-prefill
kernels the observations and window scorers call (`column_sums`, `window_probs`).

With `attention_impl="pallas"` a state or layout with no kernel raises a ValueError naming the
fallback `attention_impl="xla"`; "auto" (the default on GPU/TPU) uses the kernels where they exist
and the plain-jnp attention elsewhere. On CPU the kernels run in the Pallas interpreter (for tests).
"""
from __future__ import annotations

import jax

from kvjax.kernels import _common as C
from kvjax.kernels.prefill_attention import attention_column_sums, window_attention

IMPLS = ("xla", "pallas", "auto")
unsupported = C.unsupported


def resolve_impl(impl: str | None) -> str:
    """None picks "auto" (kernels where a state has one) on GPU/TPU and "xla" on CPU."""
    if impl is None:
        return "auto" if jax.default_backend() in ("gpu", "tpu") else "xla"
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS} (or None: auto on GPU/TPU, xla on CPU), "
                         f"got {impl!r}")
    return impl


def interpret() -> bool:
    """Kernels run in the Pallas interpreter on CPU."""
    return jax.default_backend() == "cpu"


def kernel_or(kernel, fallback, strict: bool):
    """`kernel()`, or, when it raises `Unsupported` (at trace time) and not `strict`, `fallback()`."""
    try:
        return kernel()
    except C.Unsupported:
        if strict:
            raise
        return fallback()


def window_probs(q_win, win_pos, k, kv_pos, length):
    """Observation-window attention float32 [B, H, W, S] by the scoring-prefill kernel (SnapKV, TOVA, ...)."""
    return window_attention(q_win.astype(k.dtype), win_pos, k, kv_pos, length, interpret=interpret())


def column_sums(q, q_pos, q_valid, state, lse):
    """H2O column sums float32 [B, H, S] of a dense prefill chunk by the key-major kernel."""
    return attention_column_sums(q, q_pos, q_valid, state.k, state.pos, state.length, lse, interpret=interpret())
