"""KVzap (arXiv 2601.07891; kvpress 0.5.5 `KVzapPress`): KVzip's scores predicted
from the hidden states by a small trained model per layer, so scoring costs one matmul per token.

    kvjax train kvzap --steps 300 --out runs/kvzap --data text/        # targets from kvjax's kvzip
    lm.generate(prompt, method="kvzap(checkpoint=runs/kvzap)", ratio=0.5)            # by ratio
    lm.generate(prompt, method="kvzap(checkpoint=runs/kvzap, threshold=-6)")        # by threshold

* **Scorer** (kvpress `KVzapModel`): per layer l, from the layer's attention input h (the hidden state
  after the input RMSNorm, [E]), one score per KV head:
      linear: s = h W_l + b_l                       W_l [E, K]
      mlp:    s = GELU(h W1_l + b1_l) W_l + b_l     W1_l [E, F], W_l [F, K]   (exact erf GELU, torch's)
* **Target** (kvpress `kvzap/data.py`): the log of the token's KVzip score, log max_{replay query, head
  of the group} softmax attention, per layer and KV head. kvpress trains on KVzip+ scores (rows divided
  by ||h_query||, columns weighted by ||W_o v||); kvjax's kvzip has no KVzip+ normalization, so the
  target here is the log of plain KVzip's score, computed by `kvjax.methods.kvzip` (`kvjax.train.kvzap`).
* **Deploy**: by `threshold` (kvpress `ThresholdPress`: every (KV head, token) pair whose predicted log
  score is below the threshold is evicted, the last `window` tokens are always kept; the layers and heads
  keep different numbers of pairs, in a `RaggedKV` pool), or by `ratio=` / `budget=` (kvpress
  `ScorerPress`: each KV head keeps its top tokens). A threshold with a ratio or budget is an error.

The hidden states come from the prefill's observations (`ObsSpec.hidden`: [B, S, E] per layer during
the prefill only, 1.5x the K/V bytes of SmolLM2's layer; dropped after scoring).
The trained weights are read from a `kvjax train kvzap` run directory; a run for another model (config
hash, or layer / width / head counts) is an error at planning, before anything compiles.

Legend: B batch, L layers, K KV heads, S slots, E model width, F MLP hidden width.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from kvjax.checkpoints import load_trained, model_id
from kvjax.methods.adakv import in_capacity, top_pairs
from kvjax.methods.base import EvictionMethod, ScoreContext, register
from kvjax.observe import ObsSpec

SCORE_FLOOR = 1e-30  # KVzip scores are clipped here before the log (an underflowed softmax gives 0)


def predict(params: dict, h: jax.Array) -> jax.Array:
    """Predicted log KVzip scores float32 [..., K] of one layer's hidden states h [..., E] under that
    layer's weights {w [E or F, K], b [K]} (linear), plus {w1 [E, F], b1 [F]} (MLP)."""
    x = h.astype(jnp.float32)
    if "w1" in params:
        x = jax.nn.gelu(x @ params["w1"].astype(jnp.float32) + params["b1"].astype(jnp.float32), approximate=False)
    return x @ params["w"].astype(jnp.float32) + params["b"].astype(jnp.float32)


def log_target(kvzip_scores: jax.Array) -> jax.Array:
    """KVzap's regression target: log of KVzip scores (floored at `SCORE_FLOOR`)."""
    return jnp.log(jnp.maximum(kvzip_scores.astype(jnp.float32), SCORE_FLOOR))


