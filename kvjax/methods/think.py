"""ThinK (Xu et al. 2024, arXiv 2407.21018): query-driven pruning of key channels, after a token method.

Per KV head k and key channel j, the importance of the channel to the window queries Q (the prompt's
last `window` post-RoPE queries) is the Frobenius norm of its rank-one contribution to the scores,
||Q[:, j] K[:, j]^T||_F = ||Q[:, j]||_2 ||K[:, j]||_2 (paper Sec. 3.2, eq. 4), and the
floor(key_ratio * D) channels of least importance are pruned.

* **GQA.** The released code repeats the KV heads to the H query heads and prunes per query head,
  so nothing can be freed (each KV head's channels are still needed by some query head). kvjax scores
  each KV head by the sum over its group of G query heads, sum_g ||Q_g[:, j]|| ||K[:, j]||, and keeps
  one channel set per KV head: the stored keys have D' = D - floor(key_ratio * D) channels
  (`ChannelKV`), real bytes.
* **Order.** It follows a token method (ThinK's own pipeline is SnapKV, then channels): the inner
  method selects tokens, then the kept keys' channel norms and the window queries choose channels.
  Write it `compose(snapkv, think(key_ratio=0.5))` (a compose folds it around the method before it)
  or as a wrapper, `think(key_ratio=0.5):snapkv`. Quantizers compose after it:
  `compose(snapkv, think, kivi-4)`.
* Window queries are those the prompt's last `window` tokens (32, the paper's observation window)
  asked; padding positions (before a short prompt) are excluded.
* New tokens are stored in the same channels (the prefill's choice; static shapes).
* kvpress 0.5.5 `ThinKPress` differs: squared means instead of norms, per KV head from the group mean of
  queries, and it zeroes channels in place (no memory saved).

Legend: B batch, K KV heads, G = H/K, H query heads, W window, S slots, D head dim, D' kept channels.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.methods.base import WRAPPERS, Budget, EvictionMethod, ScoreContext, check_positive, check_wrapped
from kvjax.observe import ObsSpec
from kvjax.states.channels import ChannelKV
from kvjax.states.dense import DenseKV


def channel_scores(q_win, win_pos, k, length, n_kv: int) -> jax.Array:
    """ThinK's channel importance float32 [B, K, D]: sum over the G query heads of each KV head of
    ||Q_h[:, j]||_2 * ||K[:, j]||_2.

    Args:
      q_win: [B, W, H, D] window queries; win_pos int32 [B, W] (negative: no such query, excluded).
      k: [B, K, S, D] keys, slots [0, length[b]) in use.
    """
    b, w, h, d = q_win.shape
    q = jnp.where((win_pos >= 0)[:, :, None, None], q_win.astype(jnp.float32), 0.0)
    q_norm = jnp.sqrt(jnp.sum(q * q, axis=1)).reshape(b, n_kv, h // n_kv, d)  # [B, K, G, D]
    used = (jnp.arange(k.shape[2])[None, :] < length[:, None])[:, None, :, None]
    k32 = jnp.where(used, k.astype(jnp.float32), 0.0)
    k_norm = jnp.sqrt(jnp.sum(k32 * k32, axis=2))  # [B, K, D]
    return jnp.sum(q_norm, axis=2) * k_norm


def kept_channels(scores: jax.Array, n_keep: int) -> jax.Array:
    """int32 [B, K, n_keep]: the best channels of each head, in ascending channel order."""
    return jnp.sort(jax.lax.top_k(scores, n_keep)[1], axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThinK(EvictionMethod):
    """Attributes:
      press: the token method it follows (None only inside a compose, which fills it in).
      key_ratio: fraction of each KV head's key channels pruned (paper: 0.4 / 0.5).
      window: observation window of queries (paper: 32).
    """

    press: EvictionMethod | None = None
    key_ratio: float = 0.5
    window: int = 32

    follows: ClassVar[bool] = True  # a compose folds it around the token method before it

    def __post_init__(self):
        if self.press is not None:  # a plain scorer: its kept set is a dense top-k think can cut
            check_wrapped("think", self.press)
        check_positive(window=self.window)
        if not (isinstance(self.key_ratio, (int, float)) and 0 <= self.key_ratio < 1):
            raise ValueError(f"key_ratio must be in [0, 1), got {self.key_ratio!r}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"think:{self._inner().name}"

    def _inner(self) -> EvictionMethod:
        if self.press is None:
            raise ValueError("think prunes key channels after a token method: write compose(snapkv, think) or "
                             "think:snapkv")
        return self.press

    def observations(self) -> ObsSpec:
        inner = self._inner().observations()
        return dataclasses.replace(inner, window=max(inner.window, self.window))

    def protected(self) -> int:
        return self._inner().protected()

    def layer_keep(self, budget: Budget, n_tokens: int, layer: int, n_layers: int) -> int:
        return self._inner().layer_keep(budget, n_tokens, layer, n_layers)

    def score(self, ctx: ScoreContext):
        return self._inner().score(ctx)

    def decode_rule(self, capacity: int):
        raise ValueError("think stores narrower keys; decode-time eviction (capacity=) is not combined with it")

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        """The inner method's selection, then each KV head's keys cut to its best channels."""
        kept = self._inner().select(ctx, state, scores, n_keep, capacity)
        if not isinstance(kept, DenseKV):
            raise ValueError(f"think prunes the channels of a dense layout; {self._inner().name} gives a "
                             f"{type(kept).__name__}")
        d = kept.k.shape[-1]
        n_channels = d - int(d * self.key_ratio)
        obs = ctx.obs
        scores = channel_scores(obs.q_win[:, -self.window:], obs.win_pos[:, -self.window:], kept.k, kept.length,
                                kept.k.shape[1])
        return ChannelKV.from_dense(kept, kept_channels(scores, n_channels))


WRAPPERS["think"] = ThinK
