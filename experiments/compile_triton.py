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

from kvjax import kernels, quantizers
from kvjax.kernels import lowering
from kvjax.kernels.block_sizes import DECODE, PREFILL, QUANT_DECODE
from kvjax.kv_state import DenseKV
from kvjax.quant_kv import QuantKV

SDS = jax.ShapeDtypeStruct
I32 = jnp.int32


def cases():
    """(name, kernel, args, static) at bench_kernels.py's shapes (Llama-3-8B attention, batch 4)."""
    b, h, n_kv, d, s, t, sp = 4, 32, 8, 128, 32768, 512, 8192
    for dtype in (jnp.bfloat16, jnp.float32):
        tag = jnp.dtype(dtype).name
        q1, k = SDS((b, 1, h, d), dtype), SDS((b, n_kv, s, d), dtype)
        yield f"decode {tag}", kernels.decode_attention, (q1, k, k, SDS((b,), I32)), {}
        pool = SDS((b, n_kv * s // 2, d), dtype)
        yield f"ragged decode {tag}", kernels.ragged_decode_attention, \
            (q1, pool, pool, SDS((b, n_kv), I32), SDS((b, n_kv), I32)), {}
        qp, kp, pos, kv_pos = SDS((1, t, h, d), dtype), SDS((1, n_kv, sp, d), dtype), SDS((1, t), I32), \
            SDS((1, n_kv, sp), I32)
        yield f"prefill forward {tag}", kernels.prefill_attention, (qp, pos, kp, kp, kv_pos, SDS((1,), I32)), {}
        yield f"H2O column sums {tag}", kernels.attention_column_sums, \
            (qp, pos, SDS((1, t), jnp.bool_), kp, kv_pos, SDS((1,), I32), SDS((1, n_kv, h // n_kv * t), jnp.float32)), {}
        yield f"window attention {tag}", kernels.window_attention, \
            (SDS((1, 8, h, d), dtype), SDS((1, 8), I32), kp, kv_pos, SDS((1,), I32)), {}
    for spec in ["kivi-2", "kivi-4", "per_token-2", "per_token-4", "per_token-8", "int8", "fp8"]:
        def state(spec=spec):
            pos = jnp.broadcast_to(jnp.arange(s, dtype=I32), (b, n_kv, s))
            zeros = jnp.zeros((b, n_kv, s, d), jnp.bfloat16)
            return QuantKV.from_dense(DenseKV(zeros, zeros, pos, jnp.full((b,), s, I32)), quantizers.get(spec), s)
        st = jax.eval_shape(state)
        yield f"quant decode {spec}", kernels.quant_decode_attention, \
            (SDS((b, 1, h, d), jnp.bfloat16), st.kq, st.vq, st.n_q, st.k_res, st.v_res, st.n_r), {}


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
        for name, kernel, a, static in tqdm([c for c in cases() if not args.only or args.only in c[0]],
                                            desc="compile"):
            launch = tables["quant" if "quant" in name else "decode" if "decode" in name else "prefill"]
            try:
                modules = lowering.triton_modules(kernel, *a, **static)
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
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
