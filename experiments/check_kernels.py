"""What can be checked of the kernels without a GPU or TPU: interpreted accuracy and backend lowering.

    python experiments/check_kernels.py [--out experiments/results/kernels.md]

For each kernel, on random inputs with rows of different lengths (NaN in every unused slot):
* the largest absolute difference from its float32 `*_reference`, run in the Pallas interpreter as the
  GPU variant (plain `interpret=True`) and as the TPU variant (under `lowering.target("tpu")`), in
  float32 and bfloat16;
* whether it lowers (`kernels.lowering`) for GPU (Triton) and for TPU v4 / v5e / v6e (Mosaic) at the
  shapes of `bench_kernels.py` (Llama-3-8B attention, batch 4, bf16, 128k context), and how long the
  lowering takes. Lowering is not compiling: Triton's PTX step and libtpu's Mosaic passes need the
  hardware's toolchain, and speed needs the hardware (run bench_kernels.py there).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kvjax import kernels, quantizers
from kvjax.kernels import lowering
from kvjax.states import DenseKV, EMPTY_POS
from kvjax.states import QuantKV
from bench_generate import emit
from kernel_shapes import bench_shapes

I32 = jnp.int32
TARGETS = [("gpu", None), ("tpu", "TPU v4"), ("tpu", "TPU v5 lite"), ("tpu", "TPU v6 lite")]
QUANTS = ["kivi-2", "kivi-4", "per_token-4", "int8", "fp8"]


def nan_past(x, length):
    idx = jnp.arange(x.shape[2])[None, None, :, None]
    return jnp.where(idx < length[:, None, None, None], x, jnp.nan).astype(x.dtype)


def accuracy_cases(dtype, rng):
    """(name, kernel call, reference call) on small random inputs (2 KV heads, G = 3, D = 64)."""
    b, n_kv, g, s, d, t = 3, 2, 3, 1024, 64, 128
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    length = jnp.array([1, 517, 1024], I32)
    k, v = nan_past(normal(b, n_kv, s, d), length), nan_past(normal(b, n_kv, s, d), length)
    q1 = normal(b, 1, n_kv * g, d)
    yield "decode", lambda i: kernels.decode_attention(q1, k, v, length, interpret=i), \
        lambda: kernels.decode_attention_reference(q1, k, v, length)
    pos = jnp.where(jnp.arange(s)[None, None] < length[:, None, None], jnp.arange(s), EMPTY_POS).astype(I32)
    pos = jnp.broadcast_to(pos, (b, n_kv, s))
    for spec in QUANTS:
        st = QuantKV.from_dense(DenseKV(jnp.nan_to_num(k), jnp.nan_to_num(v), pos, length), quantizers.get(spec), 1280)
        a = (st.kq, st.vq, st.n_q, st.k_res, st.v_res, st.n_r)
        yield f"quant decode ({spec})", lambda i, a=a: kernels.quant_decode_attention(q1, *a, interpret=i), \
            lambda a=a: kernels.quant_decode_attention_reference(q1, *a)
    start, lens = jnp.array([[0, 5], [0, 700], [300, 301]], I32), jnp.array([[5, 1], [700, 600], [1, 999]], I32)
    kp, vp = normal(b, 1300, d), normal(b, 1300, d)
    yield "ragged decode", lambda i: kernels.ragged_decode_attention(q1, kp, vp, start, lens, interpret=i), \
        lambda: kernels.ragged_decode_attention_reference(q1, kp, vp, start, lens)
    qp = normal(b, t, n_kv * g, d)
    q_pos = (length[:, None] - t + jnp.arange(t)).astype(I32)
    kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=I32), (b, n_kv, s))
    yield "prefill forward", lambda i: kernels.prefill_attention(qp, q_pos, k, v, kv_pos, length, interpret=i)[0], \
        lambda: kernels.prefill_attention_reference(qp, q_pos, k, v, kv_pos, length)[0]
    valid = q_pos >= 0
    lse = kernels.prefill_attention_reference(qp, q_pos, k, v, kv_pos, length)[1]
    yield "H2O column sums", \
        lambda i: kernels.attention_column_sums(qp, q_pos, valid, k, kv_pos, length, lse, interpret=i), \
        lambda: kernels.attention_column_sums_reference(qp, q_pos, valid, k, kv_pos, length)
    yield "window attention", \
        lambda i: kernels.window_attention(qp[:, -8:], q_pos[:, -8:], k, kv_pos, length, interpret=i), \
        lambda: kernels.window_attention_reference(qp[:, -8:], q_pos[:, -8:], k, kv_pos, length)


def max_err(out, ref) -> float:
    return float(np.max(np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    lines = [f"jax {jax.__version__}, {jax.default_backend()} host. Kernels interpreted (Pallas interpreter) "
             "against their float32 references: largest |kernel - reference| over rows of lengths 1 / 517 / 1024 "
             "(NaN in unused slots), GPU variant and TPU variant.", "",
             "| kernel | f32 GPU var. | f32 TPU var. | bf16 GPU var. | bf16 TPU var. |", "|---|---|---|---|---|"]
    errs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        cases = list(accuracy_cases(dtype, np.random.default_rng(0)))
        for name, run, ref in tqdm(cases, desc=f"interpret {jnp.dtype(dtype).name}"):
            r = ref()
            errs.setdefault(name, []).append(max_err(run(True), r))
            with lowering.target("tpu"):
                errs[name].append(max_err(run(True), r))
    lines += [f"| {n} | " + " | ".join(f"{e:.1e}" for e in v) + " |" for n, v in errs.items()]
    lines += ["", "Lowering at bench_kernels.py's shapes (Llama-3-8B attention, batch 4, bf16; decode at 128k "
              "context, prefill: a 512-token chunk over 8k): seconds to lower, or the error.", "",
              "| kernel | " + " | ".join(k or "GPU (Triton)" for _, k in TARGETS) + " |",
              "|---|" + "---|" * len(TARGETS)]
    for name, kernel, a in tqdm(list(bench_shapes(131072, quants=QUANTS)), desc="lowering"):
        cells = []
        for platform, kind in TARGETS:
            t0 = time.perf_counter()
            try:
                with lowering.target(platform, kind):
                    lowering.lower(kernel, *a)
                cells.append(f"{time.perf_counter() - t0:.2f} s")
            except ValueError as e:
                cells.append(f"fails: {str(e).splitlines()[0][:80]}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
