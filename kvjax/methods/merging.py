"""Merge-on-evict around any plain scorer: `merging:snapkv`. Instead of dropping an evicted token, its
value is folded into the kept token whose key is most similar; the cache holds the kept tokens only
(its bytes are those of the kept set).

Follows kvpress 0.5.5 `MergingPress` (similarity_threshold 0.0, merge_fraction 1.0; after Token Merging,
arXiv 2210.09461, and D2O, arXiv 2406.13035): the scorer's top n_kept = max(1, int(T (1 - ratio)))
per head are kept; each evicted token e goes to the kept token t of highest key cosine similarity s
(keys normalized with norms floored at 1e-6); it merges if s >= similarity_threshold and, with
merge_fraction < 1, s is at least the (1 - merge_fraction) quantile (linear) of its head's evicted
similarities (failed ones counted as -inf); weight w = max(s, 0) ||v_e|| / (||v_e|| + ||v_t|| + 1e-6);
kept values become (v_t + sum w v_e) / (1 + sum w) where any weight arrived. Keys are unchanged.
Similarities are computed in blocks of evicted slots (`block` rows at a time), never T x T at once.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.methods.base import WRAPPERS, Budget, EvictionMethod, ScoreContext, Wrapper, check_positive, check_wrapped

EPS = 1e-6


def _unit(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), EPS)


def nearest_kept(evict_k, kept_k, kept_used, block: int):
    """For every slot of evict_k [B, K, S, D]: (max cosine similarity, index) over the used kept keys
    kept_k [B, K, C, D] (kept_used bool [B, K, C]); computed `block` slots at a time."""
    b, n_kv, s, d = evict_k.shape
    pad = (-s) % block
    e = jnp.pad(_unit(evict_k), [(0, 0), (0, 0), (0, pad), (0, 0)]).reshape(b, n_kv, -1, block, d)
    kk = _unit(kept_k)

    def one(eb):  # [B, K, blk, D]
        sim = jnp.einsum("bkid,bkcd->bkic", eb, kk)
        sim = jnp.where(kept_used[:, :, None, :], sim, -jnp.inf)
        return sim.max(-1), jnp.argmax(sim, axis=-1)

    best, target = jax.lax.map(one, jnp.moveaxis(e, 2, 0))
    best = jnp.moveaxis(best, 0, 2).reshape(b, n_kv, -1)[..., :s]
    target = jnp.moveaxis(target, 0, 2).reshape(b, n_kv, -1)[..., :s]
    return best, target


def quantile_masked(x, mask, q):
    """torch.quantile(x[mask], q) (linear interpolation) per [B, K] row of x [B, K, S]."""
    n = mask.sum(-1)
    xs = jnp.sort(jnp.where(mask, x, jnp.inf), axis=-1)
    pos = q * (jnp.maximum(n, 1) - 1).astype(jnp.float32)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    v_lo = jnp.take_along_axis(xs, lo[..., None], -1)[..., 0]
    v_hi = jnp.take_along_axis(xs, hi[..., None], -1)[..., 0]
    frac = pos - lo
    return jnp.where(frac > 0, v_lo + (v_hi - v_lo) * frac, v_lo)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Merging(Wrapper):
    wrapper: ClassVar[str] = "merging"
    press: EvictionMethod
    similarity_threshold: float = 0.0
    merge_fraction: float = 1.0
    block: int = 512

    def __post_init__(self):
        check_wrapped("merging", self.press)
        check_positive(block=self.block)
        if not isinstance(self.similarity_threshold, (int, float)) or not 0 <= self.similarity_threshold <= 1:
            raise ValueError(f"similarity_threshold must be in [0, 1], got {self.similarity_threshold!r}")
        if not isinstance(self.merge_fraction, (int, float)) or not 0 < self.merge_fraction <= 1:
            raise ValueError(f"merge_fraction must be in (0, 1], got {self.merge_fraction!r}")

    def layer_keep(self, budget: Budget, n_tokens: int, layer: int, n_layers: int) -> int:
        return budget.keep(n_tokens)  # kvpress: compute_n_kept for every layer

    def decode_rule(self, capacity: int):
        raise ValueError("decode-time eviction (capacity=) drops tokens: use the scorer without merging:")

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        b, n_kv, s = scores.shape
        used = jnp.arange(s)[None, None, :] < state.length[:, None, None]
        scores = jnp.where(used, scores.astype(jnp.float32), -jnp.inf)
        top = jax.lax.top_k(scores, min(capacity, s))[1]
        live = jnp.arange(top.shape[-1])[None, None, :] < n_keep[:, None, None]
        kept_mask = jnp.zeros((b, n_kv, s), bool).at[jnp.arange(b)[:, None, None], jnp.arange(n_kv)[None, :, None],
                                                      top].max(live)
        kept = state.keep_top(kept_mask.astype(jnp.float32), n_keep, capacity)  # kept slots in position order
        c = kept.k.shape[2]
        kept_used = jnp.arange(c)[None, None, :] < n_keep[:, None, None]
        evicted = used & ~kept_mask
        sim, target = nearest_kept(state.k, kept.k, jnp.broadcast_to(kept_used, (b, n_kv, c)), self.block)
        ok = evicted & (sim >= self.similarity_threshold)
        if self.merge_fraction < 1.0:
            thr = quantile_masked(jnp.where(ok, sim, -jnp.inf), evicted, 1.0 - self.merge_fraction)
            ok = ok & (sim >= thr[..., None])
        v = state.v.astype(jnp.float32)
        kv = kept.v.astype(jnp.float32)
        e_norm = jnp.linalg.norm(v, axis=-1)  # [B, K, S]
        t_norm = jnp.take_along_axis(jnp.linalg.norm(kv, axis=-1), target, axis=-1)
        w = jnp.where(ok, jnp.maximum(sim, 0.0), 0.0) * e_norm / (e_norm + t_norm + EPS)
        bi, ki = jnp.arange(b)[:, None, None], jnp.arange(n_kv)[None, :, None]
        acc = jnp.zeros_like(kv).at[bi, ki, target].add(w[..., None] * v)
        wacc = jnp.zeros(kv.shape[:3], jnp.float32).at[bi, ki, target].add(w)
        merged = jnp.where((wacc > 0)[..., None], (kv + acc) / (1.0 + wacc)[..., None], kv)
        return dataclasses.replace(kept, v=merged.astype(kept.v.dtype))


WRAPPERS["merging"] = Merging
