"""Shared helpers of the kernel tests: interpret-mode switch, tolerances, NaN-filled inputs."""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.kernels import lowering

# Tolerances per dtype (outputs are O(1) averages of unit-normal values): float32 kernels do their
# matmuls in full float32 (Precision.HIGHEST); bfloat16 kernels feed bf16 into the MXU/tensor cores
# (p is cast to bf16 before p @ v, as FlashAttention does) while the references compute in float32.
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}


class KernelCase:
    """Base of a kernel test class: `INTERPRET = False` compiles for the GPU/TPU (skipped on CPU);
    the `...Interpret` subclass runs the same cases in the Pallas interpreter on any backend, and the
    `...TpuInterpret` one runs the TPU variant (scalar prefetch, clamped index maps, the ragged
    kernel's pool windows, TPU block tables) in the interpreter under `lowering.target("tpu")`."""

    INTERPRET = False
    TARGET: str | None = None

    @pytest.fixture(autouse=True)
    def _backend(self):
        if not self.INTERPRET and jax.default_backend() == "cpu":
            pytest.skip("compiled Pallas kernels need a GPU or TPU")
        with contextlib.ExitStack() as stack:
            if self.TARGET:
                stack.enter_context(lowering.target(self.TARGET))
            yield


def close(out, ref, dtype):
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), **TOL[dtype])


def normal(rng, shape, dtype):
    return jnp.asarray(rng.normal(size=shape), dtype)


def nan_past(x, length, axis=2):
    """x with every slot at or past length[b] along `axis` set to NaN (reads of padding show up)."""
    idx = jnp.arange(x.shape[axis]).reshape((1,) * axis + (-1,) + (1,) * (x.ndim - axis - 1))
    used = idx < length.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(used, x, jnp.nan).astype(x.dtype)
