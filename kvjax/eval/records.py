"""Result rows as CSV: fixed columns, run metadata on every row, resume, and one writer at a time.

One row per sample x configuration (or chunk x configuration for perplexity, prompt x configuration
for the benchmark). Every row carries what it takes to trust it later: the seed, the model and a hash
of its weights, the dtype, the task options, the kvjax / jax versions and the device. Rows are appended
and flushed as each (batch, configuration) finishes, so an interrupted run keeps what it computed;
`--resume` reads the file back and computes only the rows whose key (`KEY_FIELDS`) is missing, after
checking that the existing rows were made with the same model, seed, dtype and options.

Runs that must not lose or mix rows:

* **One writer.** A `ResultsFile` holds an exclusive `flock` on the sidecar `<csv>.lock` (holding its
  pid) from before it reads or writes the CSV until it is closed or collected; another process gets
  "another kvjax eval is writing X (pid N)" at once. The kernel drops the lock when its process dies
  (kill -9 included), so a stale sidecar never blocks. ResultsFiles of one process on one file share
  the lock.
* **One row per key.** Rows already in the file are never appended again, and `--resume` on a file
  holding several rows of one key (written by an older kvjax by two concurrent runs) keeps the first
  and drops the rest, with a warning.
* **A half-written last row** (a run killed while writing it) is not a row: `--resume` drops it with a
  warning and computes it again, keeping every complete row; `read_rows` (summary, plot) skips it with
  a warning. A damaged row before the last is an error naming its line.
* A file that is not UTF-8 text, or not a kvjax results CSV, is a one-line error naming it.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import warnings
import weakref
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
    """The complete rows of a results CSV (values as strings); a half-written last row is skipped with a
    warning. ValueError naming the file if it is missing, not UTF-8 text, or not a results CSV."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no results file {str(p)!r}")
    columns, rows, cut = scan(p)
    if columns:
        missing = [k for k in KEY_FIELDS if k not in columns]
        if missing:
            raise ValueError(f"{str(p)!r} is not a kvjax results CSV (no column {', '.join(missing)})")
    if cut is not None:
        warnings.warn(f"{str(p)!r}: its last row is incomplete (a run stopped while writing it) and is ignored; "
                      "`kvjax eval ... --resume` on this file drops it and computes it again", stacklevel=2)
    return rows


