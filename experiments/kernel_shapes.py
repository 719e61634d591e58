"""Abstract arguments of every kernel at the benchmark's shapes (check_kernels.py, compile_triton.py).

Shapes of `bench_kernels.py`: Llama-3-8B attention (32 query heads, 8 KV heads, head dim 128), decode
at batch 4 over `context` slots (ragged pools half that per head; paged pools in pages of 16), prefill a 512-token chunk over 8k.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax import kernels, quantizers
from kvjax.states import DenseKV
from kvjax.states import QuantKV

SDS = jax.ShapeDtypeStruct
I32 = jnp.int32
B, H, K, D, CHUNK, PREFILL_CONTEXT = 4, 32, 8, 128, 512, 8192
QUANTS = ["kivi-2", "kivi-4", "per_token-2", "per_token-4", "per_token-8", "int8", "fp8"]


def bench_shapes(context: int, dtype=jnp.bfloat16, quants=QUANTS):
    """(name, kernel, abstract args) for each kernel; quantized caches hold bf16 residuals."""
    q1, k = SDS((B, 1, H, D), dtype), SDS((B, K, context, D), dtype)
    yield "decode", kernels.decode_attention, (q1, k, k, SDS((B,), I32))
    for spec in quants:
        def state(spec=spec):
            pos = jnp.broadcast_to(jnp.arange(context, dtype=I32), (B, K, context))
            zeros = jnp.zeros((B, K, context, D), jnp.bfloat16)
            return QuantKV.from_dense(DenseKV(zeros, zeros, pos, jnp.full((B,), context, I32)), quantizers.get(spec),
                                      context)
        st = jax.eval_shape(state)
        yield f"quant decode ({spec})", kernels.quant_decode_attention, \
            (SDS((B, 1, H, D), jnp.bfloat16), st.kq, st.vq, st.n_q, st.k_res, st.v_res, st.n_r)
    pool = SDS((B, K * context // 2, D), dtype)
    yield "ragged decode", kernels.ragged_decode_attention, (q1, pool, pool, SDS((B, K), I32), SDS((B, K), I32))
    pages = SDS((B * K * context // 16, 16, D), dtype)  # a paged pool of 16-slot pages, every head's context
    yield "paged decode", kernels.paged_decode_attention, (q1, pages, pages, SDS(pages.shape[:2], I32),
                                                           SDS((B, K, context // 16), I32), SDS((B, K), I32), SDS((B, 1), I32))
    s, t = PREFILL_CONTEXT, CHUNK
    qp, kp, pos, kv_pos = SDS((1, t, H, D), dtype), SDS((1, K, s, D), dtype), SDS((1, t), I32), SDS((1, K, s), I32)
    yield "prefill forward", kernels.prefill_attention, (qp, pos, kp, kp, kv_pos, SDS((1,), I32))
    yield "H2O column sums", kernels.attention_column_sums, \
        (qp, pos, SDS((1, t), jnp.bool_), kp, kv_pos, SDS((1,), I32), SDS((1, K, H // K * t), jnp.float32))
    yield "window attention", kernels.window_attention, (SDS((1, 8, H, D), dtype), SDS((1, 8), I32), kp, kv_pos,
                                                         SDS((1,), I32))
