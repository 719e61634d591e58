"""Speed and memory per configuration: `LM.generate` on a real-text prompt, the way a user runs it.

Each (length, configuration) runs twice with the exact compressed shapes (no shared prefill here):
the first call compiles (its compile time is reported), the second is timed. Prefill tok/s counts
the prompt's tokens over the prefill's wall time with scoring and compression included; decode
tok/s counts the new tokens after the first over the decode loop's time. `peak_bytes` is the
device's peak bytes in use where the backend reports it (GPU, TPU), else the process's peak resident
set size so far (CPU: a high-water mark of the whole run, not of one configuration).
"""
from __future__ import annotations

import resource
from typing import Callable, Sequence

import jax

from kvjax.eval.records import row_key
from kvjax.eval.runner import Config, config_fields
from kvjax.lm import LM


def peak_memory() -> int:
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_bench(lm: LM, prompts: dict[int, list[int]], configs: Sequence[Config], *, new_tokens: int,
              todo: Callable, emit: Callable, progress=None) -> None:
    """One row per (length, configuration); `prompts` maps each length to its prompt ids."""
    for length, ids in prompts.items():
        for config in configs:
            key = dict(task="bench", subtask="", length=length, depth=None, sample=0, **config.key())
            if todo(row_key(key)):
                kw = dict(quant=config.quant) if not config.evicts else dict(
                    method=config.method, ratio=config.ratio, budget=config.budget, quant=config.quant)
                first = lm.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False, **kw)
                out = lm.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False, **kw)
                emit([dict(**key, **config_fields(lm.cfg, config, length), n_tokens=len(out.ids),
                           prefill_s=out.prefill_s, answer_s=out.decode_s, compile_s=first.compile_s,
                           prefill_tok_s=length / out.prefill_s,
                           decode_tok_s=(len(out.ids) - 1) / out.decode_s, peak_bytes=peak_memory(), batch=1)])
                if progress is not None:
                    progress.update(1)
