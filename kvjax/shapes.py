"""Bucketed shapes: prompt lengths and cache capacities are padded to a few sizes, so a sweep over
lengths compiles a handful of programs (powers of two from 16 up to the prefill chunk, then
multiples of the chunk)."""
from __future__ import annotations

PREFILL_CHUNK = 512  # tokens per prefill call; also the key block of prefill attention
MIN_BUCKET = 16
DECODE_STEP = 64  # decode room is allocated in steps of this many slots


def round_step(n: int) -> int:
    """n slots rounded up to whole decode steps (`DECODE_STEP`)."""
    return -(-n // DECODE_STEP) * DECODE_STEP


def bucket(n: int, chunk: int | None = None) -> int:
    """Padded size for n tokens: the next power of two (>= 16) up to `chunk`, then multiples of `chunk`."""
    chunk = chunk or PREFILL_CHUNK
    if n <= chunk:
        return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())
    return -(-n // chunk) * chunk
