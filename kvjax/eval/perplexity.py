"""Perplexity under compression: prefill C tokens, compress, teacher-force the next M through decoding.

The text is tokenized once and cut into consecutive chunks of C + M tokens from its start. For each
chunk the first C tokens are prefilled (shared by every configuration, as in `kvjax.eval.runner`),
the cache is compressed, and tokens C..C+M-1 are predicted: the first from the prefill's last
position, each later one by a decode step (the model on one token over the cache, as in
`generation.decode`) fed the true previous token. Reported: the mean negative log-likelihood per
predicted token (natural log) and its exponential.

Legend: B batch (chunks), C context tokens, M predicted tokens, V vocab.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.data import Corpus, read_file
from kvjax.eval.records import row_key
from kvjax.eval.runner import (Config, batches, branch, config_fields, own_prefill, prefill_alone, shared_prefill,
                               union_spec)
from kvjax.eval.scoring import perplexity
from kvjax.shapes import bucket
from kvjax.lm import LM
from kvjax.models.config import LlamaConfig
from kvjax.models.family import model_for
from kvjax.timing import compile_seconds


def text_chunks(tokenizer, source: Corpus | str | Path, context_len: int, eval_len: int, n: int) -> np.ndarray:
    """int32 [n, C + M]: the first n consecutive chunks of the tokenized text (a text file's path, or a
    resolved `kvjax.data.Corpus`, its documents joined by blank lines). For a tokenizer that starts
    every text with a BOS (Gemma), each chunk starts with it too, then C + M - 1 tokens of text."""
    corpus = source if isinstance(source, Corpus) else read_file(source)
    ids = np.asarray(tokenizer.encode("\n\n".join(corpus.documents), add_special_tokens=False), np.int32)
    bos = tokenizer.encode("")  # [BOS] or []
    size = context_len + eval_len - len(bos)
    if len(ids) < n * size:
        raise ValueError(f"{corpus.label!r} has {len(ids)} tokens: too few for {n} chunks of {context_len} + "
                         f"{eval_len}")
    chunks = ids[: n * size].reshape(n, size)
    return np.concatenate([np.full((n, len(bos)), bos, np.int32).reshape(n, len(bos)), chunks], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def teacher_force(params, cache, logits, targets, *, cfg: LlamaConfig):
    """Negative log-likelihoods float32 [B, M] of `targets` int32 [B, M] continuing the cache.

    The first target is scored by `logits` float32 [B, V] (the prefill's last position); target i > 0
    by a decode step fed target i - 1 at the row's next position. The cache must have M - 1 free slots."""
    model = model_for(cfg)(cfg)
    active = jnp.ones(targets.shape[:1], jnp.int32)

    def nll(lg, target):  # [B, V], [B] -> [B]
        lp = jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(lp, target[:, None], axis=-1)[:, 0]

    def step(state, xs):
        prev, target = xs
        lg, state = model.apply({"params": params}, prev[:, None], state.next_pos[:, None], state, active)
        return state, nll(lg[:, 0], target)

    _, rest = jax.lax.scan(step, cache, (targets[:, :-1].T, targets[:, 1:].T))  # [M - 1, B]
    return jnp.concatenate([nll(logits, targets[:, 0])[:, None], rest.T], axis=1)


def run_ppl(lm: LM, chunks: np.ndarray, context_len: int, configs: Sequence[Config], *, max_batch: int,
            todo: Callable, emit: Callable, progress=None, indices: Sequence[int] | None = None) -> None:
    """One row per chunk x configuration with `nll` and `ppl` (chunks int [N, C + M]); `indices`: only
    those chunks (this process's share), by their index in `chunks` (the row's `sample`)."""
    spec = union_spec(configs)
    eval_len = chunks.shape[1] - context_len
    for batch, n_real in batches(list(range(len(chunks))) if indices is None else list(indices), max_batch):
        keys = {c: [row_key(_key(i, context_len, c)) for i in batch[:n_real]] for c in configs}
        wanted = [c for c in configs if any(todo(k) for k in keys[c])]
        if not wanted:
            continue
        rows_bt = chunks[batch]
        targets = jnp.asarray(rows_bt[:, context_len:])
        logits, cache, obs, prefill_s = shared_prefill(lm, rows_bt[:, :context_len].tolist(),
                                                       bucket(context_len + eval_len), spec, wanted)
        for config in wanted:
            c0, t0 = compile_seconds(), time.perf_counter()
            if own_prefill(config):  # its compress time includes its whole (evicting) prefill
                last, state = prefill_alone(lm, rows_bt[:, :context_len].tolist(), config, eval_len)
            else:
                last, state = logits, branch(lm, cache, obs, config, context_len, eval_len, rows_bt[:, :context_len])
            jax.block_until_ready(state)
            t1, c1 = time.perf_counter(), compile_seconds()
            nll = np.asarray(teacher_force(lm.params, state, last, targets, cfg=lm.cfg))
            t2, c2 = time.perf_counter(), compile_seconds()
            fields = config_fields(lm.cfg, config, context_len)
            rows = []
            for r, i in enumerate(batch[:n_real]):
                mean = float(nll[r].mean())
                rows.append(dict(**_key(i, context_len, config), **fields,
                                 nll=mean, ppl=perplexity(mean), n_tokens=eval_len, prefill_s=prefill_s / len(batch),
                                 compress_s=(t1 - t0 - (c1 - c0)) / len(batch),
                                 answer_s=(t2 - t1 - (c2 - c1)) / len(batch), compile_s=c2 - c0, batch=len(batch)))
            rows = [r for r in rows if todo(row_key(r))]
            emit(rows)
            if progress is not None:
                progress.update(len(rows))


def _key(index: int, context_len: int, config: Config) -> dict:
    return dict(task="ppl", subtask="", length=context_len, depth=None, sample=index, **config.key())
