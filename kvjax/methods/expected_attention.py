"""ExpectedAttention (Devoto et al. 2025, kvpress): score keys by the attention *future* queries are
expected to pay them, modelling queries as Gaussian.

Follows kvpress 0.5.5 `ExpectedAttentionPress`: mean mu and covariance Sigma of the pre-RoPE queries at
positions [n_sink, T) (per query head, biased covariance); R = the RoPE rotation averaged over the
future positions [T, T + n_future); z_j = (R mu) . k_j / sqrt(D) + k_j^T (R Sigma R^T) k_j / (2 D);
softmax over the non-sink keys; mean over each KV group; times ||v_j|| (plus epsilon); the n_sink
first tokens get `max + 1`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.methods.base import EvictionMethod, ScoreContext, check_positive, group_mean, protect, register
from kvjax.models.rope import rope_inv_freq
from kvjax.observe import ObsSpec


def mean_rotation(ctx: ScoreContext, n_future: int) -> jax.Array:
    """RoPE rotation matrices averaged over positions [T, T + n_future): float32 [B, D, D]."""
    inv = jnp.asarray(rope_inv_freq(ctx.cfg, ctx.layer))  # [D/2]
    pos = ctx.n_tokens[:, None].astype(jnp.float32) + jnp.arange(n_future, dtype=jnp.float32)  # [B, F]
    ang = pos[..., None] * inv  # [B, F, D/2]
    c, s = jnp.cos(ang).mean(1), jnp.sin(ang).mean(1)  # [B, D/2]
    c, s = jnp.concatenate([c, c], -1), jnp.concatenate([s, s], -1)  # [B, D]
    half = inv.shape[0]
    eye = jnp.eye(half)
    rot_half = jnp.block([[jnp.zeros_like(eye), -eye], [eye, jnp.zeros_like(eye)]])  # x -> rotate_half(x)
    return jax.vmap(lambda ci, si: jnp.diag(ci) + rot_half * si[None, :])(c, s)


@register("expected_attention")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpectedAttention(EvictionMethod):
    n_future: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self):
        check_positive(n_future=self.n_future)
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be an integer >= 0, got {self.n_sink!r}")

    def observations(self) -> ObsSpec:
        return ObsSpec(qstats_from=self.n_sink)

    def protected(self) -> int:
        return self.n_sink

    def score(self, ctx: ScoreContext):
        o = ctx.obs
        n = jnp.maximum(o.q_cnt, 1.0)[:, None, None]
        mu = o.q_sum / n  # [B, H, D]
        cov = o.q_sq / n[..., None] - mu[..., :, None] * mu[..., None, :]  # [B, H, D, D]
        return self.expected_scores(ctx, mu, cov)

    def expected_scores(self, ctx: ScoreContext, mu, cov):
        """Scores from the pre-RoPE query mean mu [B, H, D] and covariance cov [B, H, D, D]."""
        rot = mean_rotation(ctx, self.n_future)  # [B, D, D]
        mu_r = jnp.einsum("bij,bhj->bhi", rot, mu)
        k = ctx.k.astype(jnp.float32)
        g, d = ctx.cfg.group, k.shape[-1]
        kh = jnp.repeat(k, g, axis=1)  # [B, H, S, D]
        z = jnp.einsum("bhd,bhsd->bhs", mu_r, kh) / jnp.sqrt(d)
        if self.use_covariance:
            cov_r = jnp.einsum("bij,bhjk,blk->bhil", rot, cov, rot)
            z = z + jnp.einsum("bhsi,bhij,bhsj->bhs", kh, cov_r, kh) / d / 2
        sink = ctx.pos < self.n_sink  # [B, K, S]
        scored = jnp.repeat(ctx.used & ~sink, g, axis=1)
        z = jax.nn.softmax(jnp.where(scored, z, -jnp.inf), axis=-1)
        scores = group_mean(z, ctx.k.shape[1])
        if self.use_vnorm:
            scores = (scores + self.epsilon) * jnp.linalg.norm(ctx.v.astype(jnp.float32), axis=-1)
        # slots past the length score 0 (with epsilon > 0 they would get epsilon * ||v|| and raise the max)
        return protect(jnp.where(ctx.used, scores, 0.0), sink)
