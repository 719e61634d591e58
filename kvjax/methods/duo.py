"""DuoAttention (Xiao et al. 2024, arXiv 2410.10819): retrieval heads keep the whole cache, streaming heads
keep `sink` attention sinks and the `recent` latest tokens (`kvjax.states.duo.DuoKV`, real bytes).

    lm.generate(prompt, method="duo(gates=runs/duo, sparsity=0.5)")   # trained gates, 50% of heads stream
    lm.generate(prompt, method="duo(gates=runs/duo, threshold=0.3)")  # heads with gate <= 0.3 stream
    lm.generate(prompt, method="duo", ratio=0.5)                      # heads ranked on the fly (kvpress)

Which heads stream:
* `gates=` a `kvjax train duo` run directory (its model is checked) or a `.npy` of gates [L, K] (its
  shape is checked): one gate per layer and KV head, in [0, 1] (clipped, as kvpress's loader does).
  `sparsity=s` streams the round(s·L·K) heads of lowest gate over the whole model (kvpress
  DuoAttentionPress: `argsort(head_scores)[:n_pruned]`; the paper's quantile); `threshold=t` streams the
  heads whose gate is <= t (the reference's `sparsify_attention_heads`: retrieval iff gate > t).
* no `gates=`: kvpress's on-the-fly ranking (`duo_attention_on_the_fly`): the mean pre-RoPE query and
  key are repeated over `q_len` positions and rotated; the score of a head is the area under the
  cumulated attention of the last query (mean over its group): heads whose attention sits on early
  tokens score high and keep everything. kvpress averages the means over 50 BookSum chapters and ranks
  over the whole model; here the means are the prompt's own (so it runs on any prompt, with no data)
  and each layer streams round(s·K) of its heads (a layer's state has static shapes). Needs `sparsity`.
`ratio=` (the eval's compression ratio) is the sparsity when the name gives neither, as kvpress reads
its `head_compression_ratio`.

Semantics (kvpress): the prefill attends to the whole prompt with every head; afterwards the streaming
heads keep their first `sink` and last `recent` tokens; while decoding they keep evicting (the oldest
non-sink token leaves as a new one enters) and the retrieval heads grow. Defaults 128 / 256 (the paper
and kvpress); the official eval scripts use sink 64, recent 256.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.checkpoints import load_trained, model_id
from kvjax.methods.base import EvictionMethod, ScoreContext, register
from kvjax.models.rope import apply_rope, rope_inv_freq
from kvjax.observe import ObsSpec
from kvjax.states.dense import DenseKV
from kvjax.states.duo import DuoKV, _take_heads
from kvjax.states.rolling import RollingKV


@register("duo", "duo_attention")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DuoAttention(EvictionMethod):
    gates: str | None = None  # a `kvjax train duo --out` directory or a .npy of gates [L, K]
    sparsity: float | None = None  # fraction of heads that stream
    threshold: float | None = None  # heads with gate <= threshold stream (needs gates=)
    sink: int = 128
    recent: int = 256
    q_len: int = 500  # on-the-fly ranking: positions the mean query and key are repeated over (kvpress)

    own_budget = True  # heads, not tokens: ratio= is the sparsity, every token of a retrieval head stays

    def __post_init__(self):
        for name in ("sparsity", "threshold"):
            x = getattr(self, name)
            if x is not None and not (isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1):
                raise ValueError(f"duo: {name} must be in [0, 1], got {x!r}")
        if self.sparsity is not None and self.threshold is not None:
            raise ValueError("duo: give sparsity= (a fraction of heads) or threshold= (a gate value), not both")
        for name in ("sink", "recent", "q_len"):
            x = getattr(self, name)
            if not isinstance(x, int) or isinstance(x, bool) or x < (0 if name == "sink" else 1):
                raise ValueError(f"duo: {name} must be an integer >= {0 if name == 'sink' else 1}, got {x!r}")
        if self.gates is not None:
            object.__setattr__(self, "gates", str(Path(self.gates).expanduser().absolute()))

    def bind(self, cfg, ratio=None, budget=None, model_name: str = "") -> "DuoAttention":
        """The method for a model and request: `ratio` read as the sparsity, the gate file checked."""
        if budget is not None:
            raise ValueError("duo streams whole heads: set sparsity= or threshold= (or ratio=), not budget=")
        method = self
        if ratio is not None:
            if self.sparsity is not None or self.threshold is not None:
                raise ValueError(f"duo: ratio={ratio} and the name's sparsity/threshold both set how many heads "
                                 "stream; give one")
            method = dataclasses.replace(self, sparsity=float(ratio))
        if method.sparsity is None and method.threshold is None:
            raise ValueError("duo needs sparsity= or threshold= in its name (duo(sparsity=0.5)), or ratio=")
        if method.threshold is not None and method.gates is None:
            raise ValueError("duo: threshold= compares trained gates: pass gates= too (or use sparsity=)")
        if method.gates is not None:
            load_gates(method.gates, cfg)
        return method

    def observations(self) -> ObsSpec:
        return ObsSpec(qstats_from=0) if self.gates is None else ObsSpec()

    def layer_keep(self, budget, n_tokens: int, layer: int, n_layers: int) -> int:
        return n_tokens  # retrieval heads keep every token

    def score(self, ctx: ScoreContext):
        """The streaming heads' keep order: sinks first, then the most recent (StreamingLLM)."""
        return jnp.where(ctx.pos < self.sink, 2.0 ** 30, ctx.pos.astype(jnp.float32))

    def streaming(self, ctx: ScoreContext) -> tuple[jax.Array, int]:
        """(bool [B, K] the heads of layer `ctx.layer` that stream, how many: static)."""
        b, n_kv = ctx.k.shape[:2]
        if self.gates is not None:
            mask = streaming_mask(load_gates(self.gates, ctx.cfg), self.sparsity, self.threshold)[ctx.layer]
            return jnp.broadcast_to(jnp.asarray(mask), (b, n_kv)), int(mask.sum())
        n = int(round(n_kv * self.sparsity))
        rank = jnp.argsort(jnp.argsort(on_the_fly_scores(ctx, self.q_len), axis=1), axis=1)  # 0 = lowest
        return rank < n, n

    def select(self, ctx: ScoreContext, state, scores, n_keep, capacity: int):
        mask, n_stream = self.streaming(ctx)
        n_kv = ctx.k.shape[1]
        kr = n_kv - n_stream
        heads = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True).astype(jnp.int32)  # retrieval first
        k, v, pos, sc = (_take_heads(x, heads, 1) for x in (state.k, state.v, state.pos, scores))
        part = lambda lo, hi: DenseKV(k=k[:, lo:hi], v=v[:, lo:hi], pos=pos[:, lo:hi], length=state.length)  # noqa: E731
        full = part(0, kr).keep_top(sc[:, :kr], n_keep, capacity) if kr else None
        stream = None
        if n_stream:
            c = self.sink + self.recent if not kr else min(self.sink + self.recent, capacity)
            kept = part(kr, n_kv).keep_top(sc[:, kr:], jnp.minimum(state.length, c), c)
            stream = RollingKV(k=kept.k, v=kept.v, pos=kept.pos, length=kept.length,
                               score=jnp.zeros(kept.pos.shape, jnp.float32), rule="streaming", n_sink=self.sink)
        return DuoKV(full=full, stream=stream, heads=heads)


