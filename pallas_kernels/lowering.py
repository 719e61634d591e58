"""Lower a kernel for a GPU or TPU that is not attached: the Triton or Mosaic program it would run.

    with target("tpu"):                                  # on a CPU-only machine
        exported = lower(decode_attention, q, k, v, length)
    exported.mlir_module()                               # StableHLO around a `tpu_custom_call`

JAX lowers a `pallas_call` for every platform `jax.export` names, whatever devices are attached.
For "cuda" the Pallas Triton lowering emits the kernel in the Triton dialect (a
`__gpu$xla.gpu.triton` custom call); for "tpu" the Mosaic lowering emits the `tpu` dialect (a
`tpu_custom_call`), checking block shapes against the chip's tiling on the way. Both are the steps
where Pallas rejects what a backend cannot express (block shapes, memory spaces, primitives with no
lowering), so tests lower every kernel for both targets on CPU. What remains for real hardware is
the backend compiler (Triton to PTX, Mosaic's layout passes in libtpu) and, of course, timing.

The target is given through the abstract mesh's device (`jax.sharding.AbstractDevice`), which is
part of jit's cache key and is what Pallas's TPU lowering reads to pick the chip's tiling;
`_common.backend` reads it to pick the block-size table.
"""
from __future__ import annotations

import contextlib

import jax
from jax._src.pallas.triton import pallas_call_registration as registration

TARGETS = {"gpu": ("cuda", "NVIDIA H100 80GB HBM3", "__gpu$xla.gpu.triton"),
           "tpu": ("tpu", "TPU v5 lite", "tpu_custom_call")}


@contextlib.contextmanager
def target(platform: str, device_kind: str | None = None):
    """Within this context, kernels called with `interpret=False` lower for `platform` ("gpu" or
    "tpu"; `device_kind` e.g. "TPU v6 lite" picks the TPU generation, default v5e)."""
    if platform not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {platform!r}")
    kind = device_kind or TARGETS[platform][1]
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1, platform=platform)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        yield


def lower(kernel, *args, **static):
    """`jax.export` of the jitted `kernel(*args, **static)` for the current `target` (no compile, no
    device): raises whatever the Pallas lowering rejects. For GPU, each Triton module is also run
    through the MLIR verifier (Triton's own first step), which catches ill-typed IR the lowering lets
    through. `args` may be `jax.ShapeDtypeStruct`s."""
    return _lower(kernel, args, static)[0]


def triton_modules(kernel, *args, **static) -> list[str]:
    """The Triton-dialect modules (TTIR text, one per `pallas_call`) of `kernel(*args, **static)`
    lowered for GPU, as `triton.compile` reads them (`experiments/compile_triton.py`)."""
    with target("gpu"):
        return [m.operation.get_asm(enable_debug_info=False) for m in _lower(kernel, args, static)[1]]


def _lower(kernel, args, static):
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is None:
        raise ValueError("lower() needs a target: wrap it in `with lowering.target('gpu' | 'tpu'):`")
    export_platform, _, custom_call = TARGETS[device.platform]
    fn = kernel if hasattr(kernel, "lower") else jax.jit(kernel)
    export = jax.export.export(fn, platforms=[export_platform],
                               disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(custom_call)])
    if device.platform != "gpu":
        return export(*args, **static), []
    with _captured_triton_modules() as modules:
        exported = export(*args, **static)
        if not modules:  # lowered before in this process (a cached lowering): lower afresh to see them
            jax.clear_caches()
            exported = export(*args, **static)
    for module in modules:
        try:
            module.operation.verify()
        except Exception as e:  # jaxlib's MLIRError
            raise ValueError(f"the Triton module of {getattr(kernel, '__name__', kernel)} fails MLIR "
                             f"verification: {e}") from e
    return exported, modules


@contextlib.contextmanager
def _captured_triton_modules():
    """Collect the Triton modules the Pallas Triton lowering builds (a JAX internal: jax 0.10's
    `pallas_call_registration` calls `lowering.lower_jaxpr_to_triton_module` for each pallas_call)."""
    original = registration.lowering.lower_jaxpr_to_triton_module
    modules = []

    def capture(*a, **k):
        result = original(*a, **k)
        modules.append(result.module)
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield modules
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original
