"""Every kernel lowers for GPU (Pallas Triton) and TPU (Mosaic) on this CPU-only machine.

`kernels.lowering` exports the jitted kernel for a platform that is not attached; the Pallas lowering
is where a backend rejects block shapes, memory spaces and primitives, so these tests catch what the
interpret-mode tests cannot (the interpreter accepts any block). They do not run the backend compiler
(Triton to PTX, Mosaic's layout passes in libtpu) nor the kernels themselves.
"""
from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import kernels, quantizers
from kvjax.kernels import _common as C
from kvjax.kernels import lowering
from kvjax.states import DenseKV
from kvjax.states import QuantKV

S = jax.ShapeDtypeStruct
I32 = jnp.int32
TARGETS = [("gpu", None), ("tpu", None), ("tpu", "TPU v6 lite"), ("tpu", "TPU v4")]
CUSTOM_CALL = {"gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def lowered(platform, kind, kernel, *args, **static) -> str:
    with lowering.target(platform, kind):
        text = lowering.lower(kernel, *args, **static).mlir_module()
    assert CUSTOM_CALL[platform] in text and "kvjax_" in text
    return text


def dense_args(dtype, b=2, n_kv=2, group=3, s=1024, d=64, t=1):
    return (S((b, t, n_kv * group, d), dtype), S((b, n_kv, s, d), dtype), S((b, n_kv, s, d), dtype))


@pytest.mark.parametrize("platform,kind", TARGETS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_and_ragged(platform, kind, dtype):
    q, k, v = dense_args(dtype)
    lowered(platform, kind, kernels.decode_attention, q, k, v, S((2,), I32))
    pool = S((2, 1000, 64), dtype)  # regions of any size, a pool that is not a multiple of the block
    lowered(platform, kind, kernels.ragged_decode_attention, q, pool, pool, S((2, 2), I32), S((2, 2), I32))
    q3 = dense_args(dtype, t=3)[0]  # a question fed on top of a ragged cache: positions, causal masks
    lowered(platform, kind, kernels.ragged_decode_attention, q3, pool, pool, S((2, 2), I32), S((2, 2), I32),
            S((2, 3), I32), S((2, 1000), I32))


@pytest.mark.parametrize("platform,kind", TARGETS)
@pytest.mark.parametrize("spec", ["kivi-2", "kivi-4", "per_token-2", "per_token-4", "per_token-8", "int8", "fp8"])
def test_quantized_decode(platform, kind, spec):
    b, n_kv, s, d = 2, 2, 1024, 64

    def state():
        pos = jnp.broadcast_to(jnp.arange(s, dtype=I32), (b, n_kv, s))
        dense = DenseKV(jnp.zeros((b, n_kv, s, d), jnp.bfloat16), jnp.zeros((b, n_kv, s, d), jnp.bfloat16), pos,
                        jnp.full((b,), s, I32))
        return QuantKV.from_dense(dense, quantizers.get(spec), 1280)

    st = jax.eval_shape(state)
    qargs = (st.kq, st.vq, st.n_q, st.k_res, st.v_res, st.n_r)
    lowered(platform, kind, kernels.quant_decode_attention, S((b, 1, 6, d), jnp.bfloat16), *qargs)
    lowered(platform, kind, kernels.quant_decode_attention, S((b, 4, 6, d), jnp.bfloat16), *qargs,
            q_pos=S((b, 4), I32), pos=st.pos, pos_res=st.pos_res)


@pytest.mark.parametrize("platform,kind", TARGETS)
@pytest.mark.parametrize("dtype,d", [(jnp.float32, 64), (jnp.bfloat16, 128)])
def test_scoring_prefill(platform, kind, dtype, d):
    b, t, s = 2, 256, 2048
    q, k, v = dense_args(dtype, s=s, d=d, t=t)
    pos, kv_pos, length = S((b, t), I32), S((b, 2, s), I32), S((b,), I32)
    lowered(platform, kind, kernels.prefill_attention, q, pos, k, v, kv_pos, length)
    lse = S((b, 2, 3 * t), jnp.float32)
    lowered(platform, kind, kernels.attention_column_sums, q, pos, S((b, t), jnp.bool_), k, kv_pos, length, lse)
    lowered(platform, kind, kernels.window_attention, dense_args(dtype, s=s, d=d, t=8)[0], S((b, 8), I32), k,
            kv_pos, length)


def pallas_grid(kernel, *args):
    """(grid, block shapes) of the kernel's `pallas_call` as traced for the current target."""
    jaxpr = jax.make_jaxpr(kernel)(*args)
    eqns = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
    eqns += [e for outer in jaxpr.eqns for sub in jax.extend.core.jaxprs_in_params(outer.params)
             for e in sub.eqns if e.primitive.name == "pallas_call"]
    mapping = eqns[0].params["grid_mapping"]
    return mapping.grid, [tuple(getattr(d, "block_size", d) for d in bm.block_shape) for bm in mapping.block_mappings]


def test_long_context_decode_lowers_in_bounded_tiles():
    """128k slots: on TPU the cache is cut into splits of at most `max_split` slots (VMEM tiles)."""
    q, k, v = dense_args(jnp.bfloat16, b=1, n_kv=1, group=8, s=131072, d=128)
    lowered("tpu", None, kernels.decode_attention, q, k, v, S((1,), I32))
    with lowering.target("tpu"):
        grid, blocks = pallas_grid(kernels.decode_attention, q, k, v, S((1,), I32))
    assert grid == (1, 1, 32) and blocks[1][-2:] == (4096, 128)  # [q, k, v, outputs]: K tiles of 4096 slots
    lowered("gpu", None, kernels.decode_attention, q, k, v, S((1,), I32))


def test_tpu_prefill_over_the_vmem_budget_names_the_fallback():
    q, k, v = dense_args(jnp.float32, s=65536, d=128, t=128)
    with lowering.target("tpu"), pytest.raises(C.Unsupported, match=r'VMEM.*attention_impl="xla"'):
        lowering.lower(kernels.prefill_attention, q, S((2, 128), I32), k, v, S((2, 2, 65536), I32), S((2,), I32))


def test_auto_attention_on_tpu_falls_back_where_a_kernel_cannot_take_the_state():
    """`attention_impl="auto"` (strict=False) uses the jnp attention when the TPU prefill would overflow VMEM."""
    b, t, s, d = 1, 16, 65536, 128
    state = jax.eval_shape(lambda: DenseKV(jnp.zeros((b, 1, s, d)), jnp.zeros((b, 1, s, d)),
                                           jnp.zeros((b, 1, s), I32), jnp.zeros((b,), I32)))

    def attend(state, q, q_pos):
        return state.attend(q, q_pos, impl="auto")

    with lowering.target("tpu"):
        text = lowering.lower(attend, state, S((b, t, 2, d), jnp.float32), S((b, t), I32)).mlir_module()
    assert "tpu_custom_call" not in text


def test_lowering_needs_a_known_target():
    with pytest.raises(ValueError, match="needs a target"):
        lowering.lower(kernels.decode_attention, *dense_args(jnp.float32), S((2,), I32))
    with pytest.raises(ValueError, match="target must be one of"):
        lowering.target("cuda").__enter__()  # entering the context checks the platform


def test_target_runs_the_tpu_variant_in_the_interpreter():
    """Under a TPU target, interpret=True runs the TPU kernel (here: the ragged pool windows) on CPU."""
    rng = np.random.default_rng(0)
    start, length = jnp.array([[0, 700]], I32), jnp.array([[700, 300]], I32)
    k, v = (jnp.asarray(rng.normal(size=(1, 1000, 64)), jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.normal(size=(1, 1, 4, 64)), jnp.float32)
    ref = kernels.ragged_decode_attention_reference(q, k, v, start, length)
    with lowering.target("tpu"):
        out = kernels.ragged_decode_attention(q, k, v, start, length, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_benchmark_shapes_lower(platform):
    """The shapes of experiments/bench_kernels.py (Llama-3-8B attention, batch 4, bf16, 128k context)."""
    b, h, n_kv, d, s, t = 4, 32, 8, 128, 131072, 512
    bf = jnp.bfloat16
    q1, k, length = S((b, 1, h, d), bf), S((b, n_kv, s, d), bf), S((b,), I32)
    lowered(platform, None, kernels.decode_attention, q1, k, k, length)

    def state(spec):
        pos = jnp.broadcast_to(jnp.arange(s, dtype=I32), (b, n_kv, s))
        dense = DenseKV(jnp.zeros((b, n_kv, s, d), bf), jnp.zeros((b, n_kv, s, d), bf), pos, jnp.full((b,), s, I32))
        return QuantKV.from_dense(dense, quantizers.get(spec), s)

    for spec in ["kivi-2", "kivi-4", "per_token-4", "int8", "fp8"]:
        st = jax.eval_shape(lambda spec=spec: state(spec))
        lowered(platform, None, kernels.quant_decode_attention, q1, st.kq, st.vq, st.n_q, st.k_res, st.v_res, st.n_r)
    pool = S((b, n_kv * s // 2, d), bf)
    lowered(platform, None, kernels.ragged_decode_attention, q1, pool, pool, S((b, n_kv), I32), S((b, n_kv), I32))
    sp = 8192
    qp, kp, pos, kv_pos = S((1, t, h, d), bf), S((1, n_kv, sp, d), bf), S((1, t), I32), S((1, n_kv, sp), I32)
    lowered(platform, None, kernels.prefill_attention, qp, pos, kp, kp, kv_pos, S((1,), I32))
    lowered(platform, None, kernels.attention_column_sums, qp, pos, S((1, t), jnp.bool_), kp, kv_pos, S((1,), I32),
            S((1, n_kv, h // n_kv * t), jnp.float32))


def test_gpu_kernels_compile_to_h100_cubins():
    """Triton (pip, bundling ptxas) compiles the lowered modules for sm_90a without a GPU: no kernel
    the Triton toolchain rejects (the column-sum kernel once lowered an i1 loop bound), no spills."""
    pytest.importorskip("triton")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import compile_triton

    assert compile_triton.main(["-k", "bfloat16"]) == 0
    assert compile_triton.main(["-k", "kivi-2"]) == 0