def streaming_mask(gates: np.ndarray, sparsity: float | None = None, threshold: float | None = None) -> np.ndarray:
    """bool [L, K]: the heads that stream, from gates [L, K]: the round(sparsity·L·K) lowest gates (ties
    by index, kvpress), or those <= threshold (the reference's `sparsify_attention_heads`)."""
    gates = np.asarray(gates, np.float64)
    if threshold is not None:
        return gates <= threshold
    mask = np.zeros(gates.size, bool)
    mask[np.argsort(gates, axis=None, kind="stable")[:int(round(gates.size * sparsity))]] = True
    return mask.reshape(gates.shape)


def on_the_fly_scores(ctx: ScoreContext, q_len: int) -> jax.Array:
    """float32 [B, K] kvpress's `duo_attention_on_the_fly` score of each KV head of the layer, from the
    prompt's mean pre-RoPE query (observed) and key (the stored keys rotated back by their positions)."""
    o, cfg = ctx.obs, ctx.cfg
    b, n_kv, _, d = ctx.k.shape
    inv_freq = jnp.asarray(rope_inv_freq(cfg, ctx.layer))
    used = ctx.used[..., None]  # [B, 1, S, 1]
    k_pre = apply_rope(ctx.k.astype(jnp.float32), -jnp.where(used[..., 0], ctx.pos, 0), inv_freq)
    mu_k = jnp.sum(jnp.where(used, k_pre, 0.0), axis=2) / jnp.maximum(ctx.length, 1)[:, None, None]  # [B, K, D]
    mu_q = o.q_sum / jnp.maximum(o.q_cnt, 1.0)[:, None, None]  # [B, H, D]
    p = jnp.arange(q_len, dtype=jnp.int32)
    q = apply_rope(mu_q, jnp.full(mu_q.shape[:2], q_len - 1), inv_freq).reshape(b, n_kv, -1, d)  # [B, K, G, D]
    k = apply_rope(jnp.broadcast_to(mu_k[:, :, None], (b, n_kv, q_len, d)), p[None, None], inv_freq)  # [B, K, P, D]
    attn = jax.nn.softmax(jnp.einsum("bkgd,bkpd->bkgp", q, k) * d ** -0.5, axis=-1)
    return jnp.cumsum(attn, axis=-1).mean(-1).mean(-1)


def load_gates(path: str, cfg) -> np.ndarray:
    """float32 [L, K] gates in [0, 1] from a `kvjax train duo` run directory (its model checked, by config
    hash) or a .npy; a one-line ValueError for a file that is not for this model."""
    gates = _read_gates(path, model_id("", cfg))  # checkpoints match a model by its config hash alone
    want = (cfg.n_layers, cfg.n_kv_heads)
    if gates.shape != want:
        raise ValueError(f"duo: {path} holds gates of shape {list(gates.shape)}, this model has {want[0]} layers x "
                         f"{want[1]} KV heads: a gate file for another model")
    return gates


@functools.lru_cache(maxsize=8)
def _read_gates(path: str, model: str) -> np.ndarray:
    p = Path(path)
    if p.is_dir():
        with jax.ensure_compile_time_eval():  # first read inside a trace (a method not bound by a plan)
            params, _, _ = load_trained(p, "duo", model)
        gates = np.asarray(params["gates"])
    elif p.suffix == ".npy" and p.is_file():
        gates = np.load(p)
    else:
        raise ValueError(f"duo: gates= must be a `kvjax train duo` run directory or a .npy file, got {path}")
    if gates.ndim != 2 or not np.issubdtype(gates.dtype, np.floating):
        raise ValueError(f"duo: {path} holds {gates.dtype} of shape {list(gates.shape)}, expected float gates [L, K]")
    return np.clip(gates, 0, 1).astype(np.float32)
