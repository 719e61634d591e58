"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


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
