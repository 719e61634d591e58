"""Compile every GPU kernel to an H100 (sm_90a) cubin on a machine without a GPU, with pip `triton`.

    pip install triton          # bundles ptxas; no GPU or driver needed to compile
    python experiments/compile_triton.py [--out experiments/results/kernels_triton.md]

Each kernel is lowered for GPU (`kernels.lowering.triton_modules`: the Triton-dialect module Pallas
emits, what XLA hands to its own Triton at run time) and compiled with `triton.compile` for
`GPUTarget("cuda", 90, 32)` with the kernel's warps and stages; `ptxas -v` on the PTX (the flags
Triton uses) gives registers per thread and spills, Triton's metadata the shared memory per program.
XLA compiles with its bundled Triton and ptxas, so these are close estimates, not XLA's exact figures;
whether the kernels are fast still needs the GPU (`bench_kernels.py`).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from bench_generate import emit
from kernel_shapes import QUANTS, bench_shapes
from kvjax.kernels import lowering
from kvjax.kernels.block_sizes import DECODE, PREFILL, QUANT_DECODE


def cases():
    """(name, kernel, args) at bench_kernels.py's shapes, bf16 and float32 (quantized: bf16 residuals)."""
    for dtype in (jnp.bfloat16, jnp.float32):
        for name, kernel, a in bench_shapes(32768, dtype, quants=[] if dtype == jnp.float32 else QUANTS):
            yield f"{name} {jnp.dtype(dtype).name}", kernel, a


def ptxas_usage(ptx: str, ptxas: str, work: Path) -> dict:
    """Registers per thread and spill bytes from `ptxas -v` for sm_90a."""
    src = work / "kernel.ptx"
    src.write_text(ptx)
    log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", str(src), "-o", str(work / "kernel.o")],
                         capture_output=True, text=True)
    text = log.stdout + log.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None:
        raise RuntimeError(f"ptxas failed: {text.strip()[:500]}")
    return dict(regs=int(regs.group(1)), spill=f"{spill.group(1)} / {spill.group(2)}" if spill else "0 / 0")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("-k", dest="only", default=None, help="only kernels whose name contains this")
    args = p.parse_args(argv)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        raise SystemExit("compile_triton.py needs pip `triton` (pip install triton)")
    target = GPUTarget("cuda", 90, 32)
    ptxas = get_ptxas(90).path
    tables = {"quant": QUANT_DECODE["gpu"], "decode": DECODE["gpu"], "prefill": PREFILL["gpu"]}
    lines = [f"triton {triton.__version__} for sm_90a (H100), jax {jax.__version__}; shapes of bench_kernels.py "
             "(32 query heads, 8 KV heads, head dim 128; decode batch 4 at 32k, prefill a 512-token chunk over "
             "8k). Registers per thread and spill stores / loads (bytes) from ptxas -v, shared memory per program "
             "from Triton.", "",
             "| kernel | program | warps / stages | registers | spills (B) | shared mem (B) |", "|---|---|---|---|---|---|"]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, kernel, a in tqdm([c for c in cases() if not args.only or args.only in c[0]],
                                            desc="compile"):
            launch = tables["quant" if "quant" in name else "decode" if "decode" in name else "prefill"]
            try:
                modules = lowering.triton_modules(kernel, *a)
            except ValueError as e:
                lines.append(f"| {name} | | | lowering fails: {str(e).splitlines()[0][:100]} | | |")
                failures += 1
                continue
            for i, ttir in enumerate(modules):
                src = work / f"k{i}.ttir"
                src.write_text(ttir)
                try:
                    compiled = triton.compile(str(src), target=target,
                                              options=dict(num_warps=launch["num_warps"], num_stages=launch["num_stages"]))
                    use = ptxas_usage(compiled.asm["ptx"], ptxas, work)
                    lines.append(f"| {name} | {i + 1} of {len(modules)} | {launch['num_warps']} / {launch['num_stages']}"
                                 f" | {use['regs']} | {use['spill']} | {compiled.metadata.shared} |")
                except Exception as e:  # noqa: BLE001 (report every kernel, then fail)
                    lines.append(f"| {name} | {i + 1} of {len(modules)} | | compile fails: "
                                 f"{str(e).splitlines()[0][:100]} | | |")
                    failures += 1
    emit(lines, args.out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
