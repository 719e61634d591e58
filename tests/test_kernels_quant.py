"""Quantized decode kernel against its float32 reference (and the state's own jnp attention)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import KernelCase, close, normal
from kvjax import quant, quantizers
from kvjax.kernels import quant_decode_attention, quant_decode_attention_reference
from kvjax.states import EMPTY_POS, DenseKV
from kvjax.states import QuantKV

SPECS = ["kivi-2", "kivi-4", "per_token-2", "per_token-4", "per_token-8", "int8", "fp8"]


def make_state(rng, spec, dtype, b=3, n_kv=2, s=160, d=64, lengths=(1, 77, 160), tokens=256, nan=True):
    """A QuantKV from a dense state (rows of different lengths: store + partly filled residual);
    with `nan`, unused residual slots hold NaN."""
    length = jnp.array(lengths, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, n_kv, s))
    pos = jnp.where(pos < length[:, None, None], pos, EMPTY_POS)
    k, v = normal(rng, (b, n_kv, s, d), dtype), normal(rng, (b, n_kv, s, d), dtype)
    q = quantizers.get(spec) if isinstance(spec, str) else spec
    st = QuantKV.from_dense(DenseKV(k, v, pos, length), q, tokens)
    if not nan:
        return st
    unused = (jnp.arange(st.residual)[None, :] >= st.n_r[:, None])[:, None, :, None]
    return dataclasses.replace(st, store=dataclasses.replace(
        st.store, k_res=jnp.where(unused, jnp.nan, st.k_res).astype(dtype),
        v_res=jnp.where(unused, jnp.nan, st.v_res).astype(dtype)))


def args(st):
    return st.kq, st.vq, st.n_q, st.k_res, st.v_res, st.n_r


class QuantCases(KernelCase):
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("spec", SPECS)
    def test_matches_reference(self, spec, dtype):
        rng = np.random.default_rng(SPECS.index(spec))
        group = (1, 3, 8)[SPECS.index(spec) % 3]
        st = make_state(np.random.default_rng(0), spec, dtype)
        q = normal(rng, (3, 1, 2 * group, 64), dtype)
        out = quant_decode_attention(q, *args(st), block_k=32, n_splits=2, interpret=self.INTERPRET)
        close(out, quant_decode_attention_reference(q, *args(st)), dtype)
        if dtype == jnp.float32:  # the layer state's own (xla) attention agrees (it needs finite padding)
            clean = make_state(np.random.default_rng(0), spec, dtype, nan=False)
            close(out, clean.attend(q, jnp.full((3, 1), 10_000)), dtype)

    @pytest.mark.parametrize("spec", ["kivi-2", "int8"])
    def test_head_dim_128_default_blocks(self, spec):
        rng = np.random.default_rng(1)
        st = make_state(rng, spec, jnp.bfloat16, d=128, lengths=(160, 3, 64))
        q = normal(rng, (3, 1, 6, 128), jnp.bfloat16)
        close(quant_decode_attention(q, *args(st), interpret=self.INTERPRET),
              quant_decode_attention_reference(q, *args(st)), jnp.bfloat16)

    def test_several_queries_causal(self):
        # T = 3 new tokens on top of the cache (a question fed onto a quantized context): position masks
        rng = np.random.default_rng(2)
        st = make_state(rng, "kivi-4", jnp.float32)
        q = normal(rng, (3, 3, 6, 64), jnp.float32)
        q_pos = jnp.array([[0, 1, 2], [40, 60, 76], [150, 158, 159]], jnp.int32)
        causal = dict(q_pos=q_pos, pos=st.pos, pos_res=st.pos_res)
        out = quant_decode_attention(q, *args(st), **causal, block_k=32, interpret=self.INTERPRET)
        close(out, quant_decode_attention_reference(q, *args(st), **causal), jnp.float32)

    def test_unsupported_layouts_name_the_fallback(self):
        rng = np.random.default_rng(3)
        st = make_state(rng, "kivi-2", jnp.float32)
        q = normal(rng, (3, 1, 2, 64), jnp.float32)
        three_bit = quant.quantize(jnp.zeros((3, 2, 256, 64)), 3, axis=-1, group=32)
        with pytest.raises(ValueError, match=r'uniform at 3 bits .*attention_impl="xla"'):
            quant_decode_attention(q, three_bit, st.vq, st.n_q, st.k_res, st.v_res, st.n_r, interpret=self.INTERPRET)
        with pytest.raises(ValueError, match=r"block_k 24 must be a power of two"):
            quant_decode_attention(q, *args(st), block_k=24, interpret=self.INTERPRET)
        with pytest.raises(ValueError, match=r"multiple of 32"):  # KIVI key groups of 32 tokens
            quant_decode_attention(q, *args(st), block_k=16, interpret=self.INTERPRET)


class TestQuant(QuantCases):
    INTERPRET = False


class TestQuantInterpret(QuantCases):
    INTERPRET = True


class TestQuantTpuInterpret(QuantCases):
    INTERPRET = True
    TARGET = "tpu"
