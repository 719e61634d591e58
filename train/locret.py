"""Locret training (Huang et al. 2024, arXiv 2410.01805): retaining heads that predict causal importance.

The backbone is frozen; per layer a `kvjax.states.locret.RetainingHead` maps a token's pre-RoPE [q, k, v]
to one score per KV head. Inference (chunked prefill with eviction) is `kvjax.states.locret`.

* **Labels** (Locret §3.2, reference `train/data_gen.py`): each training window of T tokens is split
  into a prefix of P tokens (the context) and its last R = T - P tokens (the reference's response:
  the queries). The causal importance of prefix token j for KV head k is the largest pre-softmax
  attention logit it receives from a later query of that head's group,

      y[k, j] = max_{i in response, g in group(k)} q_i^(g) · k_j / sqrt(D)      (post-RoPE q, k)

  a max over the GQA group and over the response queries, with no softmax and no transform.
* **Loss** (reference `train/train.py`): SmoothL1 (beta 1) between prediction and label, averaged
  over layers, KV heads and prefix tokens, plus 0.0025 times the smoothness term: per layer the mean
  squared difference of adjacent tokens' predictions, summed over layers.
* Parameters: fc1 [L, (H + 2K) D, F] and fc2 [L, F, K] kernels stacked over layers, applied with
  `jax.vmap` over the layer axis; at inference each layer's head rides in its `LocretKV` state.

Legend: B batch, T window tokens, P prefix (labelled) tokens, R response (query) tokens, L layers,
K KV heads, G = H/K, D head dim, E = (H + 2K) D head input, F head hidden size.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax import pipeline
from kvjax.checkpoints import model_id
from kvjax.states.locret import HIDDEN, RetainingHead
from kvjax.models.config import LlamaConfig
from kvjax.models.rope import apply_rope, rope_inv_freq


def causal_importance(qkv, cfg: LlamaConfig, n_prefix: int, layer: int):
    """Labels float32 [B, K, P] from layer `layer`'s pre-RoPE features qkv [B, T, E] of tokens at positions
    0..T-1 (rotated with that layer's RoPE, `cfg.rope_for(layer)`): for each prefix token (P = n_prefix)
    the max over the response queries (positions >= P) and the query heads of its KV group of the scaled
    attention logit. Memory: [B, K, G, R, P] logits."""
    b, t, _ = qkv.shape
    h, n_kv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k = qkv[..., : h * d].reshape(b, t, h, d), qkv[..., h * d: (h + n_kv) * d].reshape(b, t, n_kv, d)
    inv_freq = jnp.asarray(rope_inv_freq(cfg, layer))
    pos = jnp.arange(t, dtype=jnp.int32)[None, :, None]
    q = apply_rope(q, pos, inv_freq).astype(jnp.float32)[:, n_prefix:].reshape(b, t - n_prefix, n_kv, h // n_kv, d)
    k = apply_rope(k, pos, inv_freq).astype(jnp.float32)[:, :n_prefix]
    logits = jnp.einsum("brkgd,bpkd->bkgrp", q, k) * d ** -0.5
    return logits.max(axis=(2, 3))


def smooth_l1(x) -> jax.Array:
    """Elementwise SmoothL1 of a difference x (beta 1, torch's `SmoothL1Loss`)."""
    ax = jnp.abs(x)
    return jnp.where(ax < 1, 0.5 * x * x, ax - 0.5)


@dataclasses.dataclass(frozen=True)
class LocretTask:
    """Locret's retaining heads of one model, as a training task (`kvjax.train.loop`).

    Attributes:
      cfg: the backbone's config.  model_name: recorded in checkpoints (with a hash of `cfg`).
      hidden: the heads' hidden size F (paper: 1024).
      response: fraction of each window whose tokens are the label queries (the rest is labelled).
      smooth_weight: weight of the smoothness term (paper: 0.0025).  seed: the heads' initialization.
    """

    cfg: LlamaConfig
    model_name: str
    hidden: int = HIDDEN
    response: float = 0.25
    smooth_weight: float = 0.0025
    seed: int = 0
    name: ClassVar[str] = "locret"

    def __post_init__(self):
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"hidden must be an integer >= 1, got {self.hidden!r}")
        if not 0 < self.response < 1:
            raise ValueError(f"response must be a fraction in (0, 1), got {self.response!r}")

    def meta(self) -> dict:
        return {"method": self.name, "model": model_id(self.model_name, self.cfg), "hidden": self.hidden}

    @property
    def head(self) -> RetainingHead:
        return RetainingHead(self.hidden, self.cfg.n_kv_heads)

    def n_prefix(self, t: int) -> int:
        p = int(round(t * (1 - self.response)))
        if not 1 <= p < t:
            raise ValueError(f"a window of {t} tokens leaves no prefix or no response at response={self.response}")
        return p

    def init(self, backbone, calib_tokens) -> tuple[dict, dict]:
        """(params {fc1: {kernel [L, E, F]}, fc2: {kernel [L, F, K]}}, const {}): N(0, 0.02) kernels."""
        c = self.cfg
        width = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
        keys = jax.random.split(jax.random.key(self.seed), c.n_layers)
        params = jax.vmap(lambda key: self.head.init(key, jnp.zeros((1, width), jnp.float32))["params"])(keys)
        return params, {}

    def features(self, backbone, x):
        """Pre-RoPE [q, k, v] of every layer, float32 [L, B, T, E], for tokens x [B, T] from position 0."""
        _, _, sown = pipeline.forward(backbone, self.cfg, x, capture=True)
        feats = jnp.stack([sown[f"layers_{i}"]["attn"]["qkv"][0] for i in range(self.cfg.n_layers)])
        return jax.lax.stop_gradient(feats.astype(jnp.float32))

    def predict(self, params, feats):
        """Scores float32 [L, B, K, T] of features [L, B, T, E]."""
        return jax.vmap(lambda p, f: self.head.apply({"params": p}, f))(params, feats).transpose(0, 1, 3, 2)

    def loss(self, params, const, backbone, tokens, key):
        """SmoothL1 to the causal-importance labels + smoothness, on the first T of tokens [B, T + 1]."""
        x = tokens[:, :-1]
        p = self.n_prefix(x.shape[1])
        feats = self.features(backbone, x)
        labels = jnp.stack([causal_importance(f, self.cfg, p, i) for i, f in enumerate(feats)])  # [L, B, K, P]
        pred = self.predict(params, feats)[..., :p]
        fit = jnp.mean(smooth_l1(pred - labels))
        smooth = jnp.sum(jnp.mean(jnp.square(pred[..., 1:] - pred[..., :-1]), axis=(1, 2, 3)))
        return fit + self.smooth_weight * smooth, {"fit": fit, "smooth": smooth,
                                                   "top10": top_overlap(pred, labels, 0.1)}


def top_overlap(pred, labels, fraction: float) -> jax.Array:
    """Mean fraction of each head's top `fraction` tokens by label that are also top by prediction
    (the reference's training "acc"), for scores [..., P]."""
    n = max(1, int(pred.shape[-1] * fraction))
    top = lambda s: jax.nn.one_hot(jax.lax.top_k(s, n)[1], s.shape[-1]).sum(-2)  # noqa: E731  [..., P] 0/1
    return jnp.mean(jnp.sum(top(pred) * top(labels), axis=-1) / n)
