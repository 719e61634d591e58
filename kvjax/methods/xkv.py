"""xKV (Chang et al. 2025, arXiv 2503.18893): groups of G adjacent layers share one low-rank factorization of
their prompt K/V (`kvjax.states.merged.SharedBasisKV`).

    lm.generate(prompt, method="xkv")                                  # G = 4, the paper's ranks per width
    lm.generate(prompt, method="xkv(group=4, rank_k=48, rank_v=96)")
    lm.generate(prompt, method="compose(xkv, kivi-4)")

Per row, the pre-RoPE keys of a group's layers (every KV head of every layer side by side per token:
[T, G K D]) get one truncated SVD, X ~ U_r (S_r V_r^T) (sec. 3): the r coefficients per token are held once
for the group, each layer its slice of S_r V_r^T (the singular values go with the bases, so a quantizer of
the coefficients sees one scale); RoPE is re-applied to each layer's rebuilt keys at the tokens'
positions. Values the same, without RoPE. Tokens after the prompt stay per layer and dense (xKV compresses
the prefilled cache; its released code keeps decode tokens uncompressed).

Defaults are the paper's xKV-4 setting (Llama-3.1-8B, K D = 1024: G = 4, rank_k = 512, rank_v = 768 of a
4096-wide group), scaled to the model: rank_k = G K D / 8, rank_v = 3 G K D / 16, each rounded up to a
multiple of 32 (so 4-bit quantizers' groups divide them). All layers are grouped from layer 0; when G does not
divide the layers, `remainder` says what the leftover layers do ("own", the default: the lowest ones keep
their own K/V; "short": they form a smaller group; None: a one-line error). The released code stores the
reconstruction dense ("fake" compression); here the coefficients and bases are what the cache holds.
"""
from __future__ import annotations

import dataclasses
import math

import jax

from kvjax.methods.layermerge import LayerMerge, adjacent_groups, check_remainder
from kvjax.models.rope import rope_inv_freq
from kvjax.methods.base import check_positive, register
from kvjax.states.merged import factor_group


@register("xkv")
@dataclasses.dataclass(frozen=True, kw_only=True)
class XKV(LayerMerge):
    """Attributes:
      group: layers per group (G).
      rank_k, rank_v: ranks of the group's key / value factorization (None: the paper's ratio, see above).
      remainder: "own" | "short" | None (an error) when `group` does not divide the layers.
      rope: set by `bind` from the model: the RoPE inverse frequencies keys are rotated back and forth by.
    """

    group: int = 4
    rank_k: int | None = None
    rank_v: int | None = None
    remainder: str | None = "own"
    rope: tuple = dataclasses.field(default=(), init=False)  # set by `bind`: not a parameter

    def __post_init__(self):
        check_positive(group=self.group)
        for name in ("rank_k", "rank_v"):
            if getattr(self, name) is not None:
                check_positive(**{name: getattr(self, name)})
        check_remainder("xkv", self.remainder)
        if self.group < 2:
            raise ValueError(f"xkv: group must be at least 2 layers, got {self.group}")

    def groups(self, n_layers: int) -> list[tuple[int, ...]]:
        if self.group > n_layers:
            raise ValueError(f"xkv: group={self.group} is more than the model's {n_layers} layers")
        return adjacent_groups("xkv", 0, n_layers, self.group, self.remainder)

    def ranks(self, n_kv: int, head_dim: int, members: int) -> tuple[int, int]:
        width = members * n_kv * head_dim
        up = lambda x: min(width, 32 * math.ceil(x / 32))  # noqa: E731
        return (self.rank_k or up(width / 8)), (self.rank_v or up(3 * width / 16))

    def bind(self, cfg, ratio=None, budget=None, model_name: str = "") -> "XKV":
        super().bind(cfg, ratio, budget, model_name)
        inv = rope_inv_freq(cfg, 0)
        if any(not (rope_inv_freq(cfg, i) == inv).all() for i in range(cfg.n_layers)):
            raise ValueError("xkv re-applies one RoPE to rebuilt keys; this model's layers use different RoPEs")
        bound = dataclasses.replace(self)
        object.__setattr__(bound, "rope", tuple(float(f) for f in inv))
        return bound

    def merge(self, states: list, tail: int):
        if not self.rope:
            raise ValueError("xkv is bound to a model before use (pipeline.plan calls bind)")
        first = states[0]
        rk, rv = self.ranks(first.k.shape[1], first.k.shape[3], len(states))
        return _factor(tuple(states), inv_freq=self.rope, rank_k=rk, rank_v=rv, tail=tail)


_factor = jax.jit(factor_group, static_argnames=("inv_freq", "rank_k", "rank_v", "tail"))

__all__ = ["XKV"]
