"""Compile time, measured apart from run time, and a "compiling ..." status line while a program compiles.

JAX reports each compile stage of a jitted program (tracing to a jaxpr, lowering to MLIR, XLA's
backend compile, or its lookup in the persistent compilation cache) through `jax.monitoring`: a scalar
event when the stage starts and a duration event when it ends. `compile_seconds()` is the wall time
this process has spent inside any stage. A stage that runs inside another (a jitted function traced
while its caller is traced) counts once, so the total never exceeds the wall time, and a caller can
subtract the compile part of a timed region:

    c0, t0 = compile_seconds(), time.perf_counter()
    ...  # first call of a jitted function
    compile_s = compile_seconds() - c0; run_s = time.perf_counter() - t0 - compile_s

`report_compiles(stream)` (the CLI turns it on) writes one line per program whose compile takes longer
than `after` seconds: "kvjax: compiling decode ..." once it has taken that long, finished by the seconds
when it is done and whether the program came from the persistent compilation cache (while a tqdm
progress bar is on screen: two whole lines, written through tqdm).
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator, TextIO

import jax
from tqdm import tqdm

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_STAGES = (_TRACE, "/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")
_BACKEND = _STAGES[2]
_CACHE_HIT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_local = threading.local()  # per thread: depth of nested stages, start of the outermost one
_total = [0.0]


class _Status:
    """The status line of one program at a time: shown once its compile has taken `after` seconds.

    A program's stages (trace, lower, backend compile) follow each other; the line closes at the end of
    the backend compile, or when no stage follows for `IDLE_SECONDS` (a trace that compiled nothing,
    e.g. `jax.eval_shape`, or a lowering JAX had kept), or when a new trace starts.
    """

    IDLE_SECONDS = 0.5

    def __init__(self, stream: TextIO, after: float):
        self.stream, self.after = stream, after
        self.name: str | None = None  # the program compiling now (None: none)
        self.t0 = self.t_end = 0.0  # its first stage's start, its last stage's end
        self.shown = self.cached = self.partial = False
        self.in_stage = 0  # stages running now, all threads
        self.episode = 0  # counts programs, so a timer armed for one never acts on the next
        self.timer: threading.Timer | None = None

    def start(self, event: str, name: str) -> None:
        if self.name is not None and event == _TRACE and self.in_stage == 0:
            self._close()
        if self.name is None:
            self.name, self.t0, self.shown, self.cached = name, time.perf_counter(), False, False
            self.episode += 1
        self.in_stage += 1
        if not self.shown:
            self._arm(self.after - (time.perf_counter() - self.t0), self._show)

    def end(self, event: str) -> None:
        self.in_stage -= 1
        self.t_end = time.perf_counter()
        if self.in_stage == 0:
            if event == _BACKEND:
                self._close()
            else:
                self._arm(self.IDLE_SECONDS, self._idle)

    def _arm(self, delay: float, action) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = threading.Timer(max(delay, 0.0), action, args=(self.episode,))
        self.timer.daemon = True
        self.timer.start()

    def _show(self, episode: int) -> None:
        with _lock:
            if episode == self.episode and self.name is not None and not self.shown and self.in_stage > 0:
                self.shown = True
                # one line, finished when the compile is; whole lines through tqdm while a progress bar is up
                self.partial = not getattr(tqdm, "_instances", None)
                if self.partial:
                    self.stream.write(f"kvjax: compiling {self.name} ...")
                    self.stream.flush()
                else:
                    tqdm.write(f"kvjax: compiling {self.name} ...", file=self.stream)

    def _idle(self, episode: int) -> None:
        with _lock:
            if episode == self.episode and self.name is not None and self.in_stage == 0:
                self._close()

    def _close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.shown:
            took = f"{self.t_end - self.t0:.1f} s" + (" (from the compile cache)" if self.cached else "")
            if self.partial:
                self.stream.write(f" {took}\n")
                self.stream.flush()
            else:
                tqdm.write(f"kvjax: compiled {self.name} in {took}", file=self.stream)
        self.name = None


_status: list[_Status | None] = [None]


def _program(fun_name: object) -> str:
    """'jit(decode)' -> 'decode' (lowering and backend events name the jitted wrapper)."""
    name = str(fun_name or "program")
    return name[4:-1] if name.startswith("jit(") and name.endswith(")") else name


def _on_start(event: str, value: float, **kwargs) -> None:
    if event not in _STAGES:
        return
    depth = getattr(_local, "depth", 0)
    if depth == 0:
        _local.opened = time.perf_counter()
        with _lock:
            if _status[0] is not None:
                _status[0].start(event, _program(kwargs.get("fun_name")))
    _local.depth = depth + 1


def _on_end(event: str, duration: float, **kwargs) -> None:
    if event not in _STAGES:
        return
    depth = getattr(_local, "depth", 0) - 1
    _local.depth = max(depth, 0)
    if depth > 0:
        return
    # depth < 0: the stage began before this module listened; its own duration is all we know
    elapsed = time.perf_counter() - _local.opened if depth == 0 else duration
    with _lock:
        _total[0] += elapsed
        if depth == 0 and _status[0] is not None and _status[0].name is not None:
            _status[0].end(event)


def _on_event(event: str, **kwargs) -> None:
    if event == _CACHE_HIT:
        with _lock:
            if _status[0] is not None and _status[0].name is not None:
                _status[0].cached = True


jax.monitoring.register_scalar_listener(_on_start)
jax.monitoring.register_event_duration_secs_listener(_on_end)
jax.monitoring.register_event_listener(_on_event)


def mid_line() -> bool:
    """True while a "kvjax: compiling ..." line waits for its seconds or a tqdm progress bar is on screen:
    a message written now must start with a new line."""
    status = _status[0]
    return bool(status is not None and status.shown and status.partial and status.name is not None
                or getattr(tqdm, "_instances", None))


def compile_seconds() -> float:
    """Seconds spent tracing, lowering and compiling JAX programs in this process so far."""
    return _total[0]


@contextlib.contextmanager
def report_compiles(stream: TextIO, after: float = 0.5) -> Iterator[None]:
    """While active, write "kvjax: compiling NAME ... S s" to `stream` for each program whose compile
    takes longer than `after` seconds (the line appears once it has taken that long)."""
    with _lock:
        _status[0] = _Status(stream, after)
    try:
        yield
    finally:
        with _lock:
            status, _status[0] = _status[0], None
            if status is not None and status.timer is not None:
                status.timer.cancel()
            if status is not None and status.name is not None and status.shown and status.partial:
                stream.write("\n")  # a compile cut short (an error): end its line
