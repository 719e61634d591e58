"""Q-Filters (Godey et al. 2025, arXiv 2503.02812): one direction per layer and KV head along which queries
and keys are anisotropic; a key's projection on it estimates the attention it will get, without any query.

Follows kvpress 0.5.5 `QFilterPress`: score = -(f . k) with f the layer's filter of the key's KV head
[L, K, D] and k the cached (post-RoPE) key. kvpress loads published filters from the Hugging Face hub
(`nthngdy/<model>_qfilt`); kvjax builds them with `kvjax calibrate qfilter --out FILE.npz` and reads
`filters=FILE.npz`. Calibration (the paper's SVD of the queries): per KV head, the first right singular
vector v of the matrix of its group's pre-RoPE queries (calibration windows, from position n_sink on: the
statistics kvjax's prefill gathers, so v is the top eigenvector of sum q q^T) and the filter f = -s v with
s the sign of the mean projection of the queries on v, so that -(f . k) = s (v . k) is large for keys the
average query favours. A file for another model (name or shape) is a one-line error before any compile.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from kvjax.methods.base import EvictionMethod, ScoreContext, register
from kvjax.methods.expected_attention_stats import check_file, query_moments


def filters_from_moments(q_sum: np.ndarray, q_sq: np.ndarray, n_kv: int) -> np.ndarray:
    """float32 [L, K, D] Q-Filters from the query sums q_sum [L, H, D] and q_sq [L, H, D, D]: per KV head,
    the top eigenvector v of its group's sum of q q^T, times -sign(mean q . v)."""
    n_layers, h, d = q_sum.shape
    g = h // n_kv
    gram = q_sq.reshape(n_layers, n_kv, g, d, d).sum(2)  # [L, K, D, D]: Q^T Q of the group's queries
    vecs = np.linalg.eigh(gram)[1][..., -1]  # [L, K, D] the largest eigenvalue's eigenvector
    mean = q_sum.reshape(n_layers, n_kv, g, d).sum(2)  # sum of the group's queries
    sign = np.sign((mean * vecs).sum(-1, keepdims=True))
    return (-np.where(sign == 0, 1.0, sign) * vecs).astype(np.float32)


def calibrate(lm, ids: np.ndarray, n_sink: int = 4) -> dict[str, np.ndarray]:
    m = query_moments(lm, ids, n_sink)
    return dict(q_filters=filters_from_moments(m["q_sum"], m["q_sq"], lm.cfg.n_kv_heads), n_sink=np.int32(n_sink),
                n_tokens=np.int64(m["count"]))


@register("qfilter")
@dataclasses.dataclass(frozen=True, kw_only=True)
class QFilter(EvictionMethod):
    filters: str | None = None  # a `kvjax calibrate qfilter --out` file

    def __post_init__(self):
        if self.filters is not None:
            object.__setattr__(self, "filters", str(Path(self.filters).expanduser().absolute()))

    def bind(self, cfg, ratio=None, budget=None, model_name: str = "") -> "QFilter":
        if self.filters is None:
            raise ValueError("qfilter needs filters=FILE.npz (build it with `kvjax calibrate qfilter --out FILE.npz`)")
        self.load(cfg, model_name)
        return self

    def load(self, cfg, model_name: str = "") -> np.ndarray:
        return check_file(self.filters, cfg, model_name, "qfilter",
                          {"q_filters": (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)})["q_filters"]

    def score(self, ctx: ScoreContext):
        if self.filters is None:
            raise ValueError("qfilter needs filters=FILE.npz")
        f = jnp.asarray(self.load(ctx.cfg)[ctx.layer])  # [K, D]
        return -jnp.einsum("kd,bksd->bks", f, ctx.k.astype(jnp.float32))
