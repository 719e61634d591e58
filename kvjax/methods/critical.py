"""CriticalKV and CriticalAdaKV (Feng et al. 2025, arXiv 2502.03805): a scorer's scores rescaled by how much
each value moves the layer's output, ||v_j W_o||_1, in two stages. Wrappers: `critical:snapkv`,
`criticaladakv:expected_attention(use_vnorm=False)`.

`critical:` follows kvpress 0.5.5 `CriticalKVPress` (epsilon 1e-4, first_stage_ratio 0.5): stage 1 keeps
the scorer's top int(n_keep * first_stage_ratio) tokens per head (at least 1; kvpress writes it
int((1 - ratio) T first_stage_ratio), the same number for 0.5); stage 2 scores
(s_j + epsilon) * mean_{h in group} ||v_j W_o[h]||_1 and the stage-1 tokens get the float32 max. It is
a plain scorer (kvpress: a `ScorerPress`), so `adakv:critical:snapkv` works too.

`criticaladakv:` follows kvpress 0.5.5 `CriticalAdaKVPress` (alpha_safeguard 0.2): Ada-KV's safeguard
(each head's top max(1, int(n_keep alpha)) at the float max) and per-head budgets from one top
K * n_keep over the layer; stage 1 keeps each head's top int(budget_h * first_stage_ratio); stage 2
rescales as above and each head keeps its top budget_h. Stored ragged (`RaggedKV`), as `adakv:`.
kvpress warns that ExpectedAttention should run with use_vnorm=False under both.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.methods.base import (WRAPPERS, Budget, EvictionMethod, ScoreContext, Wrapper, check_wrapped, group_mean)
from kvjax.observe import ObsSpec
from kvjax.states.ragged import ragged_from_selection

FMAX = float(jnp.finfo(jnp.float32).max)


def _rank(scores):
    """[B, K, S] -> int rank of each slot in its head, 0 = best (ties: lower slot first)."""
    return jnp.argsort(jnp.argsort(-scores, axis=-1, stable=True), axis=-1, stable=True)


def _value_norms(ctx: ScoreContext):
    return group_mean(ctx.obs.wov, ctx.k.shape[1])  # [B, K, S] mean over the group of ||v W_o[h]||_1


def _check_params(epsilon, first_stage_ratio):
    if not isinstance(epsilon, (int, float)) or epsilon < 0:
        raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
    if not isinstance(first_stage_ratio, (int, float)) or not 0 <= first_stage_ratio <= 1:
        raise ValueError(f"first_stage_ratio must be in [0, 1], got {first_stage_ratio!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CriticalKV(Wrapper):
    wrapper: ClassVar[str] = "critical"
    press: EvictionMethod
    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def __post_init__(self):
        check_wrapped("critical", self.press)
        _check_params(self.epsilon, self.first_stage_ratio)

    def observations(self) -> ObsSpec:
        return dataclasses.replace(self.press.observations(), wov=True)

    def layer_keep(self, budget: Budget, n_tokens: int, layer: int, n_layers: int) -> int:
        return budget.keep(n_tokens)  # kvpress: ScorerPress.compress, whatever the scorer's own rule

    def decode_rule(self, capacity: int):
        raise ValueError("decode-time eviction (capacity=) is the scorer's: use it without critical:")

    def score(self, ctx: ScoreContext):
        if ctx.n_keep is None:
            raise ValueError("critical: scores depend on the budget; score through kvjax.compress (ctx.n_keep)")
        s = jnp.where(ctx.used, self.press.score(ctx).astype(jnp.float32), -jnp.inf)
        n1 = (ctx.n_keep * self.first_stage_ratio).astype(jnp.int32)
        if self.first_stage_ratio > 0:
            n1 = jnp.maximum(n1, 1)
        first = _rank(s) < n1[:, None, None]
        s2 = (s + self.epsilon) * _value_norms(ctx)
        return jnp.where(ctx.used, jnp.where(first, FMAX, s2), 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CriticalAdaKV(Wrapper):
    wrapper: ClassVar[str] = "criticaladakv"
    press: EvictionMethod
    alpha_safeguard: float = 0.2
    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def __post_init__(self):
        check_wrapped("criticaladakv", self.press)
        _check_params(self.epsilon, self.first_stage_ratio)
        if not isinstance(self.alpha_safeguard, (int, float)) or not 0 <= self.alpha_safeguard <= 1:
            raise ValueError(f"alpha_safeguard must be in [0, 1], got {self.alpha_safeguard!r}")

    def observations(self) -> ObsSpec:
        return dataclasses.replace(self.press.observations(), wov=True)

    def layer_keep(self, budget: Budget, n_tokens: int, layer: int, n_layers: int) -> int:
        return budget.keep(n_tokens)

    def decode_rule(self, capacity: int):
        raise ValueError("decode-time eviction (capacity=) keeps one budget for every head: use the scorer alone")

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        if capacity > state.capacity:  # room asked beyond the prefill's slots: empty slots score -inf
            scores = jnp.pad(scores, [(0, 0), (0, 0), (0, capacity - state.capacity)])
            state = state.with_capacity(capacity)
            ctx = dataclasses.replace(ctx, obs=dataclasses.replace(ctx.obs, wov=jnp.pad(
                ctx.obs.wov, [(0, 0), (0, 0), (0, capacity - ctx.obs.wov.shape[2])])))
        b, n_kv, s = scores.shape
        used = jnp.arange(s)[None, None, :] < state.length[:, None, None]
        scores = jnp.where(used, scores.astype(jnp.float32), -jnp.inf)
        n_safe = (n_keep * self.alpha_safeguard).astype(jnp.int32)
        if self.alpha_safeguard > 0:
            n_safe = jnp.maximum(n_safe, 1)
        scores = jnp.where(_rank(scores) < n_safe[:, None, None], FMAX, scores)
        # per-head budgets: one top K * n_keep over the layer
        flat = scores.reshape(b, n_kv * s)
        grank = jnp.argsort(jnp.argsort(-flat, axis=-1, stable=True), axis=-1, stable=True)
        in_budget = (grank < (n_kv * n_keep)[:, None]).reshape(b, n_kv, s)
        budget = in_budget.sum(-1)  # [B, K]
        n1 = (budget * self.first_stage_ratio).astype(jnp.int32)
        scores = jnp.where(_rank(scores) < n1[..., None], FMAX, scores)
        s2 = (scores + self.epsilon) * _value_norms(ctx)[..., :s]
        keep = (_rank(jnp.where(used, s2, -jnp.inf)) < budget[..., None]) & used
        return ragged_from_selection(state.k, state.v, state.pos, keep, n_kv * capacity)


WRAPPERS["critical"] = CriticalKV
WRAPPERS["criticaladakv"] = CriticalAdaKV
