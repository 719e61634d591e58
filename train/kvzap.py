"""KVzap training (arXiv 2601.07891; kvpress `kvzap/train.py`): a per-layer scorer that maps a token's
hidden state to its log KVzip score, fitted by mean squared error on targets from kvjax's KVzip.

* **Targets** (`collect`): text windows of `context` tokens, each in the model's chat frame (the template's
  text before the user message, then the window), are prefilled with the hidden-state observation
  (`ObsSpec.hidden`) and replayed by `kvjax.methods.kvzip.KVzip` (its reconstruction pass, chunked); per
  window `sample` context tokens are drawn at random (kvpress: 500 of ~1000) and give rows
  (x: hidden states [L, E] after each layer's input norm, y: log KVzip score [L, K], `log_target`).
  The table is computed once per run and saved in `OUT/targets.npz` (a resumed run reads it back, so
  it trains on the very same rows).
* **Model** (`kvjax.methods.kvzap.predict`): linear [E, K] per layer, or (`hidden` F > 0) a one-layer
  GELU MLP E -> F -> K (kvpress: 512); weights stacked over layers, torch's `nn.Linear` initialization
  (uniform +-1/sqrt(fan_in)), the output bias started at the targets' mean per layer and head.
  kvpress fits the linear scorer by ridge regression; here both are trained by AdamW (`kvjax.train.loop`).
* **Batches** (`RowBatches`): step s draws B x (T + 1) row indices from `seed` and s alone (a resumed run
  repeats an uninterrupted one); the loss is the MSE over rows, layers and heads (kvpress `MSELoss`).

Legend: N rows, L layers, E model width, K KV heads, F MLP hidden width.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import generation
from kvjax.checkpoints import model_id
from kvjax.methods.kvzap import log_target, predict
from kvjax.methods.kvzip import KVzip
from kvjax.models.config import LlamaConfig
from kvjax.observe import ObsSpec
from kvjax.shapes import bucket
from kvjax.states.cache import model_cache

TARGETS_FILE = "targets.npz"


def collect(params, cfg: LlamaConfig, tokenizer, tokens: np.ndarray, *, n_windows: int, context: int, sample: int,
            seed: int = 0, batch: int = 4, chunk_size: int = 2048) -> dict:
    """{"x": [N, L, E] float32 hidden states, "y": [N, L, K] float32 log KVzip scores} of `sample` random
    tokens in each of `n_windows` windows of `context` tokens cut evenly from `tokens` [M]; also "window"
    int32 [N] (the row's window), "slot" int32 [N] (its position in the prompt: the chat frame's tokens, then
    the window) and "kvzip" [N, L, K] (the raw scores)."""
    if sample > context:
        raise ValueError(f"kvzap: --sample {sample} exceeds the window's {context} tokens")
    if len(tokens) < context:
        raise ValueError(f"kvzap: the data holds {len(tokens)} tokens, fewer than one window of {context}")
    starts = np.linspace(0, len(tokens) - context, n_windows).astype(np.int64)
    kvzip = KVzip(chunk_size=chunk_size)
    prompt = kvzip.replay_prompt(tokenizer)
    before = np.asarray(tokenizer.encode(tokenizer.chat_frame()[0], add_special_tokens=False), np.int32)
    rng = np.random.default_rng(seed)
    xs, zs, ws, ps = [], [], [], []
    for b0 in range(0, n_windows, batch):
        rows = [np.concatenate([before, tokens[s:s + context]]) for s in starts[b0:b0 + batch]]
        ids = np.stack(rows).astype(np.int32)
        lengths = np.full(len(rows), ids.shape[1], np.int32)
        cache = model_cache(cfg, len(rows), bucket(ids.shape[1]))
        _, cache, obs = generation.prefill(params, cfg, ids, lengths, cache, observe=ObsSpec(hidden=True))
        hidden = np.stack([np.asarray(o.hidden, np.float32) for o in obs], 2)  # [B, S, L, E]
        del obs
        _, replay = kvzip.replay(params, cfg, cache, ids, lengths, prompt)
        scores = np.stack([np.asarray(o.replay, np.float32) for o in replay], 1).transpose(0, 3, 1, 2)  # [B, S, L, K]
        for r in range(len(rows)):
            pick = prompt.prefix + np.sort(rng.choice(context, sample, replace=False))
            xs.append(hidden[r, pick])
            zs.append(scores[r, pick])
            ws.append(np.full(sample, b0 + r, np.int32))
            ps.append(pick.astype(np.int32))
    z = np.concatenate(zs)
    return {"x": np.concatenate(xs), "y": np.asarray(log_target(z)), "kvzip": z, "window": np.concatenate(ws),
            "slot": np.concatenate(ps)}


def load_or_collect(out_dir: Path, key: str, make) -> dict:
    """The target table saved in `out_dir` under the collection settings `key`, else `make()` saved there."""
    path = Path(out_dir) / TARGETS_FILE
    if path.is_file():
        with np.load(path) as f:
            if str(f["key"]) != key:
                raise ValueError(f"{path} holds the targets of other settings ({f['key']}; this run: {key}): "
                                 "pick a new output directory")
            return {k: f[k] for k in f.files if k != "key"}
    table = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, key=np.asarray(key), **table)
    tmp.replace(path)
    return table


@dataclasses.dataclass(frozen=True)
class RowBatches:
    """Step s -> int32 [batch, seq_len + 1] row indices in [0, n_rows), a function of (seed, s) alone."""

    n_rows: int
    seq_len: int
    batch: int
    seed: int = 0

    def __getitem__(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(step)])
        return rng.integers(0, self.n_rows, (self.batch, self.seq_len + 1)).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class KVzapTask:
    """KVzap's scorer of one model as a training task (`kvjax.train.loop`). Its "backbone" argument is
    the target table {"x": [N, L, E], "y": [N, L, K]} and its batches are row indices (`RowBatches`).

    Attributes: cfg, model_name: the model (recorded in checkpoints with its config hash).
      hidden: 0 for the linear scorer, else the MLP's hidden width F.  seed: the initialization.
    """

    cfg: LlamaConfig
    model_name: str
    hidden: int = 512
    seed: int = 0
    name: ClassVar[str] = "kvzap"

    def __post_init__(self):
        if not isinstance(self.hidden, int) or isinstance(self.hidden, bool) or self.hidden < 0:
            raise ValueError(f"kvzap: hidden must be 0 (linear) or an MLP width >= 1, got {self.hidden!r}")

    def meta(self) -> dict:
        return {"method": self.name, "model": model_id(self.model_name, self.cfg), "hidden": self.hidden}

    def init(self, data, calib) -> tuple[dict, dict]:
        """params {w [L, E or F, K], b [L, K]} (+ {w1 [L, E, F], b1 [L, F]} for the MLP), const {}."""
        n_layers, e, k = self.cfg.n_layers, self.cfg.d_model, self.cfg.n_kv_heads
        keys = jax.random.split(jax.random.key(self.seed), 3)
        uniform = lambda key, shape, fan_in: jax.random.uniform(  # noqa: E731  torch nn.Linear's init
            key, shape, jnp.float32, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        width = self.hidden or e
        params = {"w": uniform(keys[0], (n_layers, width, k), width),
                  "b": jnp.mean(jnp.asarray(data["y"], jnp.float32), axis=0)}
        if self.hidden:
            params["w1"] = uniform(keys[1], (n_layers, e, self.hidden), e)
            params["b1"] = uniform(keys[2], (n_layers, self.hidden), e)
        return params, {}

    def predict(self, params, x):
        """float32 [..., L, K] of hidden states x [..., L, E]."""
        return jax.vmap(predict, in_axes=(0, -2), out_axes=-2)(params, x)

    def loss(self, params, const, data, rows, key):
        """MSE between predicted and target log KVzip scores of the rows `rows` int32 [B, T + 1]."""
        x, y = data["x"][rows], data["y"][rows]
        err = self.predict(params, x) - y
        mse = jnp.mean(jnp.square(err))
        return mse, {"mae": jnp.mean(jnp.abs(err))}


def correlations(pred: np.ndarray, target: np.ndarray, window: np.ndarray) -> dict:
    """Pearson and Spearman correlation of predicted and target scores [N, L, K], computed per (window,
    layer, head) over the window's tokens and averaged; plus the same over all rows at once ("pooled")."""
    def pearson(a, b):
        a, b = a - a.mean(0), b - b.mean(0)
        return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0) + 1e-30)

    def ranks(a):
        return np.argsort(np.argsort(a, axis=0, kind="stable"), axis=0, kind="stable").astype(np.float64)

    per_p, per_s = [], []
    for w in np.unique(window):
        a, b = pred[window == w].astype(np.float64), target[window == w].astype(np.float64)
        per_p.append(pearson(a, b))
        per_s.append(pearson(ranks(a), ranks(b)))
    flat_p, flat_t = pred.reshape(len(pred), -1).ravel(), target.reshape(len(target), -1).ravel()
    return {"pearson": float(np.mean(per_p)), "spearman": float(np.mean(per_s)),
            "pearson_pooled": float(pearson(flat_p[:, None], flat_t[:, None])[0]),
            "spearman_pooled": float(pearson(ranks(flat_p[:, None]), ranks(flat_t[:, None]))[0]),
            "per_layer_spearman": np.mean(per_s, axis=(0, 2)).tolist()}
