"""Calibration of KVQuant's non-uniform datatype (Hooper et al. 2024, arXiv 2401.18079, Sec. 3.4).

    quantizer = kvjax.calibrate_kvquant(lm, calibration_text, bits=3)
    lm.generate(prompt, quant=quantizer)

For each layer, the keys (pre-RoPE, grouped per channel over `group` tokens) and values (per token)
of the calibration text are normalized into their group's [min, max] with outliers left out, exactly
as the quantizer will see them (`quant.unit_range`), and 1-D k-means (Lloyd's algorithm, started
from the uniform grid) fits 2^bits levels to them: one codebook for keys and one for values per
layer. The paper weights k-means by Fisher information (sensitivity); this is its unweighted
variant, which needs no gradients.
"""
from __future__ import annotations

import numpy as np

from kvjax import quant
from kvjax.states import DenseKV
from kvjax.quantizers import KVQuant

MAX_SAMPLES = 1 << 20  # normalized values per codebook fed to k-means (a random subset beyond)


def kmeans_1d(x: np.ndarray, k: int, iters: int = 100) -> tuple[float, ...]:
    """k strictly ascending centroids in [0, 1] minimizing the squared error of x (values in [0, 1]).

    Lloyd's algorithm from the uniform grid, so the error never exceeds the uniform grid's.
    """
    x = np.sort(np.asarray(x, np.float64).reshape(-1))
    if x.size == 0:
        raise ValueError("kmeans_1d: no calibration values")
    c = np.linspace(0.0, 1.0, k)
    for _ in range(iters):
        cells = np.searchsorted((c[1:] + c[:-1]) / 2, x)  # nearest centroid of each value
        sums, counts = np.bincount(cells, x, k), np.bincount(cells, minlength=k)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)  # empty cells stay put
        if np.allclose(new, c, atol=1e-9):
            break
        c = new
    c = np.clip(c, 0.0, 1.0)
    for i in range(1, k):  # strictly ascending (coinciding centroids cannot both be nearest)
        c[i] = max(c[i], np.nextafter(c[i - 1], 2.0))
    if c[-1] > 1.0:
        raise ValueError("kmeans_1d: could not place distinct levels in [0, 1]")
    return tuple(float(v) for v in c)


def _sample(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return u if u.size <= MAX_SAMPLES else rng.choice(u, MAX_SAMPLES, replace=False)


def calibrate_kvquant(lm, ids_or_text, *, bits: int = 3, seed: int = 0, **kvquant_kwargs) -> KVQuant:
    """A `KVQuant` with per-layer non-uniform codebooks fitted on one calibration sequence.

    Args:
      lm: a `kvjax.LM`.
      ids_or_text: the calibration text (or token ids); it needs at least sink + group tokens.
      bits: 2, 3 or 4. kvquant_kwargs: the other `KVQuant` fields (group, residual, outliers, sink).
    """
    base = KVQuant(bits=bits, **kvquant_kwargs).for_model(lm.cfg)
    ids = lm.encode(ids_or_text) if isinstance(ids_or_text, str) else [int(t) for t in ids_or_text]
    n_groups = (len(ids) - base.sink) // base.group
    if n_groups < 1:
        raise ValueError(f"calibrate_kvquant: {len(ids)} calibration tokens; need at least sink + group = "
                         f"{base.sink + base.group}")
    cache = lm.prefill([ids])
    rng = np.random.default_rng(seed)
    span = slice(base.sink, base.sink + n_groups * base.group)  # whole key groups past the sink
    books = []
    for layer in cache.layers:
        assert isinstance(layer, DenseKV)
        k_pre = base.rotate(layer.k[:, :, span], layer.pos[:, :, span], -1)
        fitted = []
        for x, axis, group, n_out in ((k_pre, -2, base.group, base.n_outliers(base.group)),
                                      (layer.v[:, :, span], -1, None, base.n_outliers(layer.v.shape[-1]))):
            u, inlier = quant.unit_range(x, axis=axis, group=group, outliers=n_out)
            fitted.append(kmeans_1d(_sample(np.asarray(u)[np.asarray(inlier)], rng), 2**bits))
        books.append(tuple(fitted))
    return KVQuant(bits=bits, codebooks=tuple(books), **kvquant_kwargs)
