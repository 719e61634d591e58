"""What the side-by-side benchmarks share: the machine's CPU line, and decode speed of several cache
configurations measured interleaved (config A, B, ..., then again), so that the noise of a shared
machine hits every configuration alike; each is reported as its best run and the spread of its runs.

    runs = decode_runs(lm, ids, {"full": {}, "kivi-2": dict(quant="kivi-2")}, new_tokens=64, repeats=3)
    runs["kivi-2"].best / runs["full"].best    # the ratio a table prints
"""
from __future__ import annotations

import dataclasses
import platform
import sys
import time
from pathlib import Path

import jax

import kvjax
from tqdm import tqdm

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma")


def cpu_line() -> str:
    """'CPU: <model>, <n> cores, flags: avx2 fma (no avx512f ...)' read from /proc/cpuinfo (Linux)."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    have = " ".join(f for f in FLAGS if f in flags)
    lack = " ".join(f for f in FLAGS if f not in flags)
    return f"CPU: {model}, {text.count('processor')} cores, flags: {have or '-'}" + (f" (no {lack})" if lack else "")


@dataclasses.dataclass
class Runs:
    tok_s: list  # decode tok/s of each timed run
    cpu_tok_s: list  # the same over the process's CPU time (all threads): steadier on a shared machine
    prefill_s: list  # prefill seconds (compile excluded) of each timed run
    compile_s: float  # of the first (untimed) run
    bytes: int  # cache_nbytes after the prefill
    bits: float  # bits per K/V element (`memory_report`)

    @property
    def best(self) -> float:
        return max(self.tok_s)

    @property
    def cpu_best(self) -> float:
        return max(self.cpu_tok_s, default=float("nan"))

    def spread(self) -> str:
        return f"{min(self.tok_s):.1f}-{max(self.tok_s):.1f}"


def decode_runs(lm, ids, configs: dict, new_tokens: int, repeats: int) -> dict:
    """Decode tok/s of each configuration (keyword arguments of `lm.generate`): one compile run each
    and one timed prefill (its cache kept), then `repeats` rounds over all of them in turn, each
    decoding `new_tokens` on top of the kept cache (the prompt's last token fed again), so a round
    costs the decode only and long contexts can be repeated. Compile time is excluded from decode time.
    Each run is also timed in process CPU time (the whole `generate` call, one-token feed included),
    which other jobs on a shared machine disturb far less than the wall clock. Decode-time eviction
    (`capacity=`) cannot be prefilled apart: its rounds run `generate` on the prompt (decode time
    still apart from the prefill's), its bytes and prefill time are those of the method with a
    budget of `capacity` tokens, and it has no CPU-time figure."""
    out, caches = {}, {}
    bar = tqdm(total=len(configs) * (repeats + 1), desc="decode runs", file=sys.stderr)
    for name, kw in configs.items():
        first = lm.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False, **kw)
        pre = {k: v for k, v in kw.items() if k != "capacity"}  # decode-time eviction: `generate` builds it;
        if "capacity" in kw:  # its bytes are those of `capacity` kept tokens per head, as a budget gives
            pre["budget"] = kw["capacity"]
        t0 = time.perf_counter()
        cache = jax.block_until_ready(lm.prefill(ids, **pre))
        prefill_s = time.perf_counter() - t0
        if "capacity" not in kw:
            caches[name] = cache
        out[name] = Runs([], [], [prefill_s], first.compile_s, kvjax.cache_nbytes(cache),
                         kvjax.memory_report(cache)["bits_per_element"])
        bar.update()
    for _ in range(repeats):
        for name, kw in configs.items():
            c0 = time.process_time()
            if name in caches:  # decode on the kept cache, which holds the method and quantizer
                kw = {k: v for k, v in kw.items() if k == "attention_impl"}
                r = lm.generate(ids[-1:], cache=caches[name], max_new_tokens=new_tokens, stop_at_eos=False, **kw)
                out[name].cpu_tok_s.append((len(r.ids) - 1) / (time.process_time() - c0))
            else:  # the prompt again (its CPU time would count the prefill: not reported)
                r = lm.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False, **kw)
            out[name].tok_s.append((len(r.ids) - 1) / r.decode_s)
            bar.update()
    bar.close()
    return out
