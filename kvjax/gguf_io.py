"""Reading GGUF files (llama.cpp's format): metadata, and tensors dequantized to float32.

Uses the `gguf` package (gguf-py, maintained by llama.cpp) for parsing and dequantization. llama.cpp
stores the q/k projection rows of Llama models permuted for its interleaved RoPE; `unpermute_qk`
undoes that so the weights match Hugging Face's rotate-half RoPE.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import gguf
import numpy as np


def open_gguf(path: str | os.PathLike):
    """Open a GGUF file, turning parse failures into a `ValueError` that names the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises assorted errors on truncated or foreign files
        raise ValueError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from e


def read_metadata(reader) -> dict[str, Any]:
    """All key/value fields of a GGUF file as Python values (str, int, float, bool, lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: [n_head*D, d_model] back to Hugging Face order."""
    rows, cols = w.shape
    head_dim = rows // n_head
    return w.reshape(n_head, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _dequantize(t) -> np.ndarray:
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
    return np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def iter_tensors(reader) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, float32 array in PyTorch [out, in] layout) one tensor at a time."""
    for t in reader.tensors:
        yield t.name, _dequantize(t)


def read_tensor(reader, name: str) -> np.ndarray | None:
    """One tensor as float32, or None if the file has no tensor of that name."""
    return next((_dequantize(t) for t in reader.tensors if t.name == name), None)
