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
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.models.config import LlamaConfig
from kvjax.observe import LayerObs, ObsSpec

KINDS = ("score", "prefill", "quantizer")  # the kinds of registered classes (each class's `kind`)
TOKEN_KINDS = ("score", "prefill")  # what `method=` takes (a quantizer goes in quant= or a compose)
RESERVED = ("compose", "full", "none")  # spec words that are not registered names
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_REGISTRY: dict[str, type] = {}  # every registered name (aliases too) -> class, of every kind
WRAPPERS: dict[str, type] = {}  # "adakv" -> AdaKV: spec "wrapper:method" (filled by kvjax.methods)


def _qualname(cls) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"


def _registrar(names: tuple[str, ...], kinds: tuple[str, ...], who: str):
    for n in names:
        if not isinstance(n, str) or not _NAME.fullmatch(n):
            raise ValueError(f"{who}: a name is letters, digits and _ (not starting with a digit), got {n!r}")
    if not names:
        raise ValueError(f"{who}: give at least one name, e.g. @{who}(\"my_press\")")

    def deco(cls):
        if not isinstance(cls, type) or getattr(cls, "kind", None) not in kinds:
            bases = ("kvjax.methods.ScoreMethod or kvjax.methods.PrefillMethod" if "quantizer" not in kinds
                     else "kvjax.quantizers.Quantizer")
            raise ValueError(f"{who}({names[0]!r}): {_qualname(cls) if isinstance(cls, type) else repr(cls)} is "
                             f"not a subclass of {bases}")
        params = vars(cls).get("__dataclass_params__")
        if params is None or not params.frozen:
            raise ValueError(f"{who}({names[0]!r}): {_qualname(cls)} must be a frozen dataclass (hashable: methods "
                             f"are static arguments of jitted functions): put @dataclasses.dataclass(frozen=True, "
                             f"kw_only=True) below @{who}")
        for n in names:
            if n in RESERVED or n in WRAPPERS:
                raise ValueError(f"{who}: {n!r} is a reserved word of method specs; choose another name")
            held = _REGISTRY.get(n)
            if held is not None and held is not cls:
                raise ValueError(f"name {n!r} registered twice: {_qualname(held)} and {_qualname(cls)}")
        if not any(c is cls for c in _REGISTRY.values()):
            cls.name = names[0]  # the first registration names the class
        for n in names:
            _REGISTRY[n] = cls
        return cls

    return deco


def register_method(*names: str):
    """Class decorator: make a score or prefill method available by `names` (the first is its
    canonical name, its `name`) in `kvjax.methods.get`, `method=`, `--method` and `kvjax methods`.

        @kvjax.register_method("my_press")
        @dataclasses.dataclass(frozen=True, kw_only=True)
        class MyPress(kvjax.methods.ScoreMethod):
            def score(self, ctx): ...

    The class must subclass `ScoreMethod` or `PrefillMethod` and be a frozen dataclass. Names are
    shared by every kind (methods and quantizers). Registering a name again with the identical class
    object is a no-op; with any other class (a re-executed file defines a new class) it is a
    ValueError naming both classes (`unregister` first to replace one on purpose).
    """
    return _registrar(names, TOKEN_KINDS, "register_method")


register = register_method  # the name kvjax's own methods use


def register_quantizer(*names: str):
    """Class decorator: make a quantizer (a frozen dataclass subclassing `kvjax.quantizers.Quantizer`)
    available by `names` in `quant=`, `--quant`, `kvjax.quantizers.get`, `kvjax.methods.get` and the
    last part of a compose. With a `bits` field, "name-BITS" sets it ("kivi-2"). Same rules for
    names as `register_method`."""
    return _registrar(names, ("quantizer",), "register_quantizer")


