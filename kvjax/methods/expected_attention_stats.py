"""ExpectedAttention with calibrated query statistics (Devoto et al. 2025, kvpress): the Gaussian model of
future queries comes from a calibration corpus instead of the prompt itself.

Follows kvpress 0.5.5 `ExpectedAttentionStatsPress` (n_future 512, n_sink 4, covariance, ‖v‖; stats of
100 samples of 1000 tokens): the mean and the unbiased covariance (N - 1) of the pre-RoPE queries of every
calibration window from position n_sink on, pooled over windows, per layer and query head; at scoring
time the same averaged RoPE rotation and scores as `expected_attention`. kvpress downloads its statistics
from the Hugging Face hub (booksum); kvjax builds them with `kvjax calibrate expected_attention_stats
--out FILE.npz` (from a text file or generated prose) and reads `stats=FILE.npz`. A file made for another
model (name or shape) is a one-line error before anything compiles.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from kvjax import generation
from kvjax.methods.base import ScoreContext, register
from kvjax.methods.expected_attention import ExpectedAttention
from kvjax.observe import ObsSpec
from kvjax.shapes import bucket
from kvjax.states.cache import model_cache


def query_moments(lm, ids: np.ndarray, n_sink: int, batch: int = 4) -> dict[str, np.ndarray]:
    """Sums over calibration windows ids int [n, W] of the pre-RoPE queries from position n_sink on, per
    layer and query head (the prefill's own query statistics): q_sum [L, H, D], q_sq [L, H, D, D], count."""
    cfg = lm.cfg
    q_sum = np.zeros((cfg.n_layers, cfg.n_heads, cfg.head_dim), np.float64)
    q_sq = np.zeros((cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.head_dim), np.float64)
    count = 0.0
    w = ids.shape[1]
    for i in range(0, len(ids), batch):
        rows = np.asarray(ids[i:i + batch], np.int32)
        tokens = np.pad(rows, [(0, 0), (0, bucket(w) - w)])
        lengths = np.full(len(rows), w, np.int32)
        _, _, obs = generation.prefill(lm.params, cfg, tokens, lengths, model_cache(cfg, len(rows), bucket(w)),
                                       observe=ObsSpec(qstats_from=n_sink))
        q_sum += np.stack([np.asarray(o.q_sum, np.float64).sum(0) for o in obs])
        q_sq += np.stack([np.asarray(o.q_sq, np.float64).sum(0) for o in obs])
        count += float(np.asarray(obs[0].q_cnt).sum())
    return dict(q_sum=q_sum, q_sq=q_sq, count=np.float64(count))


def calibrate(lm, ids: np.ndarray, n_sink: int = 4) -> dict[str, np.ndarray]:
    """kvpress's `collect_queries` statistics: query_mean [L, H, D] and query_cov [L, H, D, D] (unbiased)."""
    m = query_moments(lm, ids, n_sink)
    n = m["count"]
    mean = m["q_sum"] / n
    cov = (m["q_sq"] - n * mean[..., :, None] * mean[..., None, :]) / (n - 1)
    return dict(query_mean=mean.astype(np.float32), query_cov=cov.astype(np.float32), n_sink=np.int32(n_sink),
                n_tokens=np.int64(n))


def check_file(path: str, cfg, model_name: str, what: str, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The arrays of a calibration file `path` (npz with `model`), checked against the model: one-line
    ValueError if it is missing, or made for another model (name, when both are known, or shapes)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: no file {path} (build it with `kvjax calibrate {what} --out {path}`)")
    data = load_npz(str(p))
    made_for = str(data.get("model", ""))
    if model_name and made_for and made_for != model_name:
        raise ValueError(f"{what}: {path} was calibrated on {made_for}, not {model_name}")
    for key, shape in shapes.items():
        got = data[key].shape if key in data else None
        if got != shape:
            raise ValueError(f"{what}: {path} holds {key} of shape {got}, this model needs {shape} "
                             f"(a file for another model{f', {made_for}' if made_for else ''})")
    return data


@functools.lru_cache(maxsize=8)
def load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@register("expected_attention_stats")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpectedAttentionStats(ExpectedAttention):
    stats: str | None = None  # a `kvjax calibrate expected_attention_stats --out` file

    def __post_init__(self):
        super().__post_init__()
        if self.stats is not None:
            object.__setattr__(self, "stats", str(Path(self.stats).expanduser().absolute()))

    def bind(self, cfg, ratio=None, budget=None, model_name: str = "") -> "ExpectedAttentionStats":
        if self.stats is None:
            raise ValueError("expected_attention_stats needs stats=FILE.npz (build it with `kvjax calibrate "
                             "expected_attention_stats --out FILE.npz`)")
        self.moments(cfg, model_name)
        return self

    def moments(self, cfg, model_name: str = "") -> dict[str, np.ndarray]:
        h, d = cfg.n_heads, cfg.head_dim
        return check_file(self.stats, cfg, model_name, "expected_attention_stats",
                          {"query_mean": (cfg.n_layers, h, d), "query_cov": (cfg.n_layers, h, d, d)})

    def observations(self) -> ObsSpec:
        return ObsSpec()

    def score(self, ctx: ScoreContext):
        if self.stats is None:
            raise ValueError("expected_attention_stats needs stats=FILE.npz")
        m = self.moments(ctx.cfg)
        b = ctx.k.shape[0]
        mu = jnp.broadcast_to(jnp.asarray(m["query_mean"][ctx.layer]), (b,) + m["query_mean"].shape[1:])
        cov = jnp.broadcast_to(jnp.asarray(m["query_cov"][ctx.layer]), (b,) + m["query_cov"].shape[1:])
        return self.expected_scores(ctx, mu, cov)


def save(path, data: dict[str, np.ndarray], model_name: str) -> Path:
    """Write a calibration file (npz) that records the model it was made on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # np.savez would append .npz to a name without it
        np.savez(f, model=np.str_(model_name), **data)
    return path
