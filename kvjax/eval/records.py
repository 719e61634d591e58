"""Result rows as CSV: fixed columns, run metadata on every row, and resume.

One row per sample x configuration (or chunk x configuration for perplexity, prompt x configuration
for the benchmark). Every row carries what it takes to trust it later: the seed, the model and a hash
of its weights, the dtype, the task options, the kvjax / jax versions and the device. Rows are appended
and flushed as each (batch, configuration) finishes, so an interrupted run keeps what it computed;
`--resume` reads the file back and computes only the rows whose key (`KEY_FIELDS`) is missing, after
checking that the existing rows were made with the same model, seed, dtype and options.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import jax
import numpy as np

import kvjax

KEY_FIELDS = ("task", "subtask", "length", "depth", "sample", "method", "ratio", "budget", "quant")
META_FIELDS = ("seed", "model", "model_hash", "dtype", "options", "kvjax_version", "jax_version", "device")
RESULT_FIELDS = ("needle_depth", "kept_fraction", "cache_bytes", "full_cache_bytes", "answer", "expected", "score",
                 "correct", "nll", "ppl", "n_tokens", "prefill_s", "compress_s", "answer_s", "compile_s",
                 "prefill_tok_s", "decode_tok_s", "peak_bytes", "batch")
COLUMNS = KEY_FIELDS + RESULT_FIELDS + META_FIELDS
MUST_MATCH = ("model_hash", "seed", "dtype", "options")


def fmt(value) -> str:
    """How a value is written to the CSV (and compared on resume): None -> "", floats by repr."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def row_key(row: dict) -> tuple[str, ...]:
    """The identity of a row (what `--resume` matches on), as the strings the CSV stores."""
    return tuple(fmt(row.get(k)) for k in KEY_FIELDS)


def params_hash(params) -> str:
    """blake2b of every weight array (in pytree order, with its shape and dtype): 16 hex digits."""
    h = hashlib.blake2b(digest_size=8)
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(x)
        h.update(f"{jax.tree_util.keystr(path)}:{a.shape}:{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def run_metadata(lm, seed: int, options: dict) -> dict:
    """The metadata columns of a run (the same on each of its rows)."""
    return dict(seed=seed, model=lm.name, model_hash=params_hash(lm.params), dtype=lm.cfg.dtype,
                options=json.dumps(options, sort_keys=True), kvjax_version=kvjax.__version__,
                jax_version=jax.__version__, device=jax.devices()[0].device_kind)


def read_rows(path) -> list[dict]:
    """Rows of a results CSV (values as strings)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no results file {str(p)!r}")
    with p.open(newline="") as f:
        return list(csv.DictReader(f))


class ResultsFile:
    """A results CSV opened for appending; checks writability (and the resume conditions) up front."""

    def __init__(self, path, meta: dict, resume: bool = False, overwrite: bool = False):
        self.path, self.meta = Path(path), meta
        self.done: set[tuple[str, ...]] = set()
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if exists and not (resume or overwrite):
            raise ValueError(f"{str(self.path)!r} exists: pass --resume to continue it or --overwrite to replace it")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if exists and resume:
                self._check_resume()
            else:
                with self.path.open("w", newline="") as f:
                    csv.writer(f).writerow(COLUMNS)
            if not os.access(self.path, os.W_OK):
                raise PermissionError(f"permission denied: {str(self.path)!r}")
        except OSError as e:
            raise ValueError(f"cannot write the results file {str(self.path)!r}: {e.strerror or e}") from None

    def _check_resume(self) -> None:
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise ValueError(f"{str(self.path)!r} has other columns than this kvjax version writes: "
                                 "use another --out")
            rows = list(reader)
        task = json.loads(self.meta["options"]).get("task")
        for r in rows:
            if r["task"] != task:
                continue
            for k in MUST_MATCH:
                if r[k] != fmt(self.meta[k]):
                    raise ValueError(f"{str(self.path)!r} holds {task} rows made with another {k} "
                                     f"({r[k]!r}, now {fmt(self.meta[k])!r}): use another --out")
        self.done = {row_key(r) for r in rows}

    def todo(self, key: tuple[str, ...]) -> bool:
        return key not in self.done

    def append(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            for r in rows:
                full = {**r, **self.meta}
                unknown = set(full) - set(COLUMNS)
                if unknown:
                    raise ValueError(f"unknown result fields {sorted(unknown)}")
                w.writerow([fmt(full.get(c)) for c in COLUMNS])
        self.done |= {row_key(r) for r in rows}
