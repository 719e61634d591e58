"""Per-layer compression ratios around any plain scorer: `per_layer(ratios=(0.2, 0.5, ...)):snapkv`.

Follows kvpress 0.5.5 `PerLayerCompressionPress`: layer l keeps max(1, int(T (1 - ratios[l]))) tokens by
the scorer's scores; its `compression_ratio` is the mean of the ratios, so the `ratio=` given with it
must be that mean (a token `budget=` is refused: the ratios are the budget). The number of ratios must
equal the model's layers (checked before anything compiles).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from kvjax.methods.base import WRAPPERS, Budget, EvictionMethod, Wrapper, check_wrapped


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerLayer(Wrapper):
    wrapper: ClassVar[str] = "per_layer"
    press: EvictionMethod
    ratios: tuple = ()

    def __post_init__(self):
        check_wrapped("per_layer", self.press)
        ratios = self.ratios
        if isinstance(ratios, (int, float)) or not isinstance(ratios, (tuple, list)) or not ratios:
            raise ValueError(f"per_layer: ratios is a tuple of one compression ratio per layer, got {ratios!r}")
        for r in ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
                raise ValueError(f"per_layer: every ratio must be in [0, 1), got {r!r}")
        object.__setattr__(self, "ratios", tuple(float(r) for r in ratios))

    @property
    def mean_ratio(self) -> float:
        return sum(self.ratios) / len(self.ratios)

    def layer_keep(self, budget: Budget, n_tokens: int, layer: int, n_layers: int) -> int:
        if len(self.ratios) != n_layers:
            raise ValueError(f"per_layer: {len(self.ratios)} ratios for a model of {n_layers} layers")
        if budget.ratio is None:
            raise ValueError("per_layer: its ratios are the budget; give ratio= (their mean), not budget=")
        if abs(budget.ratio - self.mean_ratio) > 1e-6:
            raise ValueError(f"per_layer: the ratios average {self.mean_ratio:.6g}; give ratio={self.mean_ratio:.6g} "
                             f"(got {budget.ratio})")
        return Budget(ratio=self.ratios[layer]).keep(n_tokens)

    def decode_rule(self, capacity: int):
        raise ValueError("decode-time eviction (capacity=) keeps one capacity for every layer: use the scorer alone")


WRAPPERS["per_layer"] = PerLayer
