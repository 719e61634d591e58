"""Cross-layer sharing: methods whose layers read another layer's K/V (`KVCache.share`), and CLA by conversion.

A cross-layer method is a share plan, a *route*: route[i] is the layer whose K/V layer i reads (route[i] == i:
its own). The pipeline (`kvjax.pipeline.plan`) turns it into the cache's `share` map: a reading layer computes
no K/V and stores nothing, a shared state is held, counted and compressed once. The method may carry an
eviction method (`press=`, a score method's spec) applied to what the shared states hold, and composes with a
quantizer as every method does (`compose(cla, kivi-4)`, `quant=`).

    kvjax.methods.get("cla")                          # adjacent pairs in the deep half, training-free
    kvjax.methods.get("cla(group=3, layers=all, remainder=own)")
    kvjax.methods.get("cla(press=snapkv)")            # + SnapKV eviction of the shared states (ratio=)

Legend: L layers.
"""
from __future__ import annotations

import abc
import dataclasses

import jax

from kvjax.checkpoints import load_trained, model_id, run_of
from kvjax.methods.base import PrefillMethod, check_positive, register
from kvjax.methods.spec import get, kind_of, spec_of
from kvjax.observe import ObsSpec
from kvjax.states.cache import check_route


@dataclasses.dataclass(frozen=True, kw_only=True)
class CrossLayer(PrefillMethod):
    """Base of cross-layer methods: `route(cfg, model_name, lm)` is the share plan (a tuple of L layer
    indices, checked by `kvjax.states.cache.check_route`); `press` an optional eviction method's spec
    (a score method), stored canonical. The pipeline prefills onto the shared cache and evicts with the
    press (if any): the method itself never builds a cache."""

    press: str | None = None

    def __post_init__(self):
        if self.press is not None:
            press = get(self.press)
            if kind_of(press) != "score":
                raise ValueError(f"{self.name}: press= takes a score method (e.g. snapkv), got {spec_of(press)!r}")
            object.__setattr__(self, "press", spec_of(press))

    @property
    def keeps_every_token(self) -> bool:
        """Without a press every token is kept: the method takes no ratio or budget."""
        return self.press is None

    def evictor(self):
        """The eviction method applied to the shared states, or None."""
        return None if self.press is None else get(self.press)

    def observations(self) -> ObsSpec:
        return ObsSpec() if self.press is None else self.evictor().observations()

    @abc.abstractmethod
    def route(self, cfg, model_name: str = "", lm=None) -> tuple[int, ...]:
        """The share plan for a model of `cfg` (`lm`: the model, for a method that calibrates on first use)."""

    def check_model(self, cfg) -> None:
        """One-line ValueError for a model whose layers do not all hold dense K/V."""
        if getattr(cfg, "kv_layout", "dense") != "dense" or any(getattr(cfg, "windows", None) or ()):
            raise ValueError(f"{self.name} shares dense K/V between layers; this model's cache is not dense in every "
                             "layer (latents or sliding windows)")


REMAINDERS = ("own", "short")


