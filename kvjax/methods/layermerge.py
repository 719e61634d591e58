"""Base of the methods that merge groups of layers' prompt caches into one state each (MiniCache, xKV):
`kvjax.states.merged`. The prompt is prefilled on the model's dense cache (every layer attends to the
whole prompt, as kvpress runs every method); then each group's caches become one `MemberKV` state that all
its layers read (`KVCache.share`), counted once. Every token is kept: the methods take no ratio or budget.

Legend: L layers, T prompt tokens (the longest row), G layers per group.
"""
from __future__ import annotations

import abc
import dataclasses

import jax
import numpy as np

from kvjax.methods.base import PrefillMethod
from kvjax.states.cache import KVCache, model_cache, route_share

REMAINDERS = ("own", "short")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerMerge(PrefillMethod):
    """A prefill method whose `finish` merges `groups(n_layers)` (tuples of adjacent layers; the others keep
    their own dense K/V) with `merge(states, tail)`. `own_budget`: it keeps every token (`pipeline.plan` takes
    no ratio= / budget= for it)."""

    own_budget = True

    @property
    def keeps_every_token(self) -> bool:
        return True

    @abc.abstractmethod
    def groups(self, n_layers: int) -> list[tuple[int, ...]]:
        """The groups of layers that share a state (each a tuple of adjacent layers), checked."""

    @abc.abstractmethod
    def merge(self, states: list, tail: int):
        """One state for a group's prompt caches (`DenseKV`s of T slots), with `tail` slots per member."""

    def bind(self, cfg, ratio=None, budget=None, model_name: str = "") -> "LayerMerge":
        """Checks before any compile: a model whose layers all hold dense K/V, groups that fit it; no ratio=."""
        if ratio is not None or budget is not None:
            raise ValueError(f"{self.name} keeps every token (it merges layers): ratio= / budget= do not apply")
        if getattr(cfg, "kv_layout", "dense") != "dense" or any(getattr(cfg, "windows", None) or ()):
            raise ValueError(f"{self.name} merges dense K/V of several layers; this model's cache is not dense in "
                             "every layer (latents or sliding windows)")
        self.groups(cfg.n_layers)
        return self

    def share(self, n_layers: int) -> tuple[int, ...]:
        """`KVCache.share` of the merged cache: each group's layers read one state."""
        route = list(range(n_layers))
        for g in self.groups(n_layers):
            route[g[0]:g[-1] + 1] = [g[0]] * len(g)
        return route_share(route)

    def build_cache(self, cfg, plan, batch: int, capacity: int, chunk: int) -> KVCache:
        return model_cache(cfg, batch, capacity)  # the prompt is prefilled dense, then merged (`finish`)

    def finish(self, cache: KVCache, capacities: tuple[int, ...]) -> KVCache:
        """The merged cache: the prompt (T = the longest row, read on the host; under `jax.eval_shape`, the
        plan's capacities, which are then T exactly) in each group's state, `capacities[l] - T` decode slots
        per member and per unmerged layer."""
        try:
            t = max(int(np.max(np.asarray(cache.layers[0].length))), 1)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            t = capacities[0]  # abstract shapes (`pipeline.abstract`): no room was asked, so capacities are T
        n_layers = len(cache.layers)
        layers, done = [], set()
        for g in self.groups(n_layers):
            layers.append((g[0], self.merge([cache.layers[i].shrunk(t) for i in g], capacities[g[0]] - t)))
            done.update(g)
        for i in range(n_layers):
            if i not in done:
                state = cache.layers[i]
                layers.append((i, state.shrunk(capacities[i]) if state.capacity > capacities[i]
                               else state.with_capacity(capacities[i])))
        layers = tuple(s for _, s in sorted(layers, key=lambda x: x[0]))
        return dataclasses.replace(cache, layers=layers, share=self.share(n_layers))


def adjacent_groups(name: str, first: int, end: int, group: int, remainder: str | None) -> list[tuple[int, ...]]:
    """Groups of `group` adjacent layers in [first, end); when `group` does not divide them: None -> a one-line
    ValueError, "own" -> the lowest leftover layers keep their own K/V, "short" -> they form a smaller group."""
    left = (end - first) % group
    if left and remainder is None:
        raise ValueError(f"{name}: group={group} does not divide the {end - first} layers {first}..{end - 1}; give "
                         "remainder=own (the lowest leftover layers keep their own K/V) or remainder=short (they "
                         "form a smaller group)")
    starts = list(range(first + left, end, group))
    if left and remainder == "short":
        starts.insert(0, first)
    return [tuple(range(a, b)) for a, b in zip(starts, starts[1:] + [end]) if b - a > 1]


def check_remainder(name: str, remainder) -> None:
    if remainder is not None and remainder not in REMAINDERS:
        raise ValueError(f"{name}: remainder must be one of {REMAINDERS} (or None: an error), got {remainder!r}")


__all__ = ["LayerMerge", "adjacent_groups", "check_remainder"]
