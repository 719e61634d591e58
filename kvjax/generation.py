"""Chunked prefill and the `lax.while_loop` decoder: the jitted programs behind `LM`.

Legend: B batch, T prompt tokens (padded to a bucket), C prefill chunk, N decode buffer, V vocab.

* `prefill_chunk`: C tokens of every row through the model onto the cache (donated). A prompt is
  right-padded and fed chunk by chunk, so attention never holds more than [C, block] scores per head.
* `decode`: up to N new tokens per row in one `lax.while_loop` (cache donated); each row stops on
  an end-of-sequence id; the loop stops when every row is done, after `max_steps`, or when the cache
  is full.

Shapes are bucketed (`bucket`) so a sweep over prompt lengths compiles a handful of programs.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.states.cache import KVCache
from kvjax.models.config import LlamaConfig
from kvjax.models import model_for
from kvjax.observe import ObsSpec, init_layer_obs
from kvjax.shapes import PREFILL_CHUNK

@dataclasses.dataclass(frozen=True)
class Sampler:
    """Next-token rule: greedy when temperature == 0, else softmax(logits / T) with top-k / top-p filtering."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, np.integer):
            object.__setattr__(self, "top_k", int(self.top_k))
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def __call__(self, logits, key):  # logits float32 [B, V] -> int32 [B]
        if self.temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[-1]:  # top_k >= V keeps everything (as in HF)
            kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p < 1:
            sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
            cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            n_keep = jnp.sum(cum - jax.nn.softmax(sorted_desc, axis=-1) < self.top_p, axis=-1, keepdims=True)
            cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "all_logits", "observe"), donate_argnames=("cache", "obs"))
def prefill_chunk(params, tokens, n_valid, cache: KVCache, last_logits, obs=None, *, cfg: LlamaConfig,
                  all_logits: bool = False, observe: ObsSpec | None = None):
    """Feed one chunk. tokens int32 [B, C]; n_valid int32 [B] real tokens of each row in this chunk.

    Returns (logits, cache, obs): with `all_logits`, logits float32 [B, C, V]; otherwise [B, V] at
    each row's last real token so far (`last_logits` carried over for rows with nothing in this
    chunk). With `observe`, `obs` (a tuple of `LayerObs`) gathers what eviction scorers need.
    """
    positions = cache.next_pos[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    model = model_for(cfg)(cfg, attn_block=PREFILL_CHUNK, observe=observe)
    logits_at = None if all_logits else jnp.maximum(n_valid - 1, 0)
    out = model.apply({"params": params}, tokens, positions, cache, n_valid, logits_at, obs)
    logits, cache, obs = out if observe is not None else (*out, None)
    if not all_logits:
        logits = jnp.where((n_valid > 0)[:, None], logits, last_logits)
    return logits, cache, obs


def prefill(params, cfg: LlamaConfig, tokens: np.ndarray, lengths: np.ndarray, cache: KVCache,
            all_logits: bool = False, observe: ObsSpec | None = None):
    """Right-padded tokens int [B, T_pad] with real lengths [B] onto `cache`, chunk by chunk.

    Returns (logits, cache, obs): logits [B, V] at each row's last token, or [B, T_pad, V] with
    `all_logits`; obs a tuple of `LayerObs` with `observe`, else None.
    """
    b, t_pad = tokens.shape
    chunk = min(t_pad, PREFILL_CHUNK)
    last = jnp.zeros((b, cfg.vocab_size), jnp.float32)
    obs = None
    if observe is not None:
        obs = tuple(init_layer_obs(observe, np.asarray(cache.next_pos) + lengths, cfg.n_heads, cfg.head_dim,
                                   cache.layers[cache.state_index(i)].capacity, cfg.jnp_dtype, d_model=cfg.d_model)
                    for i in range(cfg.n_layers))
    outs = []
    for start in range(0, t_pad, chunk):
        n_valid = np.clip(lengths - start, 0, chunk).astype(np.int32)
        logits, cache, obs = prefill_chunk(params, jnp.asarray(tokens[:, start:start + chunk], jnp.int32),
                                           jnp.asarray(n_valid), cache, last, obs, cfg=cfg,
                                           all_logits=all_logits, observe=observe)
        if all_logits:
            outs.append(logits)
        else:
            last = logits
    return (jnp.concatenate(outs, axis=1) if all_logits else last), cache, obs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Loop state of `decode`.

    Attributes:
      cache: the KV cache (grows by one token per active row per step).
      logits: float32 [B, V] next-token logits of each row.
      done: bool [B] rows that emitted an end-of-sequence id (or were done on entry).
      key: PRNG key for sampling.
      out: int32 [B, N] tokens emitted in this call (-1 after a row is done).
      step: int32 [] tokens emitted so far in this call.
      carry: decode-time compression's state (`kvjax.recompress.DecodeCarry`), or None.
    """

    cache: KVCache
    logits: jax.Array
    done: jax.Array
    key: jax.Array
    out: jax.Array
    step: jax.Array
    carry: object = None


@functools.partial(jax.jit, static_argnames=("cfg", "sampler", "eos_ids", "n_buffer", "compressor"),
                   donate_argnames=("cache",))
def decode(params, cache: KVCache, logits, done, key, max_steps, carry=None, *, cfg: LlamaConfig, sampler: Sampler,
           eos_ids: tuple[int, ...], n_buffer: int, compressor=None):
    """Sample up to min(max_steps, N) tokens per row: sample from `logits`, feed the token, repeat.

    Returns (out int32 [B, N] with -1 where nothing was emitted, final DecodeState).
    The token sampled last is fed too, so the returned logits/cache continue the sequence.
    With `compressor` (`kvjax.recompress.Compressor`), each token is fed by its `step`, which re-scores
    and evicts every N steps; `carry` (its `DecodeCarry`) goes in and comes back in the final state.
    """
    b = done.shape[0]
    model = model_for(cfg)(cfg)
    eos = jnp.asarray(eos_ids if eos_ids else (-2,), jnp.int32)

    def cond(s: DecodeState):
        # every row of every layer (done rows too: their scratch write lands at slot `length`)
        # needs a free slot
        room = jnp.all(jnp.stack([layer.has_room() for layer in s.cache.layers]))
        return (s.step < jnp.minimum(max_steps, n_buffer)) & ~jnp.all(s.done) & room

    def body(s: DecodeState):
        key, sub = jax.random.split(s.key)
        token = sampler(s.logits, sub)
        token = jnp.where(s.done, -1, token)
        out = jax.lax.dynamic_update_slice_in_dim(s.out, token[:, None], s.step, axis=1)
        active = (~s.done).astype(jnp.int32)
        if compressor is None:
            logits, cache = model.apply({"params": params}, jnp.maximum(token, 0)[:, None],
                                        s.cache.next_pos[:, None], s.cache, active)
            carry = None
        else:
            logits, cache, carry = compressor.step(params, cfg, jnp.maximum(token, 0), s.cache, active, s.carry)
        done = s.done | jnp.isin(token, eos)
        logits = jnp.where(s.done[:, None], s.logits, logits[:, 0])
        return DecodeState(cache=cache, logits=logits, done=done, key=key, out=out, step=s.step + 1, carry=carry)

    init = DecodeState(cache=cache, logits=logits, done=done, key=key,
                       out=jnp.full((b, n_buffer), -1, jnp.int32), step=jnp.zeros((), jnp.int32), carry=carry)
    final = jax.lax.while_loop(cond, body, init)
    return final.out, final
