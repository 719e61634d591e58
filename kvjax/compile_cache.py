"""JAX's persistent compilation cache: a program compiled once is read from disk by later processes.

The `kvjax` command and `kvjax.load` turn it on (in `$KVJAX_CACHE/xla`, see `kvjax.hub.cache_dir`);
`import kvjax` alone does not, so a program (or a test) that builds its own models keeps JAX's
settings. Off with the environment variable `KVJAX_COMPILE_CACHE=0` (or `kvjax --no-compile-cache
...`). A program whose compile takes at least `MIN_COMPILE_SECONDS` is stored; the folder is kept
under `MAX_BYTES` by JAX (least recently used entries go first; a file lock guards concurrent
processes). A cache that cannot be written (read-only file system, `$KVJAX_CACHE` a regular file)
turns it off with one warning on stderr: everything still works, it compiles again.

If `jax_compilation_cache_dir` is already set (by the user's own code or `JAX_COMPILATION_CACHE_DIR`),
kvjax leaves it alone.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV = "KVJAX_COMPILE_CACHE"
MIN_COMPILE_SECONDS = 0.5
MAX_BYTES = 4 << 30

_ours: list[str | None] = [None]  # the folder kvjax set, if any
_off = [False]  # `disable()` was called
_warned: set[str] = set()


def wanted() -> bool:
    """False when turned off: `KVJAX_COMPILE_CACHE` is 0 / false / no / off, or `disable()` was called."""
    return not _off[0] and os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def enable(path: str | os.PathLike) -> Path | None:
    """Turn the persistent compilation cache on in `path` (created if needed). Returns the folder in use,
    or None when it is off (`wanted()` is False, or `path` cannot be written: one warning)."""
    if not wanted():
        _turn_off()
        return None
    current = jax.config.jax_compilation_cache_dir
    if current and current != _ours[0]:
        return Path(current)  # set by the user: theirs
    path = Path(path).expanduser().absolute()
    if current == str(path):
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        if str(path) not in _warned:
            _warned.add(str(path))
            print(f"kvjax: warning: compile cache off, cannot write {path} ({e.strerror or e}); "
                  f"set KVJAX_CACHE to a writable folder, or {ENV}=0", file=sys.stderr, flush=True)
        _turn_off()
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # any size: compile time decides
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()  # JAX opens its folder, and decides to use it, once: again now
    _ours[0] = str(path)
    return path


def disable() -> None:
    """Turn the cache off for this process (`kvjax --no-compile-cache`), whatever `enable` did before."""
    _off[0] = True
    _turn_off()


def _turn_off() -> None:
    """Undo what `enable` set (nothing when the folder is the user's own)."""
    if _ours[0] is not None:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
        _ours[0] = None