@register("kvzap")
@dataclasses.dataclass(frozen=True, kw_only=True)
class KVzap(EvictionMethod):
    checkpoint: str | None = None  # a `kvjax train kvzap --out` directory
    threshold: float | None = None  # evict pairs whose predicted log KVzip score is below this
    window: int = 128  # threshold mode: the last tokens always kept (kvpress ThresholdPress sliding_window_size)

    def __post_init__(self):
        if self.threshold is not None and (isinstance(self.threshold, bool)
                                           or not isinstance(self.threshold, (int, float))):
            raise ValueError(f"kvzap: threshold must be a number (a log score), got {self.threshold!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise ValueError(f"kvzap: window must be an integer >= 0, got {self.window!r}")
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(Path(self.checkpoint).expanduser().absolute()))

    @property
    def own_budget(self) -> bool:  # type: ignore[override]
        """By threshold the scores alone decide what stays (every layer planned at full length)."""
        return self.threshold is not None

    def bind(self, cfg, ratio=None, budget=None, model_name: str = "") -> "KVzap":
        """The method for a model and request: the checkpoint loaded and checked, threshold xor ratio."""
        if self.threshold is not None and (ratio is not None or budget is not None):
            raise ValueError(f"kvzap: threshold={self.threshold} and {'ratio' if ratio is not None else 'budget'}= "
                             "both set what is evicted; give one")
        self.weights(cfg, model_name)
        return self

    def weights(self, cfg, model_name: str = "") -> dict:
        """The trained scorer {w, b[, w1, b1]} stacked over layers; a ValueError without a checkpoint, or for
        a checkpoint of another method or model."""
        if self.checkpoint is None:
            raise ValueError("kvzap needs a trained scorer: pass checkpoint= (the --out directory of "
                             "`kvjax train kvzap`)")
        return _load_weights(self.checkpoint, cfg, model_name)

    def observations(self) -> ObsSpec:
        return ObsSpec(hidden=True)

    def protected(self) -> int:
        return self.window if self.threshold is not None else 0

    def score(self, ctx: ScoreContext) -> jax.Array:
        """float32 [B, K, S]: the layer's predicted log KVzip score of each slot (slot = position)."""
        if ctx.obs.hidden is None or ctx.obs.hidden.shape[1] != ctx.k.shape[2]:
            raise ValueError("kvzap scores the prefill's hidden states: use it through LM.prefill / LM.generate "
                             "or the eval runner (ObsSpec(hidden=True))")
        # checked by `bind`; checkpoints match a model by its config hash, whatever its name
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x[ctx.layer]), self.weights(ctx.cfg))
        return predict(params, ctx.obs.hidden).transpose(0, 2, 1)

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        """By ratio: each head's top `n_keep` (kvpress ScorerPress). By threshold: exactly the pairs scoring
        >= threshold plus the last `window` tokens, in a `RaggedKV` pool of K * capacity slots."""
        if self.threshold is None:
            return super().select(ctx, state, scores, n_keep, capacity)
        recent = ctx.pos >= (ctx.length[:, None, None] - self.window)
        keep = (scores >= self.threshold) | recent
        state, masked = in_capacity(state, jnp.where(keep, 1.0, -1.0), capacity)
        n_pairs = jnp.sum(masked > 0, axis=(1, 2)).astype(jnp.int32)
        return top_pairs(state, masked, n_pairs, state.k.shape[1] * capacity)

    def plain_scorer(self) -> bool:
        return self.threshold is None


_WEIGHTS: dict = {}  # (checkpoint, cfg) -> host weights: loaded by `bind`, read again while tracing `score`


def _load_weights(checkpoint: str, cfg, model_name: str) -> dict:
    """A checkpoint matches a model by its config hash (`model_name` only names it in errors), so the
    weights are cached per (checkpoint, config)."""
    if (checkpoint, cfg) in _WEIGHTS:
        return _WEIGHTS[checkpoint, cfg]
    params, _, _ = load_trained(checkpoint, KVzap.name, model_id(model_name, cfg))
    w = params["w"]
    width = (params["w1"] if "w1" in params else w).shape[1]
    if w.shape[0] != cfg.n_layers or width != cfg.d_model or w.shape[2] != cfg.n_kv_heads:
        raise ValueError(f"{checkpoint}: a KVzap scorer for {w.shape[0]} layers of width {width} and {w.shape[2]} KV "
                         f"heads; this model has {cfg.n_layers} layers of width {cfg.d_model} and {cfg.n_kv_heads}")
    _WEIGHTS[checkpoint, cfg] = jax.tree_util.tree_map(jax.device_get, params)
    return _WEIGHTS[checkpoint, cfg]
