"""PyramidKV (Cai et al. 2024, arXiv 2406.02069): SnapKV scores with per-layer budgets that shrink
linearly from the first to the last layer.

Budgets follow kvpress 0.5.5 `PyramidKVPress.get_layer_budget` (from KVCache-Factory): with
f = kept fraction, cap = window + T f, min = (cap - window) / beta, max = 2 (cap - window) - min;
if max >= T - window: max = T - window, min = 2 (cap - window) - max; if not
T >= max >= min >= window every layer keeps round(T f); else layer l keeps
round(max - l (max - min) / (L - 1)) (window included). Python's round (half to even), as kvpress.
"""
from __future__ import annotations

import dataclasses

from kvjax.methods.base import Budget, register
from kvjax.methods.snapkv import SnapKV


@register("pyramidkv")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PyramidKV(SnapKV):
    beta: int = 20

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.beta, (int, float)) or self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta!r}")

    def layer_keep(self, budget: Budget, n_tokens: int, layer: int, n_layers: int) -> int:
        t, w = n_tokens, self.window
        kept = t * budget.kept_fraction(t)
        cap = w + kept
        lo = (cap - w) / self.beta
        hi = 2 * (cap - w) - lo
        if hi >= t - w:
            hi = t - w
            lo = 2 * (cap - w) - hi
        if not (t >= hi >= lo >= w) or n_layers == 1:
            return max(1, round(kept))
        return round(hi - layer * (hi - lo) / (n_layers - 1))
