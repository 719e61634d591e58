"""KVSharer (Yang et al. 2024, arXiv 2410.18517, sec. 3 and Algorithm 1): whole-layer K/V sharing between the
most *dissimilar* layers, found on calibration text.

* Calibration: each layer's K/V cache averaged over `sentences` calibration windows of `tokens` tokens
  (default 30 x 64): a mean cache per layer, flattened.
* Search: layer pairs (i < j) ranked by the Euclidean distance of their mean caches, most dissimilar first
  (`order="similar"`: the ablation, most similar first). A pair is tried by letting layer j (and every layer
  reading j) read the cache of layer i; it is accepted while the cosine similarity of the model's final
  (normed) hidden states with and without the sharing, averaged over the calibration tokens, stays
  >= `threshold`, until `n_shared` layers read another layer's cache (default L // 4, the paper's 25 %).
  Every candidate runs one jitted forward in which the share map is data (`kvjax.states.cache.routed_cache`):
  one compile for the whole search.
* Deploy: the plan is a static share map (`KVCache.share`): a reading layer computes and stores no K/V.

The plan is saved as JSON (`save_plan`; `kvsharer(plan=FILE)`, `kvjax kvsharer --out FILE`); without a file it
is computed on first use from prose generated inside kvjax (`kvjax.data.generated_text`) and cached under
`$KVJAX_CACHE/kvsharer/`.

Legend: B calibration windows, T tokens per window, L layers, K KV heads, D head dim, E d_model.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.checkpoints import model_id, same_model
from kvjax.data import generated_text
from kvjax.hub import cache_dir
from kvjax.methods.base import check_positive, register
from kvjax.methods.crosslayer import CrossLayer
from kvjax.methods.spec import get, spec_of
from kvjax.models.family import model_for
from kvjax.states.cache import check_route, routed_cache

ORDERS = ("dissimilar", "similar")
_PLANS: dict = {}  # (cfg, search settings) -> {model name: route}: plans resolved in this process


def calibration_tokens(lm, n: int, t: int, seed: int = 0) -> np.ndarray:
    """int32 [n, t]: consecutive windows of prose generated from `seed` (`kvjax.data.generated_text`)."""
    chars = 8 * n * t
    while True:
        ids = lm.encode(generated_text(seed, chars))
        if len(ids) >= n * t:
            return np.asarray(ids[: n * t], np.int32).reshape(n, t)
        chars *= 2


@functools.partial(jax.jit, static_argnames=("cfg",))
def routed_forward(params, tokens, route, *, cfg):
    """The final normed hidden states float32 [B, T, E] and the cache of tokens int32 [B, T] when layer i
    reads the K/V of layer route[i] (int32 [L], traced: one compile for every route)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    (_, cache), state = model_for(cfg)(cfg).apply({"params": params}, tokens, positions,
                                                   routed_cache(cfg, b, t, route), mutable=["hidden"])
    return state["hidden"]["final"][0].astype(jnp.float32), cache


def mean_caches(cache, t: int) -> np.ndarray:
    """float64 [L, 2 K T D]: each layer's K and V over its first `t` slots, averaged over the windows."""
    return np.stack([np.concatenate([np.asarray(s.k[:, :, :t], np.float64).mean(0).ravel(),
                                     np.asarray(s.v[:, :, :t], np.float64).mean(0).ravel()]) for s in cache.layers])


def cosine(a: jax.Array, b: jax.Array) -> float:
    """Mean over tokens of the cosine similarity of hidden states a, b [B, T, E]."""
    num = jnp.sum(a * b, -1)
    den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return float(jnp.mean(num / jnp.maximum(den, 1e-12)))


def search(distances: np.ndarray, similarity: Callable[[np.ndarray], float], threshold: float, n_shared: int,
           order: str = "dissimilar", on_try: Callable[[dict], None] | None = None,
           max_tries: int | None = None) -> tuple[list[int], list[dict]]:
    """KVSharer's greedy search (Algorithm 1). `distances` [L, L] between layers' mean caches; `similarity(route)`
    the hidden-state cosine of a candidate route (int [L]: layer -> layer whose K/V it reads). Pairs (i < j) are
    tried by decreasing distance ("similar": increasing); a pair whose layer j still reads its own K/V makes j,
    and every layer reading j, read layer i's producer; accepted if similarity >= threshold. Stops when
    `n_shared` layers read another layer's K/V, or after `max_tries` pairs tried (None: no limit). Returns (route, the log: one dict per pair tried, each also
    passed to `on_try`)."""
    n = len(distances)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    pairs.sort(key=lambda p: (-distances[p] if order == "dissimilar" else distances[p], p))
    route, log = np.arange(n), []
    for i, j in pairs:
        if int((route != np.arange(n)).sum()) >= n_shared or max_tries is not None and len(log) >= max_tries:
            break
        if route[j] != j:
            continue
        cand = np.where(route == j, route[i], route)
        sim = float(similarity(cand))
        accepted = sim >= threshold
        log.append(dict(pair=[i, j], distance=float(distances[i, j]), cosine=sim, accepted=bool(accepted)))
        if on_try is not None:
            on_try(log[-1])
        if accepted:
            route = cand
    return [int(r) for r in route], log


