"""Locret (Huang et al. 2024, arXiv 2410.01805) as an eviction method: trained retaining heads score
tokens during a chunked prefill that evicts to the budget between chunks (`kvjax.states.locret`).

    lm.generate(prompt, method="locret", checkpoint="runs/locret", ratio=0.5)
    kvjax.methods.Locret(checkpoint="runs/locret", stabilizers=0.4)

The heads come from a `kvjax train locret` run directory (`checkpoint`). Unlike the other methods,
Locret does not score a finished prefill: it builds `LocretKV` layer states for the prefill
(`build_cache`) and cuts them to plain dense states after it (`finish`), through `kvjax.pipeline`.

`stabilizers` is a fraction of the budget: the reference keeps the last 2500 entries at a budget of
6000 (Phi-3-mini; 0.42) or 16384 (Llama-3.1-8B; 0.15); a fraction carries over to the small budgets
of small models. `local`: the reference prefills the prompt's last 100 tokens after its final cut,
so they always stay; here the final cut keeps them within the budget (at most half of it).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from kvjax.shapes import bucket
from kvjax.checkpoints import load_trained, model_id
from kvjax.methods.base import PrefillMethod, ScoreContext, register
from kvjax.states.cache import KVCache
from kvjax.states.locret import LocretKV


@register("locret")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Locret(PrefillMethod):
    checkpoint: str | None = None  # a `kvjax train locret --out` directory
    stabilizers: float = 0.4  # fraction of the budget kept as the most recent entries between chunks
    local: int = 100  # the prompt's last tokens kept at the final cut (the reference's `loc`)

    def __post_init__(self):
        if not 0 <= self.stabilizers < 1:
            raise ValueError(f"stabilizers must be a fraction of the budget in [0, 1), got {self.stabilizers!r}")
        if not isinstance(self.local, int) or self.local < 0:
            raise ValueError(f"local must be an integer >= 0 (tokens), got {self.local!r}")
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(Path(self.checkpoint).expanduser().absolute()))

    def score(self, ctx: ScoreContext):
        raise ValueError("Locret scores tokens while prefilling (its retaining heads need each token's q, k, v): "
                         "use it through LM.prefill / LM.generate, not on a finished prefill")

    def prepare(self, cfg, plan, lm=None) -> None:
        """Load (and check) the trained heads before anything compiles."""
        self.heads(cfg, plan.model_name)

    def build_cache(self, cfg, plan, batch: int, capacity: int, chunk: int) -> KVCache:
        """The prefill's cache: per layer a `LocretKV` of (longest budget + one chunk) slots holding the
        layer's retaining head, budget n_keep[0][b] per row (`capacity`, the prompt's, is not needed)."""
        budget = plan.n_keep[0]
        heads = self.heads(cfg, plan.model_name)
        stabilizers = [self.n_stabilizers(int(n)) for n in budget]
        local = [self.n_local(int(n)) for n in budget]
        slots = bucket(int(max(budget)) + chunk)
        layers = tuple(LocretKV.init(batch, cfg.n_kv_heads, slots, cfg.head_dim, cfg.jnp_dtype, budget, stabilizers,
                                     local, jax.tree_util.tree_map(lambda x: jnp.array(x[i]), heads))  # noqa: B023
                       for i in range(cfg.n_layers))  # distinct buffers: the prefill donates them
        return KVCache(layers=layers, next_pos=jnp.zeros((batch,), jnp.int32))

    def finish(self, cache: KVCache, capacities: tuple[int, ...]) -> KVCache:
        """Every layer cut to its budget (`LocretKV.finish`) as a `DenseKV` of capacities[l] slots."""
        return _finish(cache, capacities)

    def n_stabilizers(self, budget: int) -> int:
        return int(self.stabilizers * budget)

    def n_local(self, budget: int) -> int:
        """The tail kept at the final cut: `local` tokens, at most half the budget."""
        return min(self.local, budget // 2)

    def heads(self, cfg, model_name: str = "") -> dict:
        """The trained retaining heads {fc1: {kernel [L, E, F]}, fc2: {kernel [L, F, K]}} for a model of
        config `cfg`; a ValueError without a checkpoint, or for a checkpoint of another method or model."""
        if self.checkpoint is None:
            raise ValueError("locret needs trained retaining heads: pass checkpoint= (the --out directory of "
                             "`kvjax train locret`)")
        return _load_heads(self.checkpoint, cfg, model_name)


@functools.partial(jax.jit, static_argnames=("capacities",))
def _finish(cache: KVCache, capacities: tuple[int, ...]) -> KVCache:
    return dataclasses.replace(cache, layers=tuple(layer.finish(n) for layer, n in zip(cache.layers, capacities)))


@functools.lru_cache(maxsize=4)
def _load_heads(checkpoint: str, cfg, model_name: str) -> dict:
    params, _, _ = load_trained(checkpoint, Locret.name, model_id(model_name, cfg))
    n_layers = params["fc1"]["kernel"].shape[0]
    width = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    if n_layers != cfg.n_layers or params["fc1"]["kernel"].shape[1] != width:
        raise ValueError(f"{checkpoint}: heads for {n_layers} layers of input {params['fc1']['kernel'].shape[1]}, "
                         f"the model has {cfg.n_layers} layers of input {width}")
    return params
