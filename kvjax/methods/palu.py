"""Palu (Chang et al. 2024, arXiv 2407.21118): low-rank K/V projections found by a whitened SVD on
calibration text, the cache holding the latents, RoPE re-applied after reconstruction (`PaluKV`).

    lm.generate(prompt, method="palu", ratio=0.5)                 # calibrates on built-in text
    lm.generate(prompt, method="palu(group=3, calib=wiki.txt)", ratio=0.75)
    kvjax convert palu --model smollm2-135m --rank 32 --out runs/palu32   # a directory kvjax.load opens

**Bases.** For each layer and group of `group` KV heads, the whitened SVD of W [E, gD] over the
calibration inputs X keeps V_r, the top-r right singular vectors of L^T W (X^T X = L L^T). They are the
top-r eigenvectors of the group's pre-RoPE key second moment sum_t k_t k_t^T = W^T X^T X W, which is how
they are computed here (no E x E Cholesky; `kvjax.states.palu` has the derivation). Values likewise.
Every eigenvector is kept, sorted by eigenvalue, so a rank is chosen at use: `rank_k` / `rank_v`, or
`ratio` = the fraction of K/V bytes removed (r = round((1 - ratio) g D), at least 1).

**Options** (the paper's): `group` = g KV heads per latent (1: M-LRD, per head; K: J-LRD, joint; between:
G-LRD, the paper's default group of 4 heads, which must divide the model's KV heads). Palu's rank search
by Fisher information and its Hadamard-rotated latent quantization are not implemented: ranks are uniform
over layers, and the latents are stored at full precision.

`checkpoint=` a `kvjax convert palu --out` directory (its bases and default rank); `calib=` a text file
(default: kvjax's generated prose, `calib_tokens` tokens in 512-token windows). Every token is kept: the
method removes dimensions, not tokens, and takes no `budget=`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.checkpoints import model_id, run_of, same_model
from kvjax.methods.base import Budget, PrefillMethod, ScoreContext, register
from kvjax.methods.kvsharer import calibration_tokens
from kvjax.models.family import model_for
from kvjax.models.rope import rope_inv_freq
from kvjax.states.cache import KVCache, model_cache
from kvjax.states.palu import palu_cache

WINDOW = 512  # calibration window (tokens)
SETTINGS = "settings.json"
BASES = "bases.npz"


@register("palu")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Palu(PrefillMethod):
    group: int = 1
    rank_k: int | None = None
    rank_v: int | None = None
    checkpoint: str | None = None  # a `kvjax convert palu --out` directory
    calib: str | None = None  # a calibration text file (default: generated prose)
    calib_tokens: int = 4096

    own_budget = True  # every token stays: ratio= is the fraction of K/V bytes removed, not of tokens

    def __post_init__(self):
        for name in ("group", "calib_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"palu: {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("rank_k", "rank_v"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"palu: {name} must be a positive integer, got {value!r}")
        for name in ("checkpoint", "calib"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(Path(getattr(self, name)).expanduser().absolute()))
        if self.calib is not None and not Path(self.calib).is_file():
            raise ValueError(f"palu: calibration file {self.calib} does not exist")

    def score(self, ctx: ScoreContext):
        raise ValueError("Palu evicts no token: it stores low-rank latents of every key and value "
                         "(use it through LM.prefill / LM.generate)")

    def layer_keep(self, budget: Budget, n_tokens: int, layer: int, n_layers: int) -> int:
        return n_tokens

    # ------------------------------------------------------------------------------------- ranks
    def ranks(self, cfg, ratio: float | None) -> tuple[int, int]:
        """(R_k, R_v): given ranks (R_v defaults to a given R_k), else from `ratio`, else the checkpoint's;
        checked against g D."""
        width = self.group * cfg.head_dim
        saved = _settings(self.checkpoint) if self.checkpoint else {}
        if ratio is not None and not 0 <= ratio < 1:
            raise ValueError(f"palu: ratio must be in [0, 1) (fraction of K/V bytes removed), got {ratio!r}")
        from_ratio = None if ratio is None else max(1, round((1 - ratio) * width))
        rk = self.rank_k or from_ratio or saved.get("rank_k")
        rv = self.rank_v or self.rank_k or from_ratio or saved.get("rank_v")
        if rk is None or rv is None:
            raise ValueError("palu needs a rank: give ratio= (fraction of K/V bytes removed), rank_k= / rank_v=, "
                             "or checkpoint= (a `kvjax convert palu` directory)")
        for name, r in (("rank_k", rk), ("rank_v", rv)):
            if r > width:
                raise ValueError(f"palu: {name}={r} exceeds the group's {width} dims ({self.group} KV heads x "
                                 f"head dim {cfg.head_dim})")
        return int(rk), int(rv)

    def check(self, cfg) -> None:
        """One-line errors for a model Palu cannot serve."""
        if getattr(cfg, "kv_layout", "dense") != "dense" or any(getattr(cfg, "windows", None) or ()):
            raise ValueError("palu factorizes the K/V of plain attention layers; this model has latent or "
                             "sliding-window layers")
        if cfg.n_kv_heads % self.group:
            raise ValueError(f"palu: group={self.group} does not divide the model's {cfg.n_kv_heads} KV heads")
        if self.checkpoint is not None and _settings(self.checkpoint).get("group", self.group) != self.group:
            raise ValueError(f"palu: {self.checkpoint} was converted with group={_settings(self.checkpoint)['group']}, "
                             f"not {self.group}")

    # ----------------------------------------------------------------------------- the pipeline
    def prepare(self, cfg, plan, lm=None) -> None:
        """Resolve the bases (load the checkpoint, or calibrate on first use) before anything compiles."""
        self.check(cfg)
        self.ranks(cfg, plan.ratio)
        self.bases(cfg, plan.model_name, lm)

    def build_cache(self, cfg, plan, batch: int, capacity: int, chunk: int) -> KVCache:
        """An empty cache of `PaluKV` layers of `capacity` slots, bases truncated to the ranks."""
        rk, rv = self.ranks(cfg, plan.ratio)
        uk, uv = self.bases(cfg, plan.model_name)
        # copies: the bases become part of a cache, which the jitted steps donate
        return self.cache(cfg, [jnp.array(u[..., :rk]) for u in uk], [jnp.array(u[..., :rv]) for u in uv], batch,
                          capacity)

    def cache(self, cfg, bases_k, bases_v, batch: int, capacity: int) -> KVCache:
        """An empty cache of `PaluKV` layers with the given (truncated) bases: also traced, as a student's
        cache in distillation (`kvjax.train.distill`)."""
        return palu_cache(bases_k, bases_v, [rope_inv_freq(cfg, i) for i in range(cfg.n_layers)], batch, capacity,
                          cfg.jnp_dtype)

    def finish(self, cache: KVCache, capacities: tuple[int, ...]) -> KVCache:
        return cache  # every token stays, as latents

    def bases(self, cfg, model_name: str = "", lm=None):
        """(U_k, U_v): per layer [N, gD, gD] orthonormal columns sorted by eigenvalue (descending)."""
        if self.checkpoint is not None:
            return _load(self.checkpoint, cfg, model_name)
        key = (cfg, model_name, self.group, self.calib, self.calib_tokens)
        if key not in _CALIBRATED and not model_name:  # a caller without the model's name: the eval's byte
            # counts (abstract shapes), which bases of this config and settings give alike
            found = [b for k, b in _CALIBRATED.items() if k[0] == cfg and k[2:] == key[2:]]
            if found:
                return found[0]
        if key not in _CALIBRATED:
            if lm is None:
                raise ValueError("palu: no bases for this model yet: pass checkpoint= (`kvjax convert palu`), or "
                                 "use it through an LM (which calibrates on first use)")
            _CALIBRATED[key] = calibrate(lm, self.group, self.calib, self.calib_tokens)
        return _CALIBRATED[key]


_CALIBRATED: dict = {}  # (cfg, model, group, calib, tokens) -> bases calibrated in this process


# ------------------------------------------------------------------------------------- calibration
def calibration_ids(lm, calib: str | None, tokens: int) -> np.ndarray:
    """int32 [n, W]: `tokens` tokens (rounded up to whole windows of W = WINDOW, or the model's maximum
    positions if fewer) of the file `calib`, or of generated prose, in consecutive windows."""
    window = min(WINDOW, lm.cfg.max_positions)
    n = -(-tokens // window)
    if calib is None:
        return calibration_tokens(lm, n, window)
    ids = lm.encode(Path(calib).read_text(encoding="utf-8"))
    if len(ids) < window:
        raise ValueError(f"palu: {calib} has {len(ids)} tokens, fewer than one {window}-token window")
    n = min(n, len(ids) // window)
    return np.asarray(ids[: n * window], np.int32).reshape(n, window)


@functools.partial(jax.jit, static_argnames=("cfg", "pairs"))
def _window_moments(params, tokens, *, cfg, pairs):
    """Per pair (a, b) of layers, float32 [2KD, 2KD]: sum over the tokens [B, T] of u_a u_b^T, u_i =
    [k_pre; v] of layer i (head-major)."""
    b, t = tokens.shape
    kd = cfg.n_kv_heads * cfg.head_dim
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    _, state = model_for(cfg)(cfg).apply({"params": params}, tokens, positions, model_cache(cfg, b, t),
                                         mutable=["intermediates"])
    u = [state["intermediates"][f"layers_{i}"]["attn"]["qkv"][0][..., -2 * kd:].astype(jnp.float32).reshape(-1, 2 * kd)
         for i in range(cfg.n_layers)]
    return [u[a].T @ u[c] for a, c in pairs]


def kv_moments(lm, ids: np.ndarray, pairs=None) -> list[np.ndarray]:
    """Per layer, float64 [2KD, 2KD]: the second moment of u = [k_pre; v] (pre-RoPE keys then values, KV
    heads head-major) over the windows ids [n, T], one forward per window (Palu's bases, TransMLA); with
    `pairs` ((a, b), ...), the cross moments sum u_a u_b^T of those pairs of layers instead (CLLA's fits)."""
    pairs = tuple((i, i) for i in range(lm.cfg.n_layers)) if pairs is None else tuple(map(tuple, pairs))
    total = None
    for window in ids:
        m = [np.asarray(x, np.float64) for x in jax.device_get(_window_moments(lm.params, jnp.asarray(window[None]),
                                                                                cfg=lm.cfg, pairs=pairs))]
        total = m if total is None else [a + b for a, b in zip(total, m)]
    return total


def calibrate(lm, group: int = 1, calib: str | None = None, tokens: int = 4096):
    """Palu's bases for `lm` (see the module docstring): per layer U_k, U_v [N, gD, gD], float32 numpy, from
    each group's diagonal blocks of the K/V second moment."""
    cfg = lm.cfg
    kd, width = cfg.n_kv_heads * cfg.head_dim, group * cfg.head_dim
    n = cfg.n_kv_heads // group

    def blocks(m):  # [KD, KD] -> each group's [gD, gD] diagonal block, [N, gD, gD]
        return np.stack([m[i * width:(i + 1) * width, i * width:(i + 1) * width] for i in range(n)])

    moments = kv_moments(lm, calibration_ids(lm, calib, tokens))
    return ([top_eigenvectors(blocks(m[:kd, :kd])) for m in moments],
            [top_eigenvectors(blocks(m[kd:, kd:])) for m in moments])


def top_eigenvectors(moment: np.ndarray) -> np.ndarray:
    """[N, n, n] symmetric -> [N, n, n] orthonormal eigenvectors as columns, largest eigenvalue first."""
    w, u = np.linalg.eigh(np.asarray(moment, np.float64))
    return u[..., ::-1].astype(np.float32)


# ------------------------------------------------------------------------------ converted models
def save(out_dir, lm, group: int, rank_k: int, rank_v: int, calib: str | None, tokens: int) -> Path:
    """`kvjax convert palu`: calibrate `lm`'s bases and write them with the settings to `out_dir`."""
    out = Path(out_dir).expanduser()
    uk, uv = calibrate(lm, group, calib, tokens)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / BASES, **{f"k{i}": u for i, u in enumerate(uk)}, **{f"v{i}": u for i, u in enumerate(uv)})
    settings = dict(method="palu", model=lm.name, model_id=model_id(lm.name, lm.cfg), group=group,
                    rank_k=rank_k, rank_v=rank_v, calib=calib or "generated prose", calib_tokens=tokens)
    (out / SETTINGS).write_text(json.dumps(settings, indent=1))
    return out


def converted(path) -> dict | None:
    """The settings of a `kvjax convert palu` directory, or None for anything else."""
    return run_of(path, "palu")


def _settings(checkpoint: str) -> dict:
    settings = converted(checkpoint)
    if settings is None:
        raise ValueError(f"palu: {checkpoint} is not a `kvjax convert palu` directory (no palu {SETTINGS})")
    return settings


@functools.lru_cache(maxsize=4)
def _load(checkpoint: str, cfg, model_name: str):
    settings = _settings(checkpoint)
    if model_name and not same_model(settings["model_id"], model_id(model_name, cfg)):
        raise ValueError(f"palu: {checkpoint} was converted from {settings['model']}, not this model ({model_name})")
    with np.load(Path(checkpoint) / BASES) as z:
        return ([z[f"k{i}"] for i in range(cfg.n_layers)], [z[f"v{i}"] for i in range(cfg.n_layers)])
