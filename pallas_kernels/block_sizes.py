"""Default block sizes and launch parameters of the kernels, per backend (a table, not code).

Keys: `block_k` key slots per inner-loop step; `block_q` query positions per program (prefill);
`programs` the number of programs a decode call aims for (flash-decoding splits the cache until
batch x KV heads x splits reaches it: enough to fill the chip); `num_warps` / `num_stages` Triton
launch parameters (GPU only); `max_split` the longest decode split (TPU: one K or V tile of the
pipeline in VMEM, 4096 x D 128 x 2 B = 1 MiB, double-buffered); `vmem_bytes` the VMEM a TPU prefill
program may fill with its K/V. "cpu" is interpret mode, tuned for test speed (few, large steps).

GPU values are starting points reasoned from the H100 (not yet tuned on hardware; run
experiments/bench_kernels.py): decode is bandwidth bound, so tiles stay small enough to keep several
loads in flight per SM (64 slots x D 128 x 2 B = 16 KiB per K or V tile) and the split count fills
132 SMs about four times over. TPU values follow the VMEM budget (16 MiB scoped by default); they
lower with Mosaic (`tests/test_kernels_lowering.py`) but have not run on a TPU.
"""
from __future__ import annotations

DECODE = {
    "gpu": dict(block_k=64, programs=528, num_warps=4, num_stages=2),
    "tpu": dict(block_k=512, programs=8, max_split=4096),
    "cpu": dict(block_k=64, programs=1),
}

# Quantized decode: 8 warps on GPU. At 4, unpacking 2/4-bit [64, 128] tiles needs 255 registers per
# thread and spills (ptxas for sm_90a, experiments/compile_triton.py); at 8: 231-248, no spills.
QUANT_DECODE = {**DECODE, "gpu": dict(DECODE["gpu"], num_warps=8)}

PREFILL = {
    "gpu": dict(block_q=64, block_k=64, num_warps=4, num_stages=2),
    "tpu": dict(block_q=128, block_k=512, vmem_bytes=16 << 20),
    "cpu": dict(block_q=64, block_k=128),
}
