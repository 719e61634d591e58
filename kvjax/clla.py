"""CLLA (Yang et al. 2024, "Lossless KV Cache Compression to 2%", arXiv 2410.15252) by conversion: a GQA model
(Llama family) converted to MLA (`kvjax.transmla`) whose adjacent layers then share one latent.

CLLA is an architecture the paper trains from scratch: attention over a low-rank latent (MLA) that a group
of adjacent layers shares (CLA's cross-layer sharing, Brandon et al. 2024), each layer reading it through
its own up-projections, and the shared latent stored in int4. kvjax has no pretraining budget, so it builds
CLLA from a trained model in three steps, each measured on its own (`experiments/results/latent/clla.md`):

1. **latent**: TransMLA conversion of every layer (`kvjax convert mla`: RoRoPE, balanced K/V PCA).
2. **shared**: groups of `group` adjacent layers (`layers`, `remainder`: as `cla(...)` plans them) keep the
   lowest layer's latent c_p and RoPE key k^R_p; the others (consumers) store nothing
   (`DeepSeekConfig.latent_route`). A consumer i keeps its query and output projections and gets, in
   closed form from the calibration text's cross-layer moments (training-free; the paper has no such
   step):
   * up-projections W_i = argmin ||C_p W - Y_i||: the least-squares map from the producer's latents to
     the consumer's own NoPE keys and values y_i = [k~_nope; v] (its TransMLA targets);
   * a RoPE-key map per frequency: RoPE rotates each pair of dims as a complex number, so any complex
     linear map G_f across the m RoPE heads' pairs of frequency f commutes with it. With k^R_i ~ k^R_p G
     fitted by complex least squares, q . R k^R_i ~ (G q) . R k^R_p: G folds into the consumer's RoPE
     query columns, exactly, for every position. (`rope="shared"`; the paper's per-layer RoPE key is not
     built.) Per-consumer latent norms are not needed: TransMLA's latent has no norm, and a norm's gain
     would fold into the consumer's own up-projection.
3. **int4**: the shared latent and RoPE key in a 4-bit quantized store at inference (`quant="per_token-4"`),
   trained against with a straight-through fake quantizer (`kvjax train distill --fake-quant per_token-4`,
   `kvjax.states.mla.MLAKV.fake_quant`); distillation (X-EcoMLA's KL from the unconverted model) heals
   steps 1-3 together.

    kvjax convert clla --model smollm2-135m --kv-rank 128 --rope-dim 64 --group 2 --out runs/clla
    kvjax train distill --student runs/clla --fake-quant per_token-4 --steps 100 --out runs/clla-healed
    kvjax eval ppl --model runs/clla-healed --quant per_token-4

Legend: E d_model, K KV heads, D head dim, m RoPE heads, P = m D RoPE dims, N NoPE key dims, r latent rank,
u = [k_pre; v], 2KD numbers: a token's pre-RoPE keys and values (`kvjax.methods.palu.kv_moments`).
"""
from __future__ import annotations

import numpy as np

from kvjax import transmla
from kvjax.methods.crosslayer import CLA
from kvjax.methods.palu import kv_moments

RIDGE = 1e-6  # relative ridge of the least-squares fits (a latent direction the calibration never excites)


def route_of(cfg, group: int, layers="all", remainder: str | None = None) -> tuple[int, ...]:
    """The share plan: layer -> the layer whose latent it reads, groups of `group` adjacent layers (as
    `cla(group=, layers=, remainder=)` plans them, `kvjax.methods.crosslayer.CLA.route`); a one-line
    ValueError for a plan in which no layer shares."""
    route = CLA(group=group, layers=layers, remainder=remainder).route(cfg)
    if all(r == i for i, r in enumerate(route)):
        raise ValueError(f"clla: group={group} over layers={layers!r} shares no latent (every layer keeps its own)")
    return route


def _solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """gram^-1 rhs with a small relative ridge (Hermitian positive semi-definite gram)."""
    ridge = RIDGE * max(np.trace(gram).real / len(gram), 1e-30)
    return np.linalg.solve(gram + ridge * np.eye(len(gram)), rhs)


def fit_up(s_pp: np.ndarray, s_pi: np.ndarray, producer: transmla.LayerMaps,
           consumer: transmla.LayerMaps) -> np.ndarray:
    """[r_p, N + KD]: the consumer's up-projection from the producer's latent, minimizing
    sum_t ||c_p,t W - y_i,t||^2 over calibration tokens (s_pp = sum u_p u_p^T, s_pi = sum u_p u_i^T)."""
    a = (producer.target * producer.weights) @ producer.basis  # u_p -> c_p
    return _solve(a.T @ s_pp @ a, a.T @ s_pi @ consumer.target)


