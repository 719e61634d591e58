"""Trained artifacts at inference: what a learned method needs to read a `kvjax train` run directory.

    params, const, meta = load_trained("runs/locret", "locret", model_id("smollm2-135m", lm.cfg))
    uk, uv = matryoshka_bases(params, const)          # MatryoshkaKV: U = U_0 · Cayley(A), [L, K, D, D]

Core (`kvjax.methods`) loads trained heads and projections from here; the training package
(`kvjax.train`) writes the checkpoints and imports the shared pieces (model ids, the meta check,
the Cayley parametrization) from here, never the other way round.

* A run directory holds `checkpoints/` (an orbax `CheckpointManager`), each step a composite of the
  training state (`params`, `const`, ...) and a JSON `meta` naming the method and the model.
* `model_id(name, cfg)` is `name (hash of the config)`; checkpoints match a model by the hash (the
  name may spell the same model differently). A checkpoint of another method or model is a
  `CheckpointMismatch` (a ValueError naming both); an unreadable one is skipped with a warning and
  the next older one tried.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
    """A checkpoint written by another method or for another model."""


def run_of(path, method: str) -> dict | None:
    """The `settings.json` of a directory that `method` wrote (a `kvjax train` run, a `kvjax convert`
    output), or None for anything else (no such file, unreadable JSON, another method)."""
    settings = Path(str(path)).expanduser() / "settings.json"
    if not str(path) or not settings.is_file():
        return None
    try:
        run = json.loads(settings.read_text())
    except ValueError:
        return None
    return run if isinstance(run, dict) and run.get("method") == method else None


def model_id(name: str, cfg) -> str:
    """`name (hash of the config)`: what a checkpoint records as its model."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=list).encode()).hexdigest()
    return f"{name} ({digest[:12]})"


def same_model(saved: str | None, wanted: str | None) -> bool:
    """Model ids match by their config hash (the name part may spell the same model differently)."""
    tail = lambda s: (s or "").rsplit(" (", 1)[-1]  # noqa: E731
    return tail(saved) == tail(wanted)


def check_meta(saved: dict, meta: dict) -> None:
    """Raise `CheckpointMismatch` if a checkpoint's meta names another method or model than `meta`."""
    if saved.get("method") != meta.get("method"):
        raise CheckpointMismatch(f"checkpoint mismatch: the checkpoint was written for method "
                                 f"{saved.get('method')!r}, this run uses {meta.get('method')!r}")
    if not same_model(saved.get("model"), meta.get("model")):
        raise CheckpointMismatch(f"checkpoint mismatch: the checkpoint was written for model "
                                 f"{saved.get('model')!r}, this run uses {meta.get('model')!r}")


@contextlib.contextmanager
def quiet_absl():
    """absl (orbax's logger) at ERROR within the block: orbax warns for every read-only manager."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_trained(run_dir, method: str, model: str) -> tuple[dict, dict, dict]:
    """(params, const, meta) of the newest readable checkpoint of a `kvjax train` run directory, for
    inference. `model` is the loading model's `model_id`. Unreadable checkpoints are skipped with a
    warning; a run of another method or model, or a directory with no checkpoint, is a ValueError.
    `meta` is the checkpoint's JSON meta plus its `step`."""
    root = Path(run_dir).expanduser().absolute()
    ckpt_dir = root / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ValueError(f"{run_dir}: no checkpoints/ directory (expected the --out directory of `kvjax train`)")
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    with quiet_absl():
        mngr = ocp.CheckpointManager(ckpt_dir, options=options)
    try:
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                check_meta(meta, {"method": method, "model": model})
                state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 -- any failure to read means a damaged checkpoint
                warnings.warn(f"checkpoint at step {step} is unreadable ({type(e).__name__}: {e}); trying an older one")
                continue
            to_jax = functools.partial(jax.tree_util.tree_map, jnp.asarray)
            return to_jax(state["params"]), to_jax(state["const"]), dict(meta, step=step)
    finally:
        mngr.close()
    raise ValueError(f"{run_dir}: no readable checkpoint")


# --------------------------------------------------------------------------------- MatryoshkaKV
def cayley(w: jax.Array) -> jax.Array:
    """Orthogonal (I - A)(I + A)^-1 for w [..., D, D], A = triu(w, 1) - triu(w, 1)^T skew-symmetric (I + A is
    invertible for skew A). Only w's strict upper triangle is used, so the other entries get exactly zero
    gradient (no Adam updates driven by rounding noise)."""
    upper = jnp.triu(w, 1)
    a = upper - jnp.swapaxes(upper, -1, -2)
    eye = jnp.eye(w.shape[-1], dtype=w.dtype)
    # (I + A)^-1 and (I - A) commute, so the product is the solution X of (I + A) X = I - A
    return _solve_positive_real(eye + a, jnp.broadcast_to(eye - a, a.shape))


def _solve_positive_real(m: jax.Array, b: jax.Array) -> jax.Array:
    """X with m X = b, for m [..., D, D] whose symmetric part is positive definite (here I + skew:
    x^T m x = |x|^2), by Gauss-Jordan elimination without pivoting, which such matrices never need.

    Plain XLA ops instead of `jnp.linalg.solve`: on the 2-core CPU the LAPACK custom call inside the
    SmolLM2 train step intermittently deadlocked XLA's CPU runtime (the step never finished, ~0% CPU)."""
    def eliminate(i, mb):
        m, b = mb
        pivot = m[..., i, i][..., None]
        row_m, row_b = m[..., i, :] / pivot, b[..., i, :] / pivot
        factor = m[..., :, i].at[..., i].set(0)[..., None]  # [..., D, 1]: multiples of row i to remove
        m = (m - factor * row_m[..., None, :]).at[..., i, :].set(row_m)
        b = (b - factor * row_b[..., None, :]).at[..., i, :].set(row_b)
        return m, b

    return jax.lax.fori_loop(0, m.shape[-1], eliminate, (m, b))[1]


def matryoshka_bases(params: dict, const: dict) -> tuple[jax.Array, jax.Array]:
    """MatryoshkaKV's bases U_k, U_v [L, K, D, D] (orthogonal; truncate columns for a rank) from its
    trained params {a_k, a_v} and fixed PCA bases const {u0_k, u0_v}: U = U_0 · Cayley(A)."""
    return const["u0_k"] @ cayley(params["a_k"]), const["u0_v"] @ cayley(params["a_v"])
