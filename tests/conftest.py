"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite runs without JAX's persistent compilation cache (tests of the cache turn it on in their own
# folders): two test workers and the CLI subprocesses sharing one cache folder aborted a worker once
# while it read an entry (2026-12-03), and a test must not depend on what another run left on disk.
os.environ.setdefault("KVJAX_COMPILE_CACHE", "0")


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
