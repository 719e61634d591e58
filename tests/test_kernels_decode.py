"""Dense decode kernel (flash-decoding) against its float32 reference."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import KernelCase, close, nan_past, normal
from kvjax.kernels import decode_attention, decode_attention_reference


class DecodeCases(KernelCase):
    def test_hand_computed(self):
        # D = 16, q = 4 e_0, so q.k / sqrt(16) = k[0]: slot 0 scores 0, slot 1 scores ln 3
        # -> softmax [1/4, 3/4]; v = 1 and 5 -> out = 1/4 + 15/4 = 4. Slot 2 (unused) holds NaN.
        q = jnp.zeros((1, 1, 1, 16)).at[0, 0, 0, 0].set(4.0)
        k = jnp.zeros((1, 1, 16, 16)).at[0, 0, 1, 0].set(np.log(3.0))
        v = jnp.ones((1, 1, 16, 16)).at[0, 0, 1].set(5.0)
        length = jnp.array([2], jnp.int32)
        out = decode_attention(q, nan_past(k, length), nan_past(v, length), length, block_k=16,
                               interpret=self.INTERPRET)
        np.testing.assert_allclose(np.asarray(out), 4.0, rtol=1e-6)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("group,head_dim", [(1, 64), (3, 128), (8, 64)])
    def test_matches_reference(self, group, head_dim, dtype):
        rng = np.random.default_rng(group * head_dim)
        b, n_kv, s = 3, 2, 128
        length = jnp.array([1, 37, s], jnp.int32)  # length 1, odd and not a multiple of the block, full
        q = normal(rng, (b, 1, n_kv * group, head_dim), dtype)
        k = nan_past(normal(rng, (b, n_kv, s, head_dim), dtype), length)
        v = nan_past(normal(rng, (b, n_kv, s, head_dim), dtype), length)
        out = decode_attention(q, k, v, length, block_k=16, n_splits=4, interpret=self.INTERPRET)
        assert out.shape == q.shape and out.dtype == dtype
        close(out, decode_attention_reference(q, k, v, length), dtype)

    def test_default_blocks_and_empty_row(self):
        rng = np.random.default_rng(0)
        length = jnp.array([0, 200], jnp.int32)  # a row with nothing stored gives zeros
        q = normal(rng, (2, 1, 4, 64), jnp.float32)
        k, v = (nan_past(normal(rng, (2, 2, 256, 64), jnp.float32), length) for _ in range(2))
        out = decode_attention(q, k, v, length, interpret=self.INTERPRET)
        assert not np.any(np.asarray(out[0]))
        close(out, decode_attention_reference(q, k, v, length), jnp.float32)

    @pytest.mark.parametrize("kwargs,match", [
        (dict(block_k=48), "block_k 48 must be a power of two"),
        (dict(block_k=32, n_splits=2), "n_splits 2 does not divide"),
    ])
    def test_bad_blocks(self, kwargs, match):
        q, k = jnp.zeros((1, 1, 2, 64)), jnp.zeros((1, 1, 96, 64))
        with pytest.raises(ValueError, match=match) as e:
            decode_attention(q, k, k, jnp.array([5]), interpret=self.INTERPRET, **kwargs)
        assert 'attention_impl="xla"' in str(e.value)

    def test_bad_head_dim_and_dtype(self):
        with pytest.raises(ValueError, match=r"head dim 48 .*attention_impl=\"xla\""):
            decode_attention(jnp.zeros((1, 1, 2, 48)), *[jnp.zeros((1, 1, 32, 48))] * 2, jnp.array([3]),
                             interpret=self.INTERPRET)
        with pytest.raises(ValueError, match=r"int32 is not supported"):
            decode_attention(jnp.zeros((1, 1, 2, 64)), *[jnp.zeros((1, 1, 32, 64), jnp.int32)] * 2, jnp.array([3]),
                             interpret=self.INTERPRET)


class TestDecode(DecodeCases):
    INTERPRET = False


class TestDecodeInterpret(DecodeCases):
    INTERPRET = True


class TestDecodeTpuInterpret(DecodeCases):
    INTERPRET = True
    TARGET = "tpu"


def test_compiling_on_cpu_names_the_fallback():
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("CPU only")
    with pytest.raises(ValueError, match=r'attention_impl="xla"'):
        decode_attention(jnp.zeros((1, 1, 2, 64)), *[jnp.zeros((1, 1, 32, 64))] * 2, jnp.array([3]))
