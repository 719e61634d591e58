"""The eviction-method protocol, budgets, and the registry.

An eviction method is a frozen dataclass whose fields are its hyper-parameters. It supplies
`score(ctx) -> float32 [B, K, S]` (higher = keep) over the slots of a freshly prefilled dense layer
state; the framework (`kvjax.compress`) takes the per-row top `n_keep` and gathers keys, values and
positions into a smaller state. A method also says which prefill observations it needs
(`observations`), how many tokens it always protects (`protected`: window, sinks), and may override
the per-layer budget rule (`layer_keep`, e.g. PyramidKV) or the selection itself (`select`, e.g.
Ada-KV's ragged per-head budgets).

Legend: B batch, K KV heads, G query heads per KV head, H = K*G, S slots, D head dim, W window.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.models.config import LlamaConfig
from kvjax.observe import LayerObs, ObsSpec

_REGISTRY: dict[str, type] = {}


def register(*names: str):
    """Class decorator: make a method available by `names` (the first is its canonical name)."""

    def deco(cls):
        cls.name = names[0]
        for n in names:
            if n in _REGISTRY:
                raise ValueError(f"method name {n!r} registered twice")
            _REGISTRY[n] = cls
        return cls

    return deco


def registry() -> dict[str, type]:
    """Canonical name -> method class, for every registered method."""
    return {cls.name: cls for cls in _REGISTRY.values()}


def lookup(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(registry()))}")
    return _REGISTRY[name]


@dataclasses.dataclass(frozen=True)
class ScoreContext:
    """What a scorer sees for one layer (inside jit).

    Attributes:
      k, v: [B, K, S, D] the layer's post-RoPE keys and values (slots in position order).
      pos: int32 [B, K, S] original positions.  length: int32 [B] slots in use.
      n_tokens: int32 [B] prompt tokens seen (= length for an uncompressed prefill).
      obs: the layer's `LayerObs`.  layer, n_layers: which layer of how many.
      cfg: model config (RoPE, heads).  attention_impl: "xla" | "pallas" | "auto", for scorers that
        attend (window attention).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    n_tokens: jax.Array
    obs: LayerObs
    layer: int
    n_layers: int
    cfg: LlamaConfig
    attention_impl: str = "xla"

    @property
    def used(self) -> jax.Array:  # bool [B, 1, S] slots holding a token
        return (jnp.arange(self.k.shape[2])[None, :] < self.length[:, None])[:, None, :]


@dataclasses.dataclass(frozen=True)
class Budget:
    """How many tokens each layer (and KV head) keeps: `ratio` removed (kvpress) or `tokens` kept."""

    ratio: float | None = None
    tokens: int | None = None

    def __post_init__(self):
        if (self.ratio is None) == (self.tokens is None):
            raise ValueError("give exactly one of ratio= (fraction removed) or budget= (tokens kept)")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float, np.floating)) and 0 <= self.ratio < 1):
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio!r}")
        if self.tokens is not None and (not isinstance(self.tokens, int) or isinstance(self.tokens, bool)
                                        or self.tokens < 1):
            raise ValueError(f"budget must be a positive number of tokens, got {self.tokens!r}")

    def keep(self, n_tokens: int) -> int:
        """Tokens kept of `n_tokens`: max(1, int(T (1 - ratio))) (kvpress), or min(T, budget)."""
        if self.ratio is not None:
            return max(1, int(n_tokens * (1 - self.ratio)))
        return min(n_tokens, self.tokens)

    def kept_fraction(self, n_tokens: int) -> float:
        return (1 - self.ratio) if self.ratio is not None else min(1.0, self.tokens / n_tokens)


class EvictionMethod(abc.ABC):
    """Base of eviction methods (subclasses are frozen kw-only dataclasses)."""

    name: ClassVar[str] = "?"
    # the method works during the prefill itself (Locret evicts, MatryoshkaKV projects): it runs its own
    # prefill and has no scores for a finished one
    prefills_itself: ClassVar[bool] = False

    def observations(self) -> ObsSpec:
        return ObsSpec()

    def protected(self) -> int:
        """Tokens the method always keeps (a window, sinks): budgets below this are an error."""
        return 0

    def layer_keep(self, budget: Budget, n_tokens: int, layer: int, n_layers: int) -> int:
        """Tokens layer `layer` keeps per KV head for a prompt of `n_tokens` (host-side, static)."""
        return budget.keep(n_tokens)

    @abc.abstractmethod
    def score(self, ctx: ScoreContext) -> jax.Array:
        """float32 [B, K, S] importance of each slot (higher = keep)."""

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        """Turn scores [B, K, S] into a smaller layer state keeping `n_keep` [B] tokens per head."""
        return state.keep_top(scores, n_keep, capacity)

    def decode_rule(self, capacity: int) -> tuple[str, int, int] | None:
        """(rule, n_sink, recent) of `RollingKV` for decode-time eviction, or None if the method has none."""
        return None

    def decode_init_score(self, ctx: ScoreContext) -> jax.Array:
        """float32 [B, K, S] the rolling rule's starting scores of the prompt's slots."""
        return jnp.zeros(ctx.pos.shape, jnp.float32)

    def next_positions(self, next_pos, n_keep):
        """Position of the next token after compression (kvpress: the original length, unchanged)."""
        return next_pos



def group_mean(x: jax.Array, n_kv: int) -> jax.Array:
    """[B, H, S] per query head -> [B, K, S], mean over each KV head's group (kvpress, SnapKV #22)."""
    b, h, s = x.shape
    return x.reshape(b, n_kv, h // n_kv, s).mean(2)


def protect(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Give the slots in `mask` a score above every other (kvpress: `max + 1`)."""
    top = jnp.max(jnp.where(mask, -jnp.inf, scores), axis=(1, 2), keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    return jnp.where(mask, top + 1.0, scores)


def check_positive(**kw) -> None:
    for k, v in kw.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
