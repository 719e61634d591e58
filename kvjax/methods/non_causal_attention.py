"""Non-causal chunked attention (Chari & Van Durme 2025, "Compactor", arXiv 2507.08143): score each key by
the attention it receives from every query of its block, future ones included.

Follows kvpress 0.5.5 `NonCausalAttnPress` (chunk_size 256): the prompt cut into aligned blocks of
chunk_size tokens; inside a block every post-RoPE query attends to all the block's keys with unscaled
logits q.k (kvpress's zero padding of the last block: padded keys logit -1e-9, padded queries 0);
column sums over the block's queries, mean over each KV group, times ||v_j||, `avg_pool1d(3, pad 1)`
(zero padding counted), then z-normalized over the layer (unbiased std, floored at 1e-6: one affine map
for every head, so it changes no per-head or Ada-KV selection). The sums are gathered during the
prefill (`ObsSpec.nc_chunk`), so blocks must tile the prefill chunk: chunk_size divides 512.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.methods.base import EvictionMethod, ScoreContext, check_positive, group_mean, register
from kvjax.methods.snapkv import pool1d
from kvjax.observe import ObsSpec
from kvjax.shapes import PREFILL_CHUNK


def znorm(scores, used):
    """(x - mean) / max(std, 1e-6) over each row's used (head, slot) entries; torch's unbiased std."""
    n = jnp.maximum(used.sum((1, 2), keepdims=True), 2)
    x = jnp.where(used, scores, 0.0)
    mean = x.sum((1, 2), keepdims=True) / n
    var = jnp.where(used, (scores - mean) ** 2, 0.0).sum((1, 2), keepdims=True) / (n - 1)
    return jnp.where(used, (scores - mean) / jnp.maximum(jnp.sqrt(var), 1e-6), 0.0)


@register("non_causal_attention")
@dataclasses.dataclass(frozen=True, kw_only=True)
class NonCausalAttention(EvictionMethod):
    chunk_size: int = 256

    def __post_init__(self):
        check_positive(chunk_size=self.chunk_size)
        if PREFILL_CHUNK % self.chunk_size:
            raise ValueError(f"chunk_size must divide the prefill chunk {PREFILL_CHUNK} (blocks are scored inside "
                             f"it), got {self.chunk_size}")

    def observations(self) -> ObsSpec:
        return ObsSpec(nc_chunk=self.chunk_size)

    def score(self, ctx: ScoreContext):
        a = group_mean(ctx.obs.nc_sum, ctx.k.shape[1])  # [B, K, S]
        used = ctx.used
        scores = jnp.where(used, a * jnp.linalg.norm(ctx.v.astype(jnp.float32), axis=-1), 0.0)
        scores = pool1d(scores, 3, "avg")
        return znorm(scores, jnp.broadcast_to(used, scores.shape))
