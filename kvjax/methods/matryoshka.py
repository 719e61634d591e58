"""MatryoshkaKV (Lin et al. 2024, arXiv 2410.14731) as a compression method: every token kept, each
key and value stored as its coordinates in the first r columns of a trained orthogonal basis
(`kvjax.states.latent.LatentKV`), r = (1 - ratio)·D rounded to the trained rank grid, for every layer.

    lm.generate(prompt, method="matryoshka", checkpoint="runs/matryoshka", ratio=0.5)

`ratio` is the fraction of the K/V *bytes* removed (of the dimensions, not of the tokens);
`budget=` (tokens) does not apply. Per-layer searched ranks (`kvjax train matryoshka
--cache-fraction`) are used through `MatryoshkaTask.cache` directly.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from kvjax.checkpoints import load_trained, matryoshka_bases, model_id
from kvjax.methods.base import Budget, PrefillMethod, ScoreContext, register
from kvjax.states.cache import KVCache
from kvjax.states.latent import latent_cache


@register("matryoshka")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Matryoshka(PrefillMethod):
    checkpoint: str | None = None  # a `kvjax train matryoshka --out` directory

    def __post_init__(self):
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(Path(self.checkpoint).expanduser().absolute()))

    def score(self, ctx: ScoreContext):
        raise ValueError("MatryoshkaKV evicts no token: it stores every key and value in a smaller basis "
                         "(use it through LM.prefill / LM.generate)")

    def layer_keep(self, budget: Budget, n_tokens: int, layer: int, n_layers: int) -> int:
        if budget.ratio is None:
            raise ValueError("matryoshka keeps every token and removes dimensions: give ratio= (fraction of the "
                             "K/V bytes removed), not budget=")
        return n_tokens

    def prepare(self, cfg, plan, lm=None) -> None:
        """Load (and check) the trained bases before anything compiles."""
        self.bases(cfg, plan.ratio, plan.model_name)

    def build_cache(self, cfg, plan, batch: int, capacity: int, chunk: int) -> KVCache:
        """An empty cache of `LatentKV` layers of `capacity` slots at rank (1 - ratio)·D."""
        bases_k, bases_v = self.bases(cfg, plan.ratio, plan.model_name)
        return latent_cache(bases_k, bases_v, batch, capacity, cfg.jnp_dtype)

    def finish(self, cache: KVCache, capacities: tuple[int, ...]) -> KVCache:
        return cache  # every token stays, projected

    def bases(self, cfg, ratio: float, model_name: str = ""):
        """(bases_k, bases_v): per layer [K, D, r] orthonormal columns at r = (1 - ratio)·D on the rank grid."""
        if self.checkpoint is None:
            raise ValueError("matryoshka needs trained projections: pass checkpoint= (the --out directory of "
                             "`kvjax train matryoshka`)")
        uk, uv, step = _load_bases(self.checkpoint, cfg, model_name)
        r = int(np.clip(round((1 - ratio) * cfg.head_dim / step), 1, cfg.head_dim // step)) * step
        # copies: the bases become part of a cache, which the jitted steps donate
        return [jnp.array(u[:, :, :r]) for u in uk], [jnp.array(u[:, :, :r]) for u in uv]


@functools.lru_cache(maxsize=4)
def _load_bases(checkpoint: str, cfg, model_name: str):
    """(U_k, U_v per layer [K, D, D], rank step) of the newest readable checkpoint (the rank grid is
    head_dim / n_levels, as trained: `kvjax.train.matryoshka.MatryoshkaTask.step_rank`)."""
    params, const, meta = load_trained(checkpoint, Matryoshka.name, model_id(model_name, cfg))
    uk, uv = matryoshka_bases(params, const)
    return list(uk), list(uv), cfg.head_dim // meta["n_levels"]
