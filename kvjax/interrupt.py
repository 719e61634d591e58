"""Ctrl-C in the `kvjax` program: one line on stderr and exit status 130, never a traceback or a crash.

Python turns SIGINT into KeyboardInterrupt only when the main thread runs Python code, so a Ctrl-C
during an XLA compile waits for the compile to end; and an exception unwinding through interpreter
teardown while XLA's threads still run crashed the process (segfault, exit 139). So, in the program
only (`install`, called by `kvjax.cli.main` and, for the start-up imports, by `import kvjax` when
the running program is the `kvjax` command):

* before a command runs (imports, argument parsing) a SIGINT ends the process at once;
* while one runs (`running(message)`) the first raises KeyboardInterrupt, so `finally` blocks close
  files, and the command's handler calls `exit_now(message)`; a second one ends the process at once;
* a watchdog thread, woken by every signal through `signal.set_wakeup_fd`, ends the process if it is
  still alive `GRACE_SECONDS` after a SIGINT (the main thread is inside XLA) or at a second Ctrl-C;
* `exit_now` writes the line, flushes stdout and stderr and calls `os._exit(130)`: no teardown.

This module imports only the standard library: it must be usable before JAX is imported.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

GRACE_SECONDS = 2.0
EXIT_STATUS = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C
PROGRAM = "kvjax"  # the console script's name

_message: list[str | Callable[[], str] | None] = [None]  # the running command's line; None: no command yet
_exit_lock = threading.Lock()
_installed = [False]
_count = [0]  # SIGINTs received


def install() -> None:
    """Route SIGINT as described above (main thread only; once per process)."""
    if _installed[0] or threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, _on_sigint)
    threading.Thread(target=_watch, args=(read_fd,), daemon=True, name="kvjax-interrupt").start()
    _installed[0] = True


def install_if_program() -> None:
    """`install()` when this process is the `kvjax` command (so Ctrl-C during its start-up imports is
    handled too); a program that imports kvjax as a library keeps Python's own SIGINT handling."""
    if sys.argv and Path(sys.argv[0]).name == PROGRAM:
        install()


@contextlib.contextmanager
def running(message: str | Callable[[], str]) -> Iterator[None]:
    """While a command runs, a SIGINT raises KeyboardInterrupt; `message` (or what it returns, when
    called at the interrupt) is the line the watchdog writes."""
    _message[0] = message
    try:
        yield
    finally:
        _message[0] = None


def exit_now(message: str | Callable[[], str]) -> None:
    """Write `message` on stderr, flush stdout and stderr, end the process with status 130 (no teardown)."""
    message = message() if callable(message) else message
    with _exit_lock:  # the main thread and the watchdog may both get here: one line only
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.write(2, (message + "\n").encode())
        os._exit(EXIT_STATUS)


def _on_sigint(signum, frame) -> None:
    _count[0] += 1
    if _message[0] is None or _count[0] > 1:  # nothing to clean up, or a second Ctrl-C: now
        exit_now(_message[0] or f"{PROGRAM}: interrupted")
    raise KeyboardInterrupt


def _watch(read_fd: int) -> None:
    while True:
        if signal.SIGINT in os.read(read_fd, 64):  # the wakeup fd receives the numbers of the signals
            select.select([read_fd], [], [], GRACE_SECONDS)  # the main thread's turn, or a second signal
            exit_now(_message[0] or f"{PROGRAM}: interrupted")
