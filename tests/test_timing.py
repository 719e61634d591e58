"""Compile time (`kvjax.timing.compile_seconds`) and the "compiling ..." status line."""
from __future__ import annotations

import io
import re
import time

import jax
import jax.numpy as jnp

from kvjax.testing import tiny_lm
from kvjax.timing import compile_seconds, report_compiles, mid_line


def test_compile_seconds_lie_within_the_first_call():
    @jax.jit
    def inner(x):
        for i in range(300):  # a slow trace
            x = jnp.sin(x) * (i + 1)
        return x

    @jax.jit
    def outer(x):
        return inner(x) + inner(x * 2)  # a jitted function inside another's trace

    c0, t0 = compile_seconds(), time.perf_counter()
    outer(jnp.ones(4)).block_until_ready()
    wall, compiled = time.perf_counter() - t0, compile_seconds() - c0
    assert 0.05 < compiled <= wall
    c0 = compile_seconds()
    outer(jnp.ones(4)).block_until_ready()  # compiled: no compile time
    assert compile_seconds() == c0


def test_status_line_per_program_with_seconds():
    lm = tiny_lm(seed=3, n_layers=3, max_positions=96)  # programs no other test compiled
    stream = io.StringIO()
    with report_compiles(stream, after=0.0):
        out = lm.generate("hello world", max_new_tokens=4)
        assert not mid_line()
    lines = stream.getvalue().splitlines()  # after=0: every program, the small ones too
    line = r"kvjax: compiling (\w+) \.\.\. [\d.]+ s( \(from the compile cache\))?"
    assert all(re.fullmatch(line, ln) for ln in lines), lines
    programs = [re.fullmatch(line, ln).group(1) for ln in lines]
    assert programs.count("prefill_chunk") == 1 and programs.count("decode") == 1, programs
    assert programs.index("prefill_chunk") < programs.index("decode")
    shown = sum(float(re.search(r"([\d.]+) s", ln).group(1)) for ln in lines)
    assert shown <= out.compile_s + 0.2 * len(lines)  # each line's seconds are part of the compile time

    stream = io.StringIO()
    with report_compiles(stream, after=30.0):  # nothing compiles that long
        tiny_lm(seed=3, n_layers=3, max_positions=80).generate("hello world", max_new_tokens=4)
    assert stream.getvalue() == ""