def unregister(name: str) -> type:
    """Remove `name` and the aliases of its class from the registry; returns the class."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}: nothing to unregister")
    cls = _REGISTRY[name]
    for n in [n for n, c in _REGISTRY.items() if c is cls]:
        del _REGISTRY[n]
    return cls


def registry(*kinds: str) -> dict[str, type]:
    """Canonical name -> class of every registered class of the given kinds ("score", "prefill",
    "quantizer"); default: the token methods (score and prefill), what `method=` takes."""
    kinds = kinds or TOKEN_KINDS
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown kind {k!r}; kinds: {', '.join(KINDS)}")
    return {cls.name: cls for cls in _REGISTRY.values() if cls.kind in kinds}


def lookup(name: str) -> type:
    """The class registered as `name` (any kind)."""
    if name not in _REGISTRY:
        quants = ", ".join(sorted(registry("quantizer")))
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(registry()))}"
                         + (f"; quantizers: {quants}" if quants else ""))
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
      n_keep: int32 [B] tokens the layer keeps per KV head (None outside `kvjax.compress`), for scorers
        whose scores depend on the budget (CriticalKV's first stage).
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
    n_keep: jax.Array | None = None

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
    """Base of score methods (`ScoreMethod`; subclasses are frozen kw-only dataclasses): `score` a
    finished prefill's slots, the framework keeps the top ones."""

    name: ClassVar[str] = "?"
    kind: ClassVar[str] = "score"
    # the method works during the prefill itself (Locret evicts, MatryoshkaKV projects): it runs its own
    # prefill and has no scores for a finished one
    prefills_itself: ClassVar[bool] = False
    # the method's scores come from a second model pass over a prompt it builds, run on the prefilled cache
    # (KVzip's context reconstruction): the pipeline calls `replay_prompt`, `replay` and `layer_pairs`
    # (see `kvjax.methods.kvzip`), and its `n_keep` given to `select` is (KV head, token) pairs per layer
    replays: ClassVar[bool] = False
    # the method sets its own compression (DuoAttention streams whole heads): every layer keeps every
    # token in `n_keep`, and `bind` reads the request's ratio
    own_budget: ClassVar[bool] = False

    def bind(self, cfg, ratio=None, budget=None, model_name: str = "") -> "EvictionMethod":
        """The method as planned for a model and a request (`kvjax.pipeline.plan`, before any compile):
        trained weights checked, parameters resolved. Default: itself."""
        return self

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

    def page_keep(self, state, scores, n_keep):
        """The kept slots of a paged state (`kvjax.states.paged.PagedKV`), bool [B, K, L], from scores
        [B, K, L] over its logical slots: the same tokens `select` keeps, evicted from the pages. Only
        methods whose `select` keeps a per-head top-k (plain scorers) or that override this one apply
        to a paged cache (`paged_keeps`)."""
        return state.keep_top(scores, n_keep)

    def paged_keeps(self) -> bool:
        """True if `page_keep` gives the tokens `select` keeps (a paged cache can take the method)."""
        return self.plain_scorer() or type(self).page_keep is not EvictionMethod.page_keep

    def decode_rule(self, capacity: int) -> tuple[str, int, int] | None:
        """(rule, n_sink, recent) of `RollingKV` for decode-time eviction, or None if the method has none."""
        return None

    def decode_init_score(self, ctx: ScoreContext) -> jax.Array:
        """float32 [B, K, S] the rolling rule's starting scores of the prompt's slots."""
        return jnp.zeros(ctx.pos.shape, jnp.float32)

    def next_positions(self, next_pos, n_keep):
        """Position of the next token after compression (kvpress: the original length, unchanged)."""
        return next_pos

    def plain_scorer(self) -> bool:
        """True if the method is a plain scorer (kvpress `ScorerPress`): its kept set is the per-head top
        `n_keep` of `score` (no own `select`), so wrappers (chunkkv:, block:, critical:, ...) may rescore it."""
        return not self.prefills_itself and type(self).select is EvictionMethod.select


ScoreMethod = EvictionMethod  # the public name of the score-method base


