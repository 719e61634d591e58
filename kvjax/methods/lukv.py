"""LU-KV budget curves around any plain scorer: `lukv(curve=F.npy):expected_attention(epsilon=0.02)`. Each
layer and KV head keeps its own share of the prompt, read off a precomputed budget curve, and the scorer's
top tokens within it; the heads' counts differ, so the layer is stored ragged (`RaggedKV`, as Ada-KV).

"Predicting Future Utility: Global Combinatorial Optimization for Task-Agnostic KV Cache Eviction"
(arXiv 2602.08585), as kvpress 0.5.5 `LUKVPress` implements it (sink 4, window 1; kvpress's default scorer
is ExpectedAttentionPress(epsilon=2e-2)): the curve [99, L, K] holds prune ratios, row round(100 ratio) - 1
for the request's ratio; head h of layer l keeps floor((1 - p_lh) T) tokens, the heads with the largest
fractional parts one more until the layer keeps round(sum (1 - p_lh) T) (at least 1 per head); the first
`sink` and last `window` slots score max + 1. kvpress downloads its one curve (Llama-3.1-8B) from
LU-KV's repository; kvjax reads `curve=` (a .npy file made with LU-KV's `generate_curve.sh`, or any
[99, L, K] array of prune ratios). A curve of another shape is a one-line error before compiling.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from kvjax.methods.adakv import in_capacity
from kvjax.methods.base import WRAPPERS, Budget, EvictionMethod, ScoreContext, Wrapper, check_wrapped, protect
from kvjax.states.ragged import ragged_from_selection


@functools.lru_cache(maxsize=8)
def load_curve(path: str) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def head_keeps(prune: np.ndarray, t: int) -> np.ndarray:
    """int [K] tokens each KV head keeps of t, from its prune ratios [K] (kvpress `LUKVPress.compress`,
    in float32 as kvpress computes it)."""
    k = prune.shape[0]
    ideal = np.clip(1.0 - prune.astype(np.float32), 0.0, 1.0) * np.float32(t)
    total = int(np.round(ideal.sum(dtype=np.float32)))
    total = max(k, min(k * t, total))
    base = np.floor(ideal).astype(np.int64)
    extra = total - int(base.sum())
    if extra > 0:
        base[np.argsort(-(ideal - base), kind="stable")[:min(extra, k)]] += 1
    return np.clip(base, 1, t)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LUKV(Wrapper):
    wrapper: ClassVar[str] = "lukv"
    press: EvictionMethod
    curve: str | None = None
    sink: int = 4
    window: int = 1
    ratio: float | None = None  # the request's ratio, set by `bind` (it picks the curve's row)

    def __post_init__(self):
        check_wrapped("lukv", self.press)
        for name in ("sink", "window"):
            x = getattr(self, name)
            if not isinstance(x, int) or isinstance(x, bool) or x < 0:
                raise ValueError(f"lukv: {name} must be an integer >= 0, got {x!r}")
        if self.curve is not None:
            object.__setattr__(self, "curve", str(Path(self.curve).expanduser().absolute()))

    def bind(self, cfg, ratio=None, budget=None, model_name: str = "") -> "LUKV":
        if self.curve is None:
            raise ValueError("lukv needs curve=FILE.npy: prune ratios [99, layers, KV heads] (LU-KV's "
                             "generate_curve.sh)")
        if not Path(self.curve).is_file():
            raise ValueError(f"lukv: no curve file {self.curve}")
        shape = load_curve(self.curve).shape
        if shape != (99, cfg.n_layers, cfg.n_kv_heads):
            raise ValueError(f"lukv: the curve {self.curve} has shape {shape}; this model needs "
                             f"(99, {cfg.n_layers}, {cfg.n_kv_heads}) (a curve for another model)")
        if ratio is None:
            raise ValueError("lukv reads its curve at the request's ratio: give ratio=, not budget=")
        return dataclasses.replace(self, ratio=float(ratio))

    def keeps(self, layer: int, t: int) -> np.ndarray:
        """int [K]: tokens each KV head of `layer` keeps of a t-token prompt (t when the ratio is 0)."""
        if not self.ratio or self.ratio <= 0:
            return np.full(load_curve(self.curve).shape[2], t)
        row = max(0, min(98, int(round(self.ratio * 100)) - 1))
        return head_keeps(load_curve(self.curve)[row, layer], t)

    def layer_keep(self, budget: Budget, n_tokens: int, layer: int, n_layers: int) -> int:
        if budget.ratio != self.ratio:
            raise ValueError(f"lukv was bound to ratio {self.ratio}, asked for {budget}: plan it through kvjax "
                             "(LM.prefill / generate) with ratio=")
        keeps = self.keeps(layer, n_tokens)
        return int(-(-keeps.sum() // len(keeps)))  # slots per head of the ragged pool: K of them hold them all

    def decode_rule(self, capacity: int):
        raise ValueError("lukv keeps per-head budgets: capacity= (one budget for every head) does not apply")

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        slot = jnp.arange(scores.shape[2])[None, None, :]
        t = ctx.length[:, None, None]
        edge = (slot < t) & ((slot < self.sink) | (slot >= t - self.window))  # sinks and window: max + 1
        scores = protect(jnp.where(slot < t, scores, -jnp.inf), edge)
        state, scores = in_capacity(state, scores, capacity)
        # per-head counts for each row's length (host tables: rows of a batch may differ in length)
        s = scores.shape[2]
        slot = jnp.arange(s)[None, None, :]
        table = jnp.asarray(np.stack([self.keeps(ctx.layer, n) for n in range(s + 1)]))  # [S + 1, K]
        keep_h = table[jnp.minimum(ctx.length, s)]  # [B, K]
        rank = jnp.argsort(jnp.argsort(-scores, axis=-1, stable=True), axis=-1, stable=True)
        keep = (rank < keep_h[:, :, None]) & (slot < t)
        return ragged_from_selection(state.k, state.v, state.pos, keep, state.k.shape[1] * capacity)


WRAPPERS["lukv"] = LUKV
