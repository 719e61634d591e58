"""FINCH (Corallo & Papotti 2024, "FINCH: Prompt-guided Key-Value Cache Compression", TACL): keep the context
tokens the question attends to; the question is the prompt's last `window` tokens.

Follows kvpress 0.5.5 `FinchPress` (chunk_length None, normalize_scores True, rerotate_keys True): SnapKV's
window attention (the `window` last queries over all keys, post-RoPE, causal, softmax in float32, the window's
own columns dropped), each query's row multiplied by its position p (kvpress's `normalize_scores`: the count
arange(T - window, T)), mean over the window queries, mean over each KV group, no pooling; the window gets
`max + 1`. kvpress finds the window from a delimiter token between context and question (removed before the
model sees the prompt); kvjax takes the question's length, `window`, with the prompt = context + question.
With `chunk_length`, each chunk of chunk_length slots keeps its own top max(1, int(n (1 - ratio))) of its n
tokens (the ratio is the request's, so chunking needs ratio=, and chunk_length > window / (1 - ratio) as
kvpress asserts). With `rerotate` (kvpress `rerotate_keys`) the kept keys are re-rotated to the contiguous
positions 0..n_kept-1 and new tokens continue at n_kept, as `rerotate:` does.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from kvjax.methods.base import EvictionMethod, ScoreContext, check_positive, group_mean, protect, register
from kvjax.methods.rerotate import rerotate_to_slots
from kvjax.methods.window import window_attention
from kvjax.models.rope import rope_inv_freq
from kvjax.observe import ObsSpec


@register("finch")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Finch(EvictionMethod):
    window: int = 64  # the question's tokens at the prompt's end (kvpress: after the delimiter)
    chunk_length: int | None = None
    normalize_scores: bool = True
    rerotate: bool = True
    ratio: float | None = None  # the request's ratio, set by `bind` (per-chunk budgets need it)

    def __post_init__(self):
        check_positive(window=self.window)
        if self.chunk_length is not None:
            check_positive(chunk_length=self.chunk_length)

    def bind(self, cfg, ratio=None, budget=None, model_name: str = "") -> "Finch":
        if self.chunk_length is None:
            return self
        if ratio is None:
            raise ValueError("finch with chunk_length keeps a fraction of each chunk: give ratio=, not budget=")
        if self.ratio is not None and self.ratio != ratio:
            raise ValueError(f"finch: ratio={ratio} and the name's ratio={self.ratio} differ; give one")
        if not self.chunk_length > self.window / (1 - ratio):
            raise ValueError(f"finch: chunk_length {self.chunk_length} must exceed window / (1 - ratio) = "
                             f"{self.window / (1 - ratio):g}, so that a chunk keeps the whole question (kvpress)")
        return dataclasses.replace(self, ratio=float(ratio))

    def observations(self) -> ObsSpec:
        return ObsSpec(window=self.window)

    def protected(self) -> int:
        return self.window

    def chunk_keeps(self) -> np.ndarray:
        """int32 [chunk_length + 1]: tokens a chunk of n tokens keeps (kvpress compute_n_kept; 0 for n = 0)."""
        n = np.arange(self.chunk_length + 1)
        return np.where(n > 0, np.maximum(1, (n * (1 - self.ratio)).astype(np.int64)), 0).astype(np.int32)

    def layer_keep(self, budget, n_tokens: int, layer: int, n_layers: int) -> int:
        if self.chunk_length is None:
            return budget.keep(n_tokens)
        if budget.ratio != self.ratio:
            raise ValueError(f"finch with chunk_length was bound to ratio {self.ratio}, asked for {budget}: "
                             "plan it through kvjax (LM.prefill / generate) with ratio=")
        full, rest = divmod(n_tokens, self.chunk_length)
        return int(full * self.chunk_keeps()[-1] + self.chunk_keeps()[rest])

    def score(self, ctx: ScoreContext):
        attn = window_attention(ctx, self.window)  # [B, H, W, S]
        if self.normalize_scores:
            attn = attn * ctx.obs.win_pos[:, -self.window:][:, None, :, None].astype(jnp.float32)
        in_window = ctx.pos >= (ctx.n_tokens - self.window)[:, None, None]  # [B, K, S]
        outside = jnp.repeat(~in_window & ctx.used, ctx.cfg.group, axis=1)
        scores = group_mean(jnp.where(outside, attn.mean(2), 0.0), ctx.k.shape[1])
        return protect(scores, in_window)

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        if self.chunk_length is not None:  # each chunk's own top count: rank inside the chunk < its keep
            b, n_kv, s = scores.shape
            c = self.chunk_length
            pad = (-s) % c
            live = jnp.where(ctx.used, scores, -jnp.inf)
            parts = jnp.pad(live, [(0, 0), (0, 0), (0, pad)], constant_values=-jnp.inf).reshape(b, n_kv, -1, c)
            rank = jnp.argsort(jnp.argsort(-parts, axis=-1, stable=True), axis=-1, stable=True)
            n_in = jnp.clip(ctx.length[:, None] - c * jnp.arange(parts.shape[2])[None, :], 0, c)  # [B, chunks]
            keeps = jnp.asarray(self.chunk_keeps())[n_in][:, None, :, None]
            chosen = (rank < keeps).reshape(b, n_kv, -1)[..., :s]
            scores = chosen.astype(jnp.float32)
        kept = state.keep_top(scores, n_keep, capacity)
        if not self.rerotate:
            return kept
        return rerotate_to_slots(kept, n_keep, jnp.asarray(rope_inv_freq(ctx.cfg, ctx.layer)))

    def next_positions(self, next_pos, n_keep):
        return n_keep.astype(next_pos.dtype) if self.rerotate else next_pos
