"""Scoring prefill kernels (flash forward + lse, H2O column sums, window attention) against references."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import KernelCase, close, normal
from kvjax import attention
from kvjax.kernels import (attention_column_sums, attention_column_sums_reference, prefill_attention,
                           prefill_attention_reference, window_attention, window_attention_reference)
from kvjax.states import EMPTY_POS


def chunk(rng, group, head_dim, dtype, b=2, n_kv=2, s=128, t=32):
    """The second chunk of a prefill: rows hold 50 and 100 tokens, the chunk's t queries are the last
    t positions (row 0: the last 3 are padding); unused slots hold NaN K/V and EMPTY_POS."""
    length = jnp.array([50, 100], jnp.int32)
    slot = jnp.arange(s)[None, None, :]
    used = slot < length[:, None, None]
    kv_pos = jnp.where(used, jnp.broadcast_to(slot, (b, n_kv, s)), EMPTY_POS).astype(jnp.int32)
    k, v = (jnp.where(used[..., None], normal(rng, (b, n_kv, s, head_dim), dtype), jnp.nan).astype(dtype)
            for _ in range(2))
    q = normal(rng, (b, t, n_kv * group, head_dim), dtype)
    q_pos = (length[:, None] - t + jnp.arange(t)).astype(jnp.int32)
    valid = jnp.ones((b, t), bool).at[0, -3:].set(False)
    return q, q_pos, valid, k, v, kv_pos, length


class PrefillCases(KernelCase):
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("group,head_dim", [(1, 128), (3, 64), (8, 64)])
    def test_forward_and_column_sums(self, group, head_dim, dtype):
        q, q_pos, valid, k, v, kv_pos, length = chunk(np.random.default_rng(group), group, head_dim, dtype)
        out, lse = prefill_attention(q, q_pos, k, v, kv_pos, length, block_q=16, block_k=32, interpret=self.INTERPRET)
        ref_out, ref_lse = prefill_attention_reference(q, q_pos, k, v, kv_pos, length)
        close(out, ref_out, dtype)
        np.testing.assert_allclose(lse, ref_lse, atol=1e-4, rtol=1e-4)
        col = attention_column_sums(q, q_pos, valid, k, kv_pos, length, lse, block_q=16, block_k=32,
                                    interpret=self.INTERPRET)
        ref_col = attention_column_sums_reference(q, q_pos, valid, k, kv_pos, length)
        np.testing.assert_allclose(col, ref_col, atol=1e-4, rtol=1e-4)
        # each valid query's probabilities sum to one: the column sums add up to the valid count per head
        total = np.asarray(col).sum(-1)  # [B, H]
        np.testing.assert_allclose(total, np.broadcast_to(np.asarray(valid).sum(1)[:, None], total.shape), rtol=1e-4)

    def test_matches_blockwise_jnp_attention(self):
        q, q_pos, valid, k, v, kv_pos, length = chunk(np.random.default_rng(7), 3, 64, jnp.float32)
        finite = lambda x: jnp.nan_to_num(x, nan=0.0)  # noqa: E731  (the jnp path needs finite padding)
        out, lse = prefill_attention(q, q_pos, k, v, kv_pos, length, interpret=self.INTERPRET)
        ref_out, ref_lse = attention.blockwise_attention(q, q_pos, finite(k), finite(v), kv_pos, length, 64,
                                                         return_lse=True)
        close(out, ref_out, jnp.float32)
        np.testing.assert_allclose(lse, ref_lse, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_window_attention(self, dtype):
        q, q_pos, _, k, _, kv_pos, length = chunk(np.random.default_rng(3), 3, 64, dtype)
        w = 5  # padded to 16 rows inside
        probs = window_attention(q[:, -w:], q_pos[:, -w:], k, kv_pos, length, block_k=32, interpret=self.INTERPRET)
        ref = window_attention_reference(q[:, -w:], q_pos[:, -w:], k, kv_pos, length)
        assert probs.shape == (2, 6, w, 128)
        np.testing.assert_allclose(probs, ref, atol=2e-2 if dtype == jnp.bfloat16 else 1e-5)
        np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-4)

    def test_blocks_that_do_not_tile(self):
        q, q_pos, _, k, v, kv_pos, length = chunk(np.random.default_rng(0), 1, 64, jnp.float32)
        with pytest.raises(ValueError, match=r'block_q .* power of two that divides 32.*attention_impl="xla"'):
            prefill_attention(q, q_pos, k, v, kv_pos, length, block_q=24, interpret=self.INTERPRET)


class TestPrefill(PrefillCases):
    INTERPRET = False


class TestPrefillInterpret(PrefillCases):
    INTERPRET = True


class TestPrefillTpuInterpret(PrefillCases):
    INTERPRET = True
    TARGET = "tpu"
