"""MiniCache (Liu et al. 2024, arXiv 2405.14366): from the middle layer on, each pair of adjacent layers holds
one merged cache (`kvjax.states.merged.SlerpKV`).

    lm.generate(prompt, method="minicache")                         # t = 0.6, gamma = 0.05, retention "distinct"
    lm.generate(prompt, method="minicache(retention=threshold)")    # the paper's eq. 5 read literally
    lm.generate(prompt, method="compose(minicache, kivi-4)")        # the paper's 4-bit setting (its 5.02x)

Per prompt token and KV head, the two layers' keys (and values) are split into magnitude and direction; the
directions are merged by SLERP with t = 0.6 (towards the upper layer) and held once, each layer keeps its own
magnitudes (eqs. 2-4), and rebuilds its K/V as magnitude x merged direction. Retained tokens (sec. 4.2) are
held exactly for both layers. The paper's retention rule is ambiguous: eq. 5 retains the tokens of angular
distance below d_min + (d_max - d_min) gamma, i.e. the most *similar*, while the text says distinct tokens are
kept unmerged; both are here (`retention=`), at most ceil(gamma T) per head (static shapes), and
`retained_fraction(cache)` says how many were actually kept.

Tokens after the prompt (decoding, a fed question) stay per layer and dense: the merge runs once, on the
prefilled cache. How the paper stores tokens generated after the prefill could not be confirmed from the text
available here (no official code was released; xKV's reimplementation, `--layer_merge_impl slerp`, merges the
prefilled cache only); keeping them per layer is the conservative choice, and it is what this state holds
and counts.
Composition: a quantizer stores the merged directions (its key and value layouts) and the decode tokens;
magnitudes and retained tokens stay in full precision.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.methods.base import register
from kvjax.methods.layermerge import LayerMerge
from kvjax.states.merged import RETENTION, SlerpKV, merge_pair


@register("minicache")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MiniCache(LayerMerge):
    """Attributes:
      t: SLERP interpolation towards the upper layer of a pair (paper: 0.6).
      gamma: retention threshold (paper: 0.05); also bounds the retained tokens to ceil(gamma T) per head.
      retention: "distinct" (the ceil(gamma n) most distant tokens) or "threshold" (eq. 5: distance below
        d_min + (d_max - d_min) gamma, the nearest first).
      start: first merged layer; None = the middle layer, L // 2 (the paper: from the middle-depth on). Pairs
        (start, start + 1), (start + 2, start + 3), ...; an odd last layer keeps its own K/V.
    """

    t: float = 0.6
    gamma: float = 0.05
    retention: str = "distinct"
    start: int | None = None

    def __post_init__(self):
        if not 0 <= self.t <= 1:
            raise ValueError(f"minicache: t must be in [0, 1], got {self.t!r}")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"minicache: gamma must be in [0, 1], got {self.gamma!r}")
        if self.retention not in RETENTION:
            raise ValueError(f"minicache: retention must be one of {RETENTION}, got {self.retention!r}")

    def groups(self, n_layers: int) -> list[tuple[int, ...]]:
        first = n_layers // 2 if self.start is None else self.start
        if not 0 <= first < n_layers - 1:
            raise ValueError(f"minicache: start={first} leaves no pair of layers to merge (the model has "
                             f"layers 0..{n_layers - 1})")
        return [(i, i + 1) for i in range(first, n_layers - 1, 2)]

    def merge(self, states: list, tail: int) -> SlerpKV:
        return _merge(states[0], states[1], t=self.t, gamma=self.gamma, rule=self.retention, tail=tail)


_merge = jax.jit(merge_pair, static_argnames=("t", "gamma", "rule", "tail"))


def retained_fraction(cache) -> float:
    """Of the prompt tokens in the cache's MiniCache pairs (every row, head and pair), the fraction retained
    unmerged."""
    pairs = [s for s in cache.layers if isinstance(s, SlerpKV)]
    if not pairs:
        raise ValueError("the cache holds no MiniCache pair")
    kept = sum(int(jnp.sum(s.retained())) for s in pairs)
    tokens = sum(int(jnp.sum(s.store.length)) * s.n_kv for s in pairs)
    return kept / max(tokens, 1)


__all__ = ["MiniCache", "retained_fraction"]