def calibrate(lm, sentences: int = 30, tokens: int = 64, seed: int = 0, threshold: float = 0.9,
              n_shared: int | None = None, order: str = "dissimilar", max_tries: int | None = None,
              on_try: Callable[[dict], None] | None = None) -> dict:
    """The KVSharer plan of `lm` (an `LM`): calibration, search, and what it found, as the JSON `save_plan` writes."""
    cfg = lm.cfg
    n_shared = cfg.n_layers // 4 if n_shared is None else n_shared
    ids = jnp.asarray(calibration_tokens(lm, sentences, tokens, seed))
    own = np.arange(cfg.n_layers, dtype=np.int32)
    check_route(own, cfg.n_layers)
    base, cache = routed_forward(lm.params, ids, jnp.asarray(own), cfg=cfg)
    means = mean_caches(cache, tokens)
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    route, log = search(distances, lambda r: cosine(routed_forward(lm.params, ids, jnp.asarray(r, jnp.int32),
                                                                   cfg=cfg)[0], base),
                        threshold, n_shared, order, on_try, max_tries)
    return dict(method="kvsharer", model=model_id(lm.name, cfg), route=route, threshold=threshold, n_shared=n_shared,
                order=order, max_tries=max_tries, sentences=sentences, tokens=tokens, seed=seed,
                shared_layers=[i for i, r in enumerate(route) if r != i], tried=log)


def save_plan(path, plan: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1) + "\n")
    tmp.replace(path)


def load_plan(path, cfg, model_name: str = "") -> list[int]:
    """The route of a plan file, checked against the model (its layers; its config hash when named)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"kvsharer: no plan file {path}")
    try:
        plan = json.loads(path.read_text())
        route = [int(r) for r in plan["route"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"kvsharer: {path} is not a KVSharer plan ({e})") from None
    if model_name and plan.get("model") and not same_model(plan["model"], model_id(model_name, cfg)):
        raise ValueError(f"kvsharer: the plan {path} is for model {plan['model']!r}, not {model_id(model_name, cfg)!r}")
    check_route(route, cfg.n_layers)
    return route


@register("kvsharer")
@dataclasses.dataclass(frozen=True, kw_only=True)
class KVSharer(CrossLayer):
    """KVSharer (arXiv 2410.18517): see the module docstring. `plan`: a plan file (JSON with a "route"); without
    one, the plan is searched on first use with the settings below and cached under `$KVJAX_CACHE/kvsharer/`.

    Attributes:
      plan: a plan file, or None.  threshold: the hidden-state cosine a pair must keep.
      n_shared: layers that read another's cache (default L // 4).  order: "dissimilar" (the paper) or
      "similar" (the ablation).  max_tries: stop after this many pairs tried (None: the paper's search,
      every pair if need be).  sentences, tokens, seed: the calibration windows.
      press: an eviction method applied to the shared states (`CrossLayer`).
    """

    plan: str | None = None
    threshold: float = 0.9
    n_shared: int | None = None
    order: str = "dissimilar"
    max_tries: int | None = None
    sentences: int = 30
    tokens: int = 64
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.order not in ORDERS:
            raise ValueError(f"kvsharer: order must be one of {ORDERS}, got {self.order!r}")
        if not isinstance(self.threshold, (int, float)) or not -1 <= self.threshold <= 1:
            raise ValueError(f"kvsharer: threshold is a cosine in [-1, 1], got {self.threshold!r}")
        check_positive(sentences=self.sentences, tokens=self.tokens)
        for name in ("n_shared", "max_tries"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"kvsharer: {name} must be an integer >= 0, got {value!r}")

    def settings(self) -> dict:
        return dict(threshold=self.threshold, n_shared=self.n_shared, order=self.order, max_tries=self.max_tries,
                    sentences=self.sentences, tokens=self.tokens, seed=self.seed)

    def cached_path(self, cfg, model_name: str) -> Path:
        key = json.dumps(dict(model=model_id(model_name, cfg), **self.settings()), sort_keys=True)
        return cache_dir() / "kvsharer" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def route(self, cfg, model_name: str = "", lm=None) -> tuple[int, ...]:
        """The plan file's route; else the plan searched for this model (in this process, under
        `$KVJAX_CACHE/kvsharer/`, or now, when `lm` is given)."""
        self.check_model(cfg)
        if self.n_shared is not None and self.n_shared >= cfg.n_layers:
            raise ValueError(f"kvsharer: n_shared={self.n_shared}, the model has {cfg.n_layers} layers")
        if self.plan is not None:
            return tuple(load_plan(self.plan, cfg, model_name))
        known = _PLANS.setdefault((cfg, json.dumps(self.settings(), sort_keys=True)), {})
        if not model_name:  # a caller without the model's name (byte counts): the plan this process found
            if len({tuple(r) for r in known.values()}) != 1:
                raise ValueError("kvsharer: no plan for this model yet: pass plan=FILE, or use it through an LM "
                                 "(which searches one on first use)")
            return next(iter(known.values()))
        if model_name not in known:
            path = self.cached_path(cfg, model_name)
            if path.is_file():
                known[model_name] = tuple(load_plan(path, cfg, model_name))
            elif lm is None:
                raise ValueError(f"kvsharer: no plan for {model_name!r} yet: pass plan=FILE, or use it through an "
                                 "LM (which searches one on first use)")
            else:
                plan = calibrate(lm, **self.settings())
                save_plan(path, plan)
                known[model_name] = tuple(plan["route"])
        return known[model_name]


def with_plan(method, plan: str | None):
    """`method` (a spec, object or None) with KVSharer's plan file `plan` set (the CLI's --plan)."""
    if plan is None:
        return method
    obj = KVSharer() if method is None else get(method)
    if not isinstance(obj, KVSharer):
        raise ValueError(f"--plan gives KVSharer its share plan; the method is {spec_of(obj)!r}")
    return dataclasses.replace(obj, plan=str(plan))


__all__ = ["with_plan", "KVSharer", "calibrate", "search", "save_plan", "load_plan", "routed_forward"]
