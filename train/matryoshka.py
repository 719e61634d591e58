"""MatryoshkaKV (Lin et al. 2024, arXiv 2410.14731): trainable orthogonal projections of keys and values.

Per layer l and KV head k, orthogonal U_k, U_v [D, D]; the cache keeps the first r columns'
coordinates (`kvjax.states.latent.LatentKV`). Training makes every prefix U[:, :r] good at once:

* Parametrization (the paper's Cayley parametrization): U = U_0 · Cayley(A), Cayley(A) =
  (I - A)(I + A)^-1 with A skew-symmetric built from the strict upper triangle of W, so U stays
  exactly orthogonal whatever W; W (the trainable leaf) starts at 0, hence U starts at U_0. The map
  from (W, U_0) to U is core (`kvjax.checkpoints.matryoshka_bases`): inference computes it too.
* Initialization (the paper's PCA initialization): U_0 = the principal axes of calibration
  activations, columns sorted by decreasing variance: eigenvectors of the second moment
  (1/N) sum_t x_t x_t^T of the post-RoPE keys (values) of each head. No centering: the projection
  has no bias, so the uncentered moment is the one whose top-r subspace minimizes the
  reconstruction error. At full rank U U^T = I and the model is unchanged.
* Nested ranks ("Matryoshka training"): every step draws, per layer, head and K/V, a rank
  r = (D / n_levels) · j with j uniform in {1..n_levels} (D = 64, 8 levels: 8, 16, ..., 64) and
  truncates U to r columns (columns past r multiplied by 0: training keeps static shapes).
* Loss (distillation, the weights of METHODS.md): 0.25 · KL(teacher || student) + 0.75 ·
  CE(student, next token), the teacher being the same frozen model with the full cache.
* Rank search (greedy allocation): at a target fraction of the full K/V bytes, per layer
  ranks for keys and values, lowering one level at a time the (layer, K/V) whose next level costs
  least, the cost being the KL measured on calibration tokens with only that layer truncated
  (one-at-a-time sensitivities, summed as if independent). Ranks are per layer (shared by its
  heads) so a layer state has one static shape; the paper allocates per head.

Legend: B batch, T tokens, L layers, K KV heads, D head dim, R rank, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import pipeline
from kvjax.checkpoints import cayley, matryoshka_bases, model_id  # noqa: F401 (cayley: kvjax.train.cayley)
from kvjax.states import KVCache
from kvjax.states.latent import latent_cache
from kvjax.models.config import LlamaConfig


def pca_basis(x: np.ndarray) -> np.ndarray:
    """Principal axes of x [B, K, T, D] per head: [K, D, D], columns by decreasing second moment."""
    x = np.asarray(x, np.float64)
    moment = np.einsum("bktd,bkte->kde", x, x) / (x.shape[0] * x.shape[2])
    _, vecs = np.linalg.eigh(moment)  # ascending eigenvalues
    return vecs[:, :, ::-1].copy()


@dataclasses.dataclass(frozen=True)
class MatryoshkaTask:
    """The MatryoshkaKV compressor of one model, as a training task (`kvjax.train.loop`).

    Attributes:
      cfg: the backbone's config.  model_name: recorded in checkpoints (with a hash of `cfg`).
      n_levels: nested ranks are multiples of head_dim / n_levels (paper: 8 levels of 16 at D = 128).
      kl_weight, ce_weight: the loss weights (paper: 0.25, 0.75).
    """

    cfg: LlamaConfig
    model_name: str
    n_levels: int = 8
    kl_weight: float = 0.25
    ce_weight: float = 0.75
    name: ClassVar[str] = "matryoshka"

    def __post_init__(self):
        if not isinstance(self.n_levels, int) or self.n_levels < 1 or self.cfg.head_dim % self.n_levels:
            raise ValueError(f"n_levels must be an integer >= 1 dividing head_dim {self.cfg.head_dim}, "
                             f"got {self.n_levels!r}")

    @property
    def step_rank(self) -> int:
        return self.cfg.head_dim // self.n_levels

    def meta(self) -> dict:
        return {"method": self.name, "model": model_id(self.model_name, self.cfg), "n_levels": self.n_levels}

    # ------------------------------------------------------------------------------- training
    def init(self, backbone, calib_tokens) -> tuple[dict, dict]:
        """(params {a_k, a_v: [L, K, D, D] zeros}, const {u0_k, u0_v: [L, K, D, D] PCA bases}) from the
        post-RoPE K/V of calib_tokens [B, T + 1] (the first T are fed)."""
        cfg = self.cfg
        x = calib_tokens[:, :-1]
        _, cache = jax.jit(pipeline.forward, static_argnums=1)(backbone, cfg, x)
        u0_k = np.stack([pca_basis(layer.k) for layer in cache.layers])
        u0_v = np.stack([pca_basis(layer.v) for layer in cache.layers])
        dt = cfg.jnp_dtype
        params = {"a_k": jnp.zeros(u0_k.shape, dt), "a_v": jnp.zeros(u0_v.shape, dt)}
        return params, {"u0_k": jnp.asarray(u0_k, dt), "u0_v": jnp.asarray(u0_v, dt)}

    def bases(self, params, const) -> tuple[jax.Array, jax.Array]:
        """U_k, U_v [L, K, D, D] (orthogonal; truncate columns for a rank): `kvjax.checkpoints.matryoshka_bases`,
        which inference uses too."""
        return matryoshka_bases(params, const)

    def sample_ranks(self, key) -> jax.Array:
        """int32 [2, L, K]: a rank per (K or V, layer, head), uniform over the nested levels."""
        levels = jax.random.randint(key, (2, self.cfg.n_layers, self.cfg.n_kv_heads), 1, self.n_levels + 1)
        return levels * self.step_rank

    def student_logits(self, params, const, backbone, x, ranks_k, ranks_v):
        """Logits [B, T, V] with K/V projected at ranks_k, ranks_v (int [L, K] or broadcastable, traced):
        full-width bases whose columns past the rank are zero (exactly the rank-r attention)."""
        uk, uv = self.bases(params, const)
        cols = jnp.arange(self.cfg.head_dim)
        uk = uk * (cols < jnp.asarray(ranks_k)[..., None])[..., None, :]
        uv = uv * (cols < jnp.asarray(ranks_v)[..., None])[..., None, :]
        cache = latent_cache(list(uk), list(uv), x.shape[0], x.shape[1], self.cfg.jnp_dtype)
        return pipeline.forward(backbone, self.cfg, x, cache)[0]

    def teacher_logits(self, backbone, x):
        return jax.lax.stop_gradient(pipeline.forward(backbone, self.cfg, x)[0])

    def loss(self, params, const, backbone, tokens, key):
        """0.25 KL(teacher || student) + 0.75 CE on tokens int32 [B, T + 1], ranks drawn with `key`."""
        x, y = tokens[:, :-1], tokens[:, 1:]
        ranks = self.sample_ranks(key)
        student = self.student_logits(params, const, backbone, x, ranks[0], ranks[1])
        kl, ce = kl_divergence(self.teacher_logits(backbone, x), student), cross_entropy(student, y)
        return self.kl_weight * kl + self.ce_weight * ce, {"kl": kl, "ce": ce}

    # ----------------------------------------------------------------------------- inference
    def cache(self, params, const, ranks_k, ranks_v, batch: int, capacity: int) -> KVCache:
        """An empty cache of `LatentKV` layers at per-layer ranks (tuples of L ints): real stored sizes."""
        uk, uv = self.bases(params, const)
        for name, ranks in (("ranks_k", ranks_k), ("ranks_v", ranks_v)):
            if len(ranks) != self.cfg.n_layers or not all(1 <= r <= self.cfg.head_dim for r in ranks):
                raise ValueError(f"{name} must hold {self.cfg.n_layers} ranks in [1, {self.cfg.head_dim}], "
                                 f"got {tuple(ranks)}")
        return latent_cache([u[:, :, :r] for u, r in zip(uk, ranks_k)], [u[:, :, :r] for u, r in zip(uv, ranks_v)],
                            batch, capacity, self.cfg.jnp_dtype)

    def search_ranks(self, params, const, backbone, tokens, fraction: float) -> tuple[tuple, tuple, float]:
        """Greedy per-layer ranks (ranks_k, ranks_v, KL at those ranks) storing at most `fraction` of the
        full K/V bytes per token, from calibration tokens int32 [B, T + 1]."""
        n, n_layers = self.n_levels, self.cfg.n_layers
        if not 1 / n <= fraction <= 1:
            raise ValueError(f"cache fraction must be in [1/{n}, 1] (the smallest rank is head_dim/{n}), "
                             f"got {fraction!r}")
        x = jnp.asarray(tokens)[:, :-1]
        teacher = jax.jit(self.teacher_logits)(backbone, x)

        def kl_at(levels_k, levels_v):  # int [L] each
            return float(_kl_at_levels(self, params, const, backbone, x, teacher, jnp.asarray(levels_k, jnp.int32),
                                       jnp.asarray(levels_v, jnp.int32)))

        full = np.full(n_layers, n, np.int32)
        base = kl_at(full, full)
        cost = np.zeros((2, n_layers, n + 1))  # cost[kind, layer, level]: KL with only that one truncated
        cost[:, :, n] = base
        for kind in range(2):
            for layer in range(n_layers):
                for level in range(1, n):
                    levels = full.copy()
                    levels[layer] = level
                    cost[kind, layer, level] = kl_at(levels, full) if kind == 0 else kl_at(full, levels)
        levels = np.full((2, n_layers), n)
        budget = int(np.floor(fraction * 2 * n_layers * n + 1e-9))
        while levels.sum() > budget:
            delta = np.where(levels > 1, np.take_along_axis(cost, np.maximum(levels - 1, 0)[..., None], 2)[..., 0]
                             - np.take_along_axis(cost, levels[..., None], 2)[..., 0], np.inf)
            kind, layer = np.unravel_index(np.argmin(delta), delta.shape)
            levels[kind, layer] -= 1
        ranks = levels * self.step_rank
        kl = kl_at(levels[0], levels[1])
        return tuple(int(r) for r in ranks[0]), tuple(int(r) for r in ranks[1]), kl


@functools.partial(jax.jit, static_argnums=0)
def _kl_at_levels(task: MatryoshkaTask, params, const, backbone, x, teacher, levels_k, levels_v):
    """KL(teacher || student) with every head of layer l at rank levels_{k,v}[l] * step_rank (int32 [L])."""
    student = task.student_logits(params, const, backbone, x, levels_k[:, None] * task.step_rank,
                                  levels_v[:, None] * task.step_rank)
    return kl_divergence(teacher, student)


def kl_divergence(teacher, student) -> jax.Array:
    """Mean over positions of KL(softmax(teacher) || softmax(student)), logits [B, T, V]."""
    logp_t = jax.nn.log_softmax(teacher.astype(jnp.float32), axis=-1)
    logp_s = jax.nn.log_softmax(student.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1))


def cross_entropy(logits, targets) -> jax.Array:
    """Mean next-token cross-entropy of logits [B, T, V] on targets int [B, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
