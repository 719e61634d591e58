"""Native CPU kernels called through XLA's FFI: fused decode attention over a quantized K/V store.

XLA:CPU writes each block's dequantized codes out as float32 before a dot reads them (it does not fuse
a producer into a dot), so on the jnp path a 2- or 4-bit store decodes slower than the dense cache
(experiments/results/quant_decode_speed.md). `quant_attend` runs `quant_attend.cc` instead: one pass
per head that unpacks and dequantizes each token's key and value rows into a row buffer and scores,
softmaxes (online) and mixes them at once. It is the store part of `kvjax.attention.online_attention`
on CPU for decode-sized queries; the jnp path (`QuantStore.attention_parts`' blocks) is the reference
and the fallback.

The kernel is compiled on first use with the system C++ compiler (`$CXX`, else g++) at `-O3
-march=native` into `$KVJAX_CACHE/native/<hash>/` (`$KVJAX_CACHE` as `kvjax.hub.cache_dir`, which
this module cannot import: hub imports the states), keyed by a hash of the
source, the flags, the compiler's version and jaxlib's, as torch's `cpp_extension.load` does; later
processes load the library. Without a compiler, or if the build fails, a warning is printed once and
attention stays on the jnp path. `KVJAX_NATIVE=0` turns the kernel off (so does `disabled()`, at trace
time: a function already traced keeps its choice).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from kvjax import quant

SOURCE = Path(__file__).with_name("quant_attend.cc")
TARGET = "kvjax_quant_attend"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math",
         "-fassociative-math", "-fno-signed-zeros", "-mprefer-vector-width=512")
MAX_ROWS = 64  # query rows per KV head (G x T) up to which the kernel is used: decode steps, not prefill
_KIND = {"uniform": 0, "int8": 1, "fp8": 2}
_state: dict = {}  # "lib": the loaded library, or "error": why there is none; "off": disabled() depth


def _cache() -> Path:
    return Path(os.environ.get("KVJAX_CACHE") or Path.home() / ".cache" / "kvjax").expanduser() / "native"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cpu() -> str:
    """What `-march=native` compiles for: the CPU's flags (a cache shared by machines of other CPUs must
    not hand one a library built for instructions it lacks)."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build() -> Path:
    """The compiled library's path, compiling it first unless the cache holds it (RuntimeError if it fails)."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set $CXX or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, jaxlib.__version__, _cpu()]).encode()
                         ).hexdigest()[:16]
    out = _cache() / key / "quant_attend.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, then moved in whole
        so = Path(tmp) / out.name
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(so)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(so, out)
    return out


def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA (on the first call: builds it)."""
    if "lib" not in _state and "error" not in _state:
        try:
            lib = ctypes.cdll.LoadLibrary(str(build()))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.KvjaxQuantAttend), platform="cpu")
            _state["lib"] = lib
        except (OSError, RuntimeError) as e:
            _state["error"] = str(e)
            print(f"kvjax: native quantized attention unavailable, using the jnp path ({e})", file=sys.stderr)
    return "lib" in _state


@contextlib.contextmanager
def disabled():
    """Within the block, functions traced use the jnp path (benchmarks compare the two in one process)."""
    _state["off"] = _state.get("off", 0) + 1
    try:
        yield
    finally:
        _state["off"] -= 1


def enabled() -> bool:
    """Whether attention traced now may use the kernel: on CPU, not turned off, and built."""
    return (os.environ.get("KVJAX_NATIVE", "1") != "0" and not _state.get("off") and jax.default_backend() == "cpu"
            and available())


def supports(qa: quant.QuantizedArray) -> bool:
    """Whether the kernel reads `qa`'s format: uniform 2/4/8-bit, int8 or fp8 codes of rows of 64, 128
    or 256 channels, in channel groups (of tokens) or token groups of a multiple of 16 channels, no
    outliers (KVQuant's sparse side store, non-uniform and 3-bit codes stay on the jnp path)."""
    return (qa.kind in _KIND and qa.outlier_val is None and qa.shape[-1] in (64, 128, 256)
            and (qa.axis == -2 or (qa.axis == -1 and qa.group % 16 == 0))
            and (qa.kind != "uniform" or qa.bits in (2, 4, 8)))


def _operand(qa: quant.QuantizedArray):
    codes = qa.codes  # uint8, int8 or float8 bytes as they are (a bitcast here copies the whole store)
    zero = qa.zero.astype(jnp.float32) if qa.zero is not None else jnp.zeros((1,), jnp.float32)
    attrs = dict(kind=np.int64(_KIND[qa.kind]), bits=np.int64(qa.bits), axis=np.int64(-qa.axis),
                 group=np.int64(qa.group))
    return (codes, qa.scale.astype(jnp.float32), zero), attrs


def quant_attend(qf, qf_pos, carry, kq, vq, pos, start, count):
    """Continue an online softmax over quantized store slots, in one native call.

    Args:
      qf: float32 [B, K, M, D] scaled, folded queries; qf_pos int32 [B, M] (`attention._fold_queries`).
      carry: (m, l, acc) float32 [B, K, M], [B, K, M], [B, K, M, Dv], as `online_attention` holds it.
      kq, vq: `QuantizedArray` keys / values [B, Hs, S, D] (Hs = K, or 1: a pool every head reads).
      pos: int32 [B, Hs, S]. start, count: int32 [B, K]: head k reads slots [start, start + count) of
        its store row (row k, or the pool's), whole quantization groups.
    Returns:
      the carry after those slots: visible where pos <= qf_pos (the reference: `online_attention` over
      the `KeyBlock` / `ValueBlock` parts, up to float32 rounding).
    """
    (kc, ks, kz), ka = _operand(kq)
    (vc, vs, vz), va = _operand(vq)
    m, l, acc = carry
    attrs = {f"k_{n}": v for n, v in ka.items()} | {f"v_{n}": v for n, v in va.items()}
    out = jax.ShapeDtypeStruct
    call = jax.ffi.ffi_call(TARGET, (out(m.shape, jnp.float32), out(l.shape, jnp.float32), out(acc.shape, jnp.float32)),
                            vmap_method="sequential")
    i32 = lambda x: x.astype(jnp.int32)  # noqa: E731
    return tuple(call(qf.astype(jnp.float32), i32(qf_pos), m, l, acc, kc, ks, kz, vc, vs, vz, i32(pos),
                      i32(start), i32(count), **attrs))
