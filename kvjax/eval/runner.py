"""The evaluation engine: one prefill per batch of samples, one branch per configuration.

The prefill does not depend on the eviction method (kvpress semantics: each layer's attention sees the
full prompt; compression happens afterwards), so a batch of samples is prefilled once, recording the
union of the observations every requested method needs, and each configuration (method, budget,
quantizer) *branches* the prefilled cache: compress (and quantize) it, feed the suffix on top, decode.
The prefilled cache is never donated, so every branch starts from the same arrays.

Compiled programs stay few: samples of one length share shapes (contexts have exactly `length`
tokens; batches are padded with copies of their last sample); eviction runs in the prefill cache's
capacity, so `compress` compiles once per (method, length) whatever the ratio (`n_keep` is traced),
and the result is cut to a bucketed capacity (kept tokens + room for the suffix and the answer), so
the answer programs are shared by every method at that capacity. The bytes a configuration reports
are those of its cache at its exact size (the `nbytes` of what `LM.prefill(context, method=...,
ratio=...)` returns), computed from the same `compress` call on abstract shapes (`jax.eval_shape`).

Legend: B batch (samples), L layers, T context tokens, C slot capacity, M teacher-forced tokens, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import generation, methods, pipeline
from kvjax.eval.prompts import Sample
from kvjax.eval.records import row_key
from kvjax.eval.scoring import SCORERS
from kvjax.shapes import bucket
from kvjax.lm import LM
from kvjax.states import tree_nbytes
from kvjax.states.cache import model_cache
from kvjax.models.config import LlamaConfig
from kvjax.observe import ObsSpec
from kvjax.timing import compile_seconds

Emit = Callable[[list[dict]], None]


@dataclasses.dataclass(frozen=True)
class Config:
    """One compression configuration: `method` ("full" or a method spec) with `ratio` (fraction
    removed) or `budget` (tokens kept per layer and head), and `quant` (a quantizer spec or None).
    `chunk`: compress after every prefill chunk of this many tokens (`kvjax.recompress`; a run-level option,
    recorded in the CSV's options, not in the key)."""

    method: str
    ratio: float | None = None
    budget: int | None = None
    quant: str | None = None
    chunk: int | None = None

    @property
    def evicts(self) -> bool:
        return self.method != "full"

    def key(self) -> dict:
        return dict(method=self.method, ratio=self.ratio, budget=self.budget, quant=self.quant)


def make_configs(method_specs: Sequence[str], ratios: Sequence[float] = (), budgets: Sequence[int] = (),
                 quants: Sequence[str | None] = (None,), chunk: int | None = None) -> list[Config]:
    """Every method x budget x quantizer ("full", a quantizer alone and a cross-layer method keeping every
    token take no budget); ValueError on a bad combination. `chunk`: every evicting configuration compresses
    after each prefill chunk of that many tokens (chunked compression)."""
    if ratios and budgets:
        raise ValueError("give --ratio or --budget, not both")
    out = []
    for q in quants:
        for m in method_specs:
            token = None if m == "full" else methods.split(m)[0]
            if token is None or getattr(token, "keeps_every_token", False):  # full, a quantizer, cla, kvsharer
                out.append(Config(m, quant=q))
                continue
            if not ratios and not budgets:
                raise ValueError(f"method {m!r} needs --ratio or --budget")
            out += [Config(m, ratio=float(r), quant=q, chunk=chunk) for r in ratios]
            out += [Config(m, budget=int(b), quant=q, chunk=chunk) for b in budgets]
    if not out:
        raise ValueError("no configuration to evaluate: give at least one --method")
    return list(dict.fromkeys(out))


def config_plan(cfg: LlamaConfig, config: Config, length: int, batch: int = 1, model_name: str = "", lm=None):
    """The pipeline's plan (`kvjax.pipeline.plan`) of a configuration for `batch` rows of `length` tokens."""
    return pipeline.plan(cfg, [length] * batch, config.method, config.ratio, config.budget, quant=config.quant,
                         model_name=model_name, lm=lm, tokenizer=None if lm is None else lm.tokenizer,
                         chunked_compression=config.chunk)


def check_configs(cfg: LlamaConfig, configs: Sequence[Config], lengths: Iterable[int], lm: LM | None = None) -> None:
    """Everything that can be checked before a long run: names, budgets at every length, combinations
    (each configuration planned at each length; trained methods load their weights; with `lm`, methods
    that calibrate on first use, KVSharer, do so now)."""
    for c in configs:
        for n in lengths:
            config_plan(cfg, c, n, model_name="" if lm is None else lm.name, lm=lm)


def union_spec(configs: Sequence[Config]) -> ObsSpec | None:
    """The observations every evicting configuration needs, recorded once by the shared prefill."""
    specs = [token.observations() for token in (methods.split(c.method)[0] for c in configs if c.evicts)
             if token is not None]
    if not specs:
        return None
    starts = {s.qstats_from for s in specs} - {None}
    if len(starts) > 1:
        raise ValueError(f"the methods need query statistics from different positions {sorted(starts)}: "
                         "evaluate them in separate runs")
    chunks = {s.nc_chunk for s in specs} - {0}
    if len(chunks) > 1:
        raise ValueError(f"the methods need non-causal attention blocks of different sizes {sorted(chunks)}: "
                         "evaluate them in separate runs")
    return ObsSpec(window=max(s.window for s in specs), col_sums=any(s.col_sums for s in specs),
                   qstats_from=starts.pop() if starts else None, nc_chunk=chunks.pop() if chunks else 0,
                   wov=any(s.wov for s in specs), hidden=any(s.hidden for s in specs))


# ------------------------------------------------------------------------------------ memory
@functools.lru_cache(maxsize=None)
def cache_bytes(cfg: LlamaConfig, config: Config, length: int) -> int:
    """Bytes of the cache `LM.prefill` builds for a `length`-token context under `config` (one row),
    from the pipeline's abstract shapes (nothing runs)."""
    return tree_nbytes(pipeline.abstract(cfg, config_plan(cfg, config, length), length))


def kept_fraction(cfg: LlamaConfig, config: Config, length: int) -> float:
    """Mean over layers of the tokens kept per head / context tokens."""
    p = config_plan(cfg, config, length)
    if p is None or p.method is None:
        return 1.0
    return float(p.n_keep.mean() / length)


# ------------------------------------------------------------------------------ prefill/branch
def shared_prefill(lm: LM, contexts: Sequence[Sequence[int]], capacity: int, spec: ObsSpec | None,
                   configs: Sequence[Config] | None = None):
    """Prefill equal-length contexts (ids [B, T]) into a cache of `capacity` slots, recording `spec`.

    Returns (logits float32 [B, V] at the last context token, cache, obs, seconds (compile excluded));
    (None, None, None, 0.0) if `configs` are given and every one runs its own prefill."""
    if configs is not None and all(own_prefill(c) for c in configs):
        return None, None, None, 0.0
    tokens = np.asarray(contexts, np.int32)
    lengths = np.full((len(contexts),), tokens.shape[1], np.int32)
    cfg = lm.cfg
    cache = model_cache(cfg, len(contexts), capacity)
    c0, t0 = compile_seconds(), time.perf_counter()
    logits, cache, obs = generation.prefill(lm.params, lm.cfg, tokens, lengths, cache, observe=spec)
    logits.block_until_ready()
    return logits, cache, obs, time.perf_counter() - t0 - (compile_seconds() - c0)


def own_prefill(config: Config) -> bool:
    """The configuration's method works while prefilling (Locret, MatryoshkaKV, chunked compression): it
    cannot branch off a shared prefill."""
    token = methods.split(config.method)[0] if config.evicts else None
    return token is not None and (token.prefills_itself or config.chunk is not None)


def prefill_alone(lm: LM, contexts: Sequence[Sequence[int]], config: Config, room: int):
    """(logits [B, V] at the last context token, cache with `room` free slots) of a method that evicts
    while prefilling, from its own prefill of `contexts`."""
    length = len(contexts[0])
    return lm.prefill([list(c) for c in contexts], capacity=length + room, method=config.method, ratio=config.ratio,
                      budget=config.budget, quant=config.quant, return_logits=True,
                      chunked_compression=config.chunk)


def branch(lm: LM, cache, obs, config: Config, length: int, room: int, contexts=None):
    """The prefilled cache (B rows of `length` tokens) compressed / quantized under `config`, with
    `room` free slots per head for what is fed on top (`kvjax.pipeline.branch`). New arrays: the
    prefilled cache stays valid. A method that replays (KVzip) first runs its pass over a copy of it, on
    the `contexts` ids [B, length] (so its compress time includes the replay)."""
    p = config_plan(lm.cfg, config, length, cache.batch, lm.name, lm=lm)
    if p is not None and p.method is not None and p.method.replays:
        tokens = np.asarray(contexts, np.int32)
        cache, obs = pipeline.replay(lm.params, lm.cfg, p, jax.tree_util.tree_map(jnp.copy, cache), tokens,
                                     np.full((len(tokens),), length, np.int32))
    return pipeline.branch(cache, obs, lm.cfg, p, room)


def batches(items: Sequence, max_batch: int) -> list[tuple[list, int]]:
    """Equal-size batches of at most `max_batch` items, as (batch, number of real items): a short last
    batch is padded with copies of its last item, so every batch has the same shapes."""
    n_batches = -(-len(items) // max_batch)
    size = -(-len(items) // n_batches)
    out = []
    for i in range(0, len(items), size):
        part = list(items[i:i + size])
        out.append((part + [part[-1]] * (size - len(part)), len(part)))
    return out


def config_fields(cfg: LlamaConfig, config: Config, length: int) -> dict:
    """The columns a configuration determines at a context length (besides its key)."""
    return dict(kept_fraction=kept_fraction(cfg, config, length),
                cache_bytes=cache_bytes(cfg, config, length),
                full_cache_bytes=cache_bytes(cfg, Config("full", quant=None), length))


# ------------------------------------------------------------------------------------ retrieval
def run_retrieval(lm: LM, samples: Sequence[Sample], configs: Sequence[Config], *, max_batch: int,
                  todo: Callable[[tuple], bool], emit: Emit, progress=None) -> None:
    """Answer every sample under every configuration; `emit` gets the rows of each (batch, config).

    Samples are grouped by (task, subtask, length) and batched; `todo(row_key)` says which rows still
    need computing (resume): a batch with nothing to do is skipped, prefill included."""
    spec = union_spec(configs)
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.task, s.subtask, s.length), []).append(s)
    for (_, _, length), group in groups.items():
        for batch, n_real in batches(group, max_batch):
            real = batch[:n_real]
            wanted = [c for c in configs if any(todo(sample_key(s, c)) for s in real)]
            if not wanted:
                continue
            suffix_max = max(len(s.suffix) for s in batch)
            new_max = max(s.max_new_tokens for s in batch)
            room = max(bucket(suffix_max), suffix_max + new_max)
            logits, cache, obs, prefill_s = shared_prefill(lm, [s.context for s in batch], bucket(length + room), spec,
                                                           wanted)
            del logits  # the answer starts from the suffix's logits
            for config in wanted:
                c0, t0 = compile_seconds(), time.perf_counter()
                if own_prefill(config):
                    state = prefill_alone(lm, [s.context for s in batch], config, room)[1]
                else:
                    state = branch(lm, cache, obs, config, length, room, [s.context for s in batch])
                jax.block_until_ready(state)
                branch_compile = compile_seconds() - c0
                compress_s = time.perf_counter() - t0 - branch_compile
                gen = lm.generate([list(s.suffix) for s in batch], cache=state, max_new_tokens=new_max)
                fields = {**config.key(), **config_fields(lm.cfg, config, length)}
                rows = []
                for i, s in enumerate(real):
                    score = SCORERS[s.task](gen.text[i], s.answers)
                    rows.append(dict(**sample_fields(s), **fields, answer=gen.text[i], expected="|".join(s.answers),
                                     score=score, correct=int(score == 1.0), prefill_s=prefill_s / len(batch),
                                     compress_s=compress_s / len(batch),
                                     answer_s=(gen.prefill_s + gen.decode_s) / len(batch),
                                     compile_s=branch_compile + gen.compile_s, batch=len(batch)))
                rows = [r for r in rows if todo(row_key(r))]
                emit(rows)
                if progress is not None:
                    progress.update(len(rows))
            del cache, obs


def sample_fields(s: Sample) -> dict:
    return dict(task=s.task, subtask=s.subtask, length=s.length, depth=s.depth, sample=s.index,
                needle_depth=s.needle_depth)


def sample_key(s: Sample, config: Config) -> tuple[str, ...]:
    return row_key({**sample_fields(s), **config.key()})