@register("cla")
@dataclasses.dataclass(frozen=True, kw_only=True)
class CLA(CrossLayer):
    """Cross-Layer Attention by conversion (Brandon et al. 2024, arXiv 2405.12981, Fig. 1 / sec. 2: groups of
    `group` adjacent layers share one K/V, computed by the group's lowest layer, the producer). The paper trains
    CLA from scratch; here a trained model is converted: its consumer layers drop their k/v projections and
    attend to the producer's K/V (training-free), optionally healed (`kvjax train cla`: the consumers' q and o
    projections distilled from the unconverted model, `kvjax.methods.cla_weights`).

    Attributes:
      group: layers per group (2 = CLA2).
      layers: "deep" (default: the deep half, L//2 .. L-1, trimmed from below to whole groups), "all", or a
        range (first, end) of layers.
      remainder: when `group` does not divide the layers: None (a ValueError), "own" (the lowest leftover
        layers keep their own K/V) or "short" (they form one smaller group).
      press: an eviction method applied to the shared states (`CrossLayer`).
    """

    group: int = 2
    layers: str | tuple = "deep"
    remainder: str | None = None

    def __post_init__(self):
        super().__post_init__()
        check_positive(group=self.group)
        ok = self.layers in ("deep", "all") or (isinstance(self.layers, tuple) and len(self.layers) == 2
                                                and all(isinstance(x, int) for x in self.layers))
        if not ok:
            raise ValueError(f"cla: layers must be 'deep', 'all' or a range (first, end), got {self.layers!r}")
        if self.remainder is not None and self.remainder not in REMAINDERS:
            raise ValueError(f"cla: remainder must be one of {REMAINDERS} (or not given), got {self.remainder!r}")

    def span(self, n_layers: int) -> tuple[int, int]:
        """(first, end) of the layers that share, before the remainder rule."""
        if self.layers == "all":
            return 0, n_layers
        if self.layers == "deep":
            n = self.group * (n_layers // 2 // self.group)
            if n == 0:
                raise ValueError(f"cla: the deep half of {n_layers} layers holds no group of {self.group}")
            return n_layers - n, n_layers
        first, end = self.layers
        if not 0 <= first < end <= n_layers:
            raise ValueError(f"cla: layers=({first}, {end}) names layers that do not exist (the model has "
                             f"layers 0..{n_layers - 1}; a range is (first, end) with first < end <= {n_layers})")
        return first, end

    def route(self, cfg, model_name: str = "", lm=None) -> tuple[int, ...]:
        """Layer -> the layer whose K/V it reads: each group's lowest layer for every layer of the group. A
        model healed for a CLA conversion (`kvjax.load` of a `kvjax train cla` run) takes that conversion only."""
        self.check_model(cfg)
        healed = healed_run(model_name)
        if healed is not None and get(healed["spec"]).route(cfg) != self.route(cfg):
            raise ValueError(f"{model_name} was healed for {healed['spec']}; its layers are not shared as {self.name} "
                             f"{spec_of(self)} shares them")
        first, end = self.span(cfg.n_layers)
        left = (end - first) % self.group
        route = list(range(cfg.n_layers))
        if left and self.remainder is None:
            raise ValueError(f"cla: group={self.group} does not divide the {end - first} layers {first}..{end - 1}; "
                             "give remainder=own (the lowest leftover layers keep their own K/V) or remainder=short "
                             "(they form a smaller group)")
        starts = list(range(first + left, end, self.group))
        if left and self.remainder == "short":
            starts.insert(0, first)
        for a, b in zip(starts, starts[1:] + [end]):
            route[a:b] = [a] * (b - a)
        check_route(route, cfg.n_layers)
        return tuple(route)


# ------------------------------------------------------------------------------------- healed CLA
HEALED = ("q_proj", "o_proj")  # what `kvjax train cla` trains in each consumer layer's attention


def merge_healed(params: dict, healed: dict) -> dict:
    """`params` (the model's) with the consumer layers' attention projections of `healed`
    ({"layers_i": {"q_proj": ..., "o_proj": ...}}) in place of theirs; the other arrays are shared, not copied."""
    out = dict(params)
    for layer, projections in healed.items():
        attn = {**params[layer]["attn"], **projections}
        out[layer] = {**params[layer], "attn": attn}
    return out


def healed_run(path) -> dict | None:
    """The settings of a `kvjax train cla` run directory (`method`, `model`, `spec`), or None for anything else."""
    return run_of(path, "cla")


def load_healed(run_dir, params: dict, cfg, base: str, method: str = "cla") -> dict:
    """The model's `params` with the healed projections of the newest readable checkpoint of `run_dir` (a
    `kvjax train cla` run of the model `base`, checked by name and config hash; or of another `method`
    that heals attention projections: `kvjax train distill`), in the params' dtypes."""
    healed = load_trained(run_dir, method, model_id(base, cfg))[0]
    healed = {layer: {name: jax.tree_util.tree_map(lambda v, p: v.astype(p.dtype), arrays, params[layer]["attn"][name])
                      for name, arrays in projections.items()} for layer, projections in healed.items()}
    return merge_healed(params, healed)


__all__ = ["CrossLayer", "CLA", "merge_healed", "healed_run", "load_healed"]
