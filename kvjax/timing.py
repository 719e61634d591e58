"""Compile time, measured apart from run time.

JAX reports tracing, lowering and XLA compilation durations through `jax.monitoring`; `compile_seconds()`
is their running total in this process, so a caller can subtract the compile part of a timed region:

    c0, t0 = compile_seconds(), time.perf_counter()
    ...  # first call of a jitted function
    compile_s = compile_seconds() - c0; run_s = time.perf_counter() - t0 - compile_s
"""
from __future__ import annotations

import jax

_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
           "/jax/core/compile/backend_compile_duration")
_total = [0.0]


def _listener(event: str, duration: float, **_) -> None:
    if event in _EVENTS:
        _total[0] += duration


jax.monitoring.register_event_duration_secs_listener(_listener)


def compile_seconds() -> float:
    """Seconds spent tracing, lowering and compiling JAX programs in this process so far."""
    return _total[0]