class Wrapper(EvictionMethod):
    """A method around another one, `press` (a dataclass field of the subclass), written `WRAPPER:PRESS`
    (`wrapper`: its name in `WRAPPERS`). It observes, protects and scores as its press does unless it
    says otherwise; what it changes is how scores become a kept set (`layer_keep`, `select`, ...)."""

    wrapper: ClassVar[str] = "?"

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.wrapper}:{self.press.name}"

    def observations(self) -> ObsSpec:
        return self.press.observations()

    def protected(self) -> int:
        return self.press.protected()

    def score(self, ctx: ScoreContext) -> jax.Array:
        return self.press.score(ctx)


@dataclasses.dataclass(frozen=True)
class PrefillMethod(EvictionMethod):
    """Base of prefill methods: they build their own layer states before the prefill and finish them
    after it (Locret evicts while prefilling, MatryoshkaKV stores projections), so they have no scores
    for a finished prefill. Subclasses are frozen kw-only dataclasses; `kvjax.pipeline` calls:

      prepare(cfg, plan): load and check what the method needs (trained weights), before compiling;
      build_cache(cfg, plan, batch, capacity, chunk) -> KVCache: the cache the prefill runs on;
      finish(cache, capacities) -> KVCache: the cache after the prefill, layer l of capacities[l] slots.

    `layer_keep` (tokens kept per layer) and `protected` apply as for score methods.
    """

    kind: ClassVar[str] = "prefill"
    prefills_itself: ClassVar[bool] = True

    def score(self, ctx: ScoreContext) -> jax.Array:
        raise ValueError(f"{self.name} is a prefill method: it builds its cache while prefilling and has no "
                         "scores for a finished prefill (use it through LM.prefill / LM.generate)")

    def prepare(self, cfg, plan, lm=None) -> None:
        """Load (and check) what the method needs before anything compiles (default: nothing); `lm`, the
        model when there is one, lets a method that calibrates on first use do so (Palu)."""

    def build_cache(self, cfg, plan, batch: int, capacity: int, chunk: int):
        raise ValueError(f"prefill method {self.name} ({type(self).__qualname__}) defines no build_cache")

    def finish(self, cache, capacities: tuple[int, ...]):
        raise ValueError(f"prefill method {self.name} ({type(self).__qualname__}) defines no finish")



def group_mean(x: jax.Array, n_kv: int) -> jax.Array:
    """[B, H, S] per query head -> [B, K, S], mean over each KV head's group (kvpress, SnapKV #22)."""
    b, h, s = x.shape
    return x.reshape(b, n_kv, h // n_kv, s).mean(2)


def protect(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Give the slots in `mask` a score above every other (kvpress: `max + 1`)."""
    top = jnp.max(jnp.where(mask, -jnp.inf, scores), axis=(1, 2), keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    return jnp.where(mask, top + 1.0, scores)


def check_wrapped(wrapper: str, press, scorer: bool = True) -> None:
    """One-line ValueError unless `press` is a method a `wrapper:` can wrap: an eviction method that scores
    a finished prefill and, with `scorer`, a plain scorer (kvpress: the wrapper asserts a `ScorerPress`)."""
    if not isinstance(press, EvictionMethod):
        what = getattr(type(press), "kind", None)
        shown = getattr(press, "name", None) or type(press).__name__
        raise ValueError(f"{wrapper}: wraps a scoring method, got {shown!r}"
                         + (f" (a {what}: use it in compose(METHOD, {shown}) or quant=)" if what == "quantizer" else ""))
    if press.prefills_itself:
        raise ValueError(f"{wrapper}: wraps the scores of a finished prefill; {press.name} works while prefilling")
    if scorer and not press.plain_scorer():
        raise ValueError(f"{wrapper}: wraps a plain scorer (kvpress ScorerPress), not {press.name} (it selects "
                         "its own tokens)")


def check_positive(**kw) -> None:
    for k, v in kw.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