def _pairs(x: np.ndarray, half: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns [.., P] of an interleaved RoPE key map -> (real, imaginary) parts [.., D/2, m]: pair f of
    RoPE head b is the complex number (x[b D + 2f], x[b D + 2f + 1])."""
    x = x.reshape(x.shape[:-1] + (m, half, 2))
    return np.swapaxes(x[..., 0], -1, -2), np.swapaxes(x[..., 1], -1, -2)


def fit_rope(s_pp: np.ndarray, s_pi: np.ndarray, producer: transmla.LayerMaps, consumer: transmla.LayerMaps,
             head_dim: int) -> np.ndarray:
    """[P, P] real G (row vectors: k^R_i ~ k^R_p G) made of complex m x m maps per frequency, which commute
    with RoPE's rotation: per frequency f, G_f = argmin sum_t |y_f,t - x_f,t G_f|^2 over the pre-RoPE
    RoPE keys x = k^R_p, y = k^R_i as complex m-vectors."""
    half = head_dim // 2
    p_dims = producer.rope_key.shape[1]
    m = p_dims // head_dim
    xr, xi = _pairs(producer.rope_key, half, m)  # u_p -> x_f [2KD, D/2, m]
    yr, yi = _pairs(consumer.rope_key, half, m)
    g = np.zeros((p_dims, p_dims))
    for f in range(half):
        x = xr[:, f] + 1j * xi[:, f]  # [2KD, m]: x_f = u_p @ x
        y = yr[:, f] + 1j * yi[:, f]
        gram = x.conj().T @ s_pp @ x  # sum_t x^H x
        cross = x.conj().T @ s_pi @ y  # sum_t x^H y
        gf = _solve(gram, cross)  # [m, m]: y ~ x gf
        for a in range(m):
            for b in range(m):
                ra, rb = a * head_dim + 2 * f, b * head_dim + 2 * f  # (re, im) of pair f of heads a, b
                c = gf[a, b]  # (xr + i xi) c: [xr, xi] @ [[Re c, Im c], [-Im c, Re c]]
                g[ra:ra + 2, rb:rb + 2] = [[c.real, c.imag], [-c.imag, c.real]]
    return g


def consumer_query(q_proj: np.ndarray, g: np.ndarray, cfg, rope_dim: int) -> np.ndarray:
    """q_proj [E, H (N + P)] with each head's RoPE columns mapped by g^T: q . R (k_p G) = (q G^T) . R k_p."""
    h = cfg.n_heads
    n = cfg.n_kv_heads * cfg.head_dim - rope_dim
    q = q_proj.reshape(q_proj.shape[0], h, n + rope_dim).copy()
    q[..., n:] = q[..., n:] @ g.T
    return q.reshape(q_proj.shape)


def convert(lm, ids: np.ndarray, kv_rank: int, rope_dim: int, group: int = 2, layers="all",
            remainder: str | None = None):
    """(DeepSeekConfig, params) of `lm` (a Llama-family `LM`) converted to CLLA on calibration ids [n, T]
    (module docstring, steps 1-2)."""
    cfg = lm.cfg
    transmla.check(cfg, kv_rank, rope_dim)
    route = route_of(cfg, group, layers, remainder)
    consumers = [(r, i) for i, r in enumerate(route) if r != i]
    moments = kv_moments(lm, ids, pairs=[(i, i) for i in range(cfg.n_layers)] + consumers)
    own, cross = moments[:cfg.n_layers], dict(zip(consumers, moments[cfg.n_layers:]))
    maps = [transmla.layer_maps(s, cfg, kv_rank, rope_dim) for s in own]
    params = dict(lm.params)
    for i, r in enumerate(route):
        attn = params[f"layers_{i}"]["attn"]
        if r == i:
            new = transmla.mla_layer(attn, maps[i], cfg)
        else:
            q = transmla.query_heads(np.asarray(attn["q_proj"]["kernel"], np.float64), maps[i], cfg, rope_dim)
            g = fit_rope(own[r], cross[(r, i)], maps[r], maps[i], cfg.head_dim)
            up = fit_up(own[r], cross[(r, i)], maps[r], maps[i])
            new = transmla.layer_params(attn, consumer_query(q, g, cfg, rope_dim), transmla.up_heads(up, cfg, rope_dim))
        params = transmla.with_attention(params, i, new)
    return transmla.mla_config(cfg, kv_rank, rope_dim, latent_route=route), params


def save(out_dir, lm, ids: np.ndarray, kv_rank: int, rope_dim: int, group: int = 2, layers="all",
         remainder: str | None = None):
    """`kvjax convert clla`: convert and write the model (a DeepSeek-format MLA directory `kvjax.load` opens)."""
    cfg, params = convert(lm, ids, kv_rank, rope_dim, group, layers, remainder)
    return transmla.write(out_dir, cfg, params, dict(
        model=lm.name, kv_rank=kv_rank, rope_dim=rope_dim, calib_tokens=int(ids.size), variant="clla", group=group,
        layers=layers if isinstance(layers, str) else list(layers), remainder=remainder, route=list(cfg.latent_route)))


__all__ = ["route_of", "fit_up", "fit_rope", "consumer_query", "convert", "save"]
