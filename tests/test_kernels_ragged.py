"""Ragged per-head decode kernel (RaggedKV pools) against its float32 reference."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import KernelCase, close, normal
from kvjax.kernels import ragged_decode_attention, ragged_decode_attention_reference


def pool(rng, start, length, n_pool, d, dtype):
    """k, v [B, P, D] with NaN in every slot no head uses."""
    slot = jnp.arange(n_pool)[None, None, :]
    used = ((slot >= start[:, :, None]) & (slot < (start + length)[:, :, None])).any(1)[..., None]
    k, v = (jnp.where(used, normal(rng, (start.shape[0], n_pool, d), dtype), jnp.nan).astype(dtype) for _ in range(2))
    return k, v


class RaggedCases(KernelCase):
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("group,head_dim", [(1, 64), (3, 128), (8, 64)])
    def test_matches_reference(self, group, head_dim, dtype):
        rng = np.random.default_rng(group + head_dim)
        # heads keep 0, 1, odd and long counts; the last region ends at the pool's end (block shifted left)
        start = jnp.array([[0, 5, 6], [0, 70, 71]], jnp.int32)
        length = jnp.array([[5, 1, 94], [70, 0, 29]], jnp.int32)
        k, v = pool(rng, start, length, 100, head_dim, dtype)
        q = normal(rng, (2, 1, 3 * group, head_dim), dtype)
        out = ragged_decode_attention(q, k, v, start, length, block_k=16, n_splits=3, interpret=self.INTERPRET)
        close(out, ragged_decode_attention_reference(q, k, v, start, length), dtype)
        assert not np.any(np.asarray(out[1, 0, 3 * group: 6 * group], np.float32))  # empty head -> zeros

    def test_several_queries_causal_default_blocks(self):
        rng = np.random.default_rng(5)
        start, length = jnp.array([[0, 40]], jnp.int32), jnp.array([[40, 60]], jnp.int32)
        k, v = pool(rng, start, length, 128, 64, jnp.float32)
        pos = jnp.concatenate([jnp.arange(40), jnp.arange(60), jnp.full(28, 10_000)])[None].astype(jnp.int32)
        q = normal(rng, (1, 4, 4, 64), jnp.float32)
        q_pos = jnp.array([[20, 45, 59, 60]], jnp.int32)
        out = ragged_decode_attention(q, k, v, start, length, q_pos=q_pos, pos=pos, interpret=self.INTERPRET)
        close(out, ragged_decode_attention_reference(q, k, v, start, length, q_pos=q_pos, pos=pos), jnp.float32)

    def test_bad_block(self):
        q, k = jnp.zeros((1, 1, 2, 64)), jnp.zeros((1, 64, 64))
        with pytest.raises(ValueError, match=r'block_k 128 must be a power of two .*attention_impl="xla"'):
            ragged_decode_attention(q, k, k, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32), block_k=128,
                                    interpret=self.INTERPRET)


class TestRagged(RaggedCases):
    INTERPRET = False


class TestRaggedInterpret(RaggedCases):
    INTERPRET = True


class TestRaggedTpuInterpret(RaggedCases):
    INTERPRET = True
    TARGET = "tpu"