def scan(path: Path) -> tuple[tuple[str, ...], list[dict], int | None]:
    """(columns, complete rows, byte offset where a half-written last row starts, or None) of a CSV.

    A row is complete when it has every column and the line ending after it (the writer ends each row
    with one); only the last row can lack it. ValueError naming the file for anything else."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data":  # anything else than a character cut at the end
            raise ValueError(f"{str(path)!r} is not a kvjax results CSV: not UTF-8 text (byte {e.start}; a binary "
                             "file?)") from None
        text = data[:e.start].decode("utf-8")  # the cut character is part of a half-written row
    consumed = 0

    def lines():
        nonlocal consumed
        for line in io.StringIO(text, newline=""):
            consumed += len(line)
            yield line

    records, ends = [], []  # each record and the character offset just past it
    try:
        for record in csv.reader(lines()):
            records.append(record)
            ends.append(consumed)
    except csv.Error as e:
        raise ValueError(f"{str(path)!r} is not a kvjax results CSV ({e})") from None
    if not records:
        return (), [], None
    columns, body = tuple(records[0]), records[1:]
    cut = None
    if body and (len(body[-1]) != len(columns) or not text.endswith(("\n", "\r"))):
        cut = len(text[:ends[-2]].encode("utf-8"))
        body = body[:-1]
    elif len(text.encode("utf-8")) < len(data):  # a row cut inside its first character
        cut = len(text.encode("utf-8"))
    for i, record in enumerate(body):
        if len(record) != len(columns):
            raise ValueError(f"{str(path)!r}: row {i + 1} has {len(record)} fields, not {len(columns)}: the file is "
                             "damaged; remove that row or use another --out")
    return columns, [dict(zip(columns, r)) for r in body], cut


# --------------------------------------------------------------------------------- writer lock
_HELD: dict[Path, list] = {}  # lock path -> [its open file, flock held; number of ResultsFiles sharing it]


def _lock(csv_path: Path) -> Path:
    """Take (or share, within this process) the exclusive lock of `csv_path`: an flock on `<csv>.lock`,
    which holds the pid. ValueError if another process holds it. Returns the lock's key for `_unlock`."""
    lock = csv_path.with_name(csv_path.name + ".lock").absolute()
    if lock in _HELD:
        _HELD[lock][1] += 1
        return lock
    while True:
        f = open(lock, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise ValueError(f"another kvjax eval is writing {str(csv_path)!r} (pid {pid}): wait for it to finish, "
                             "or use another --out") from None
        try:  # its last holder may have removed the file between our open and flock: lock the new one
            same = os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD[lock] = [f, 1]
    return lock


def _unlock(lock: Path) -> None:
    """Release one share of a lock taken by `_lock`; the last one removes the sidecar and unlocks."""
    held = _HELD[lock]
    held[1] -= 1
    if held[1] == 0:
        del _HELD[lock]
        lock.unlink(missing_ok=True)  # while still locked: a waiting process then locks a new file
        held[0].close()


class ResultsFile:
    """A results CSV opened for appending by one process at a time (module docstring); checks
    writability (and the resume conditions) up front. The lock is released by `close()` or when the
    object is collected."""

    def __init__(self, path, meta: dict, resume: bool = False, overwrite: bool = False):
        self.path, self.meta = Path(path), meta
        self.done: set[tuple[str, ...]] = set()
        self._release = None
        self._exists(resume or overwrite)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._release = weakref.finalize(self, _unlock, _lock(self.path))
            exists = self._exists(resume or overwrite)  # again: another run may have written it meanwhile
            if exists and resume:
                self._check_resume()
            else:
                with self.path.open("w", newline="") as f:
                    csv.writer(f).writerow(COLUMNS)
            if not os.access(self.path, os.W_OK):
                raise PermissionError(f"permission denied: {str(self.path)!r}")
        except BaseException as e:
            self.close()
            if isinstance(e, OSError):
                raise ValueError(f"cannot write the results file {str(self.path)!r}: {e.strerror or e}") from None
            raise

    def _exists(self, may_exist: bool) -> bool:
        """Whether the file holds anything; ValueError if it does and `may_exist` (resume, overwrite) is false."""
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if exists and not may_exist:
            raise ValueError(f"{str(self.path)!r} exists: pass --resume to continue it or --overwrite to replace it")
        return exists

    def close(self) -> None:
        """Release the file's lock (idempotent)."""
        if self._release is not None:
            self._release()

    def _check_resume(self) -> None:
        """Check the existing rows against this run, then drop a half-written last row and rows
        repeating a key; `done` is the keys present."""
        columns, rows, cut = scan(self.path)
        if columns != COLUMNS:
            raise ValueError(f"{str(self.path)!r} has other columns than this kvjax version writes: "
                             "use another --out")
        task = json.loads(self.meta["options"]).get("task")
        for r in rows:
            if r["task"] != task:
                continue
            for k in MUST_MATCH:
                if r[k] != fmt(self.meta[k]):
                    raise ValueError(f"{str(self.path)!r} holds {task} rows made with another {k} "
                                     f"({r[k]!r}, now {fmt(self.meta[k])!r}): use another --out")
        if cut is not None:
            os.truncate(self.path, cut)
            warnings.warn(f"{str(self.path)!r}: its last row was incomplete (a run stopped while writing it): "
                          "dropped it; it is computed again", stacklevel=3)
        keys, unique = set(), []
        for r in rows:  # the first row of each key
            if row_key(r) not in keys:
                keys.add(row_key(r))
                unique.append(r)
        if len(unique) < len(rows):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with tmp.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(COLUMNS)
                w.writerows([r[c] for c in COLUMNS] for r in unique)
            tmp.replace(self.path)
            warnings.warn(f"{str(self.path)!r} held {len(rows) - len(unique)} rows repeating another row's "
                          "configuration: kept the first of each", stacklevel=3)
        self.done = keys

    def todo(self, key: tuple[str, ...]) -> bool:
        return key not in self.done

    def append(self, rows: Iterable[dict]) -> None:
        """Write `rows` (with the run's metadata) and flush; a row whose key is already in the file is
        not written again."""
        rows = [r for r in rows if row_key(r) not in self.done]
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            for r in rows:
                full = {**r, **self.meta}
                unknown = set(full) - set(COLUMNS)
                if unknown:
                    raise ValueError(f"unknown result fields {sorted(unknown)}")
                w.writerow([fmt(full.get(c)) for c in COLUMNS])
        self.done |= {row_key(r) for r in rows}
