"""TransMLA (Meng et al. 2025, arXiv 2502.07864): a GQA model (Llama family) converted to multi-head latent
attention, served by kvjax's DeepSeek model (`kvjax.models.deepseek`: `MLAKV` cache, absorbed decode).

    kvjax convert mla --model smollm2-135m --kv-rank 128 --rope-dim 64 --out runs/mla128
    kvjax generate --model runs/mla128 --prompt "..."       # a DeepSeek-format model with an MLA cache

Per layer, from the pre-RoPE keys and values of calibration text (their second moment S = sum u u^T of
u = [k; v], K KV heads of D dims each, head-major):

1. **GQA as MLA.** Query head h (of group g) scores q_h . k_g: with the keys of all K heads as a latent,
   every head reads it through an up-projection that selects its group (TransMLA Sec. 4.1).
2. **RoRoPE** (Sec. 4.2). RoPE rotates the pair of dims (f, f + D/2) of every head by the same angle, so
   a rotation *across heads*, one per frequency f, commutes with it: with U_f the eigenvectors (largest
   first) of the K x K second moment of the heads' f-components, the rotated heads k~_i = sum_j U_f[j, i]
   k_j keep every score exact (q_h's f-components scaled by U_f[g, i]). The first `rope_dim / D` rotated
   heads, which carry most of the key energy, keep RoPE: they become the shared decoupled RoPE key
   (MQA-like, as in DeepSeek); the others lose RoPE (the approximation the paper heals by training).
   FreqFold (merging adjacent frequencies) is not implemented.
3. **Balanced KV PCA** (Sec. 4.3). The NoPE keys, scaled by alpha = sqrt(tr S_v / tr S_nope) so that
   keys and values weigh alike, and the values are jointly projected on the top `kv_rank` eigenvectors
   of their second moment: the latent c [kv_rank]; `kv_b_proj` maps it back (keys / alpha, each head's
   group's values).
4. **DeepSeek layout.** q_proj = per head [q_nope (NoPE rotated heads); q_rope], pre-multiplied by
   sqrt(K) (DeepSeek scales scores by 1/sqrt(N + P) = 1/sqrt(K D), the model by 1/sqrt(D)); RoPE dims
   reordered from rotate-half to DeepSeek's interleaved pairs; `latent_norm=False` (TransMLA's MLA has
   no latent RMSNorm); `rope_period=D` when several rotated heads keep RoPE. MLP, norms and embeddings
   are copied. With rope_dim = K D and kv_rank = K D (every dim kept) the conversion is exact.

Not done: FreqFold, q-LoRA, models with q/k/v biases, q/k norms, sliding windows or RoPE scaling (refused).
Legend: E d_model, H query heads, K KV heads, D head dim, G = H / K, m rope heads, N = (K - m) D NoPE
dims, P = m D RoPE dims, r = kv_rank.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from kvjax.checkpoints import run_of
from kvjax.methods.palu import kv_moments
from kvjax.models.deepseek import DeepSeekConfig
from kvjax.weights import load_flat, save_flat

WEIGHTS = "model.safetensors"


def check(cfg, kv_rank: int, rope_dim: int) -> None:
    """One-line errors for a conversion that cannot be made, before anything runs."""
    if type(cfg).__name__ != "LlamaConfig":
        raise ValueError(f"kvjax convert mla converts Llama-family models (GQA); this is a {type(cfg).__name__}")
    for flag, why in (("qkv_bias", "q/k/v biases"), ("qk_norm", "q/k norms"), ("sliding_window", "sliding windows"),
                      ("rope_scaling", "RoPE scaling")):
        if getattr(cfg, flag, None):
            raise ValueError(f"kvjax convert mla: models with {why} are not supported")
    d, k = cfg.head_dim, cfg.n_kv_heads
    if rope_dim < d or rope_dim % d or rope_dim > k * d:
        raise ValueError(f"--rope-dim {rope_dim}: RoPE dims come in rotated heads of {d} (the head dim), "
                         f"from {d} to {k * d} (= {k} KV heads)")
    width = 2 * k * d - rope_dim  # NoPE keys + values
    if not 1 <= kv_rank <= width:
        raise ValueError(f"--kv-rank {kv_rank}: must be in [1, {width}] (NoPE key dims + value dims)")


def rotations(s_kk: np.ndarray, n_kv: int, d: int) -> np.ndarray:
    """RoRoPE: per frequency f, U_f [K, K] (columns: eigenvectors of the heads' f-components' second
    moment, largest first) from the keys' second moment s_kk [KD, KD] -> float64 [D/2, K, K]."""
    s = s_kk.reshape(n_kv, d, n_kv, d)
    half = d // 2
    out = []
    for f in range(half):
        c = s[:, f, :, f] + s[:, f + half, :, f + half]  # both dims of the rotated pair
        w, u = np.linalg.eigh(c)
        out.append(u[:, ::-1])
    return np.stack(out)


def key_rotation(u_f: np.ndarray, n_kv: int, d: int) -> np.ndarray:
    """T [KD, KD] with k~ = T k: k~[i, e] = sum_j U_{f(e)}[j, i] k[j, e], f(e) = e mod D/2."""
    half = d // 2
    t = np.zeros((n_kv, d, n_kv, d))
    for e in range(d):
        t[:, e, :, e] = u_f[e % half].T  # [i, j] = U[j, i]
    return t.reshape(n_kv * d, n_kv * d)


def interleave(d: int) -> np.ndarray:
    """Column order taking a rotate-half block (pairs (i, i + D/2)) to DeepSeek's interleaved pairs
    (2i, 2i + 1): new[2i] = old[i], new[2i + 1] = old[i + D/2]."""
    half = d // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)


@dataclasses.dataclass(frozen=True)
class LayerMaps:
    """One layer's conversion as linear maps of u = [k_pre; v], 2KD numbers (a token's pre-RoPE keys and values,
    KV heads head-major; row vectors, x @ [W_k | W_v] = u), float64.

    Attributes:
      u_f: [D/2, K, K] RoRoPE's rotation per frequency.
      weights: [N + KD]: z = (u @ target) * weights = [alpha k~_nope; v], the balanced keys and values.
      basis: [N + KD, r]: the latent c = z @ basis (applied in this order: alpha may be huge where the
        NoPE keys are ~0, and folding it into the maps would lose them to cancellation).
      rope_key: [2KD, P]: the shared key before RoPE, in DeepSeek's interleaved order.
      target: [2KD, N + KD]: y = [rotated NoPE keys; values], what `up` reconstructs from the latent.
      up: [r, N + KD]: y ~ c @ up (the NoPE-key columns are shared by every head; each head reads its
        group's D value columns).
    """

    u_f: np.ndarray
    weights: np.ndarray
    basis: np.ndarray
    rope_key: np.ndarray
    target: np.ndarray
    up: np.ndarray


def layer_maps(s: np.ndarray, cfg, kv_rank: int, rope_dim: int) -> LayerMaps:
    """RoRoPE and balanced KV PCA (module docstring) of one layer from its moment s [2KD, 2KD] of u."""
    k, d = cfg.n_kv_heads, cfg.head_dim
    kd, m = k * d, rope_dim // d
    n = kd - m * d
    u_f = rotations(s[:kd, :kd], k, d)
    t = key_rotation(u_f, k, d)
    rope, nope = slice(0, m * d), slice(m * d, kd)
    s_t = t @ s[:kd, :kd] @ t.T
    alpha = np.sqrt(np.trace(s[kd:, kd:]) / max(np.trace(s_t[nope, nope]), 1e-30)) if m < k else 1.0
    target = np.zeros((2 * kd, n + kd))  # u -> [t[nope] k; v]
    target[:kd, :n] = t[nope].T
    target[kd:, n:] = np.eye(kd)
    weights = np.concatenate([np.full(n, alpha), np.ones(kd)])  # u -> z = [alpha k~_nope; v]
    balanced = target * weights
    w, vecs = np.linalg.eigh(balanced.T @ s @ balanced)
    p = vecs[:, ::-1][:, :kv_rank]  # [N + KD, r]
    order = np.concatenate([j * d + interleave(d) for j in range(m)])
    rope_key = np.zeros((2 * kd, rope_dim))
    rope_key[:kd] = t.T[:, rope][:, order]
    return LayerMaps(u_f=u_f, weights=weights, basis=p, rope_key=rope_key, target=target,
                     up=np.concatenate([p[:n].T / alpha, p[n:].T], axis=1))


def query_heads(w_q: np.ndarray, maps: LayerMaps, cfg, rope_dim: int) -> np.ndarray:
    """q_proj [E, H (N + P)] of the converted layer from the Llama q_proj w_q [E, HD]: per head [q_nope of
    the NoPE rotated heads; q_rope in interleaved order], pre-multiplied by sqrt(K) (module docstring)."""
    h, k, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    g_size, kd, m = h // k, k * d, rope_dim // d
    order = np.concatenate([j * d + interleave(d) for j in range(m)])
    heads = []
    for head in range(h):
        g = head // g_size
        wq = w_q[:, head * d:(head + 1) * d]  # [E, D]
        # q~_{h,i}[e] = U_{f(e)}[g, i] q_h[e]
        scale = np.stack([maps.u_f[e % (d // 2)][g, :] for e in range(d)], axis=1)  # [K (i), D (e)]
        wqt = (wq[:, None, :] * scale[None]).reshape(-1, kd) * np.sqrt(k)  # [E, KD] rotated-head-major
        heads.append(np.concatenate([wqt[:, m * d:], wqt[:, :m * d][:, order]], axis=1))  # [E, N + P]
    return np.concatenate(heads, axis=1)


def up_heads(up: np.ndarray, cfg, rope_dim: int) -> np.ndarray:
    """kv_b_proj [r, H (N + D)] from `LayerMaps.up` [r, N + KD]: per head the shared NoPE-key columns and
    its group's value columns."""
    h, k, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    n = k * d - rope_dim
    return np.concatenate([np.concatenate([up[:, :n], up[:, n + (i // (h // k)) * d: n + (i // (h // k) + 1) * d]],
                                          axis=1) for i in range(h)], axis=1)


def convert_layer(attn: dict, s: np.ndarray, cfg, kv_rank: int, rope_dim: int) -> dict:
    """One layer's Llama attention params {q_proj, k_proj, v_proj, o_proj} and moment s [2KD, 2KD] ->
    DeepSeek MLA attention params {q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj} (module docstring)."""
    return mla_layer(attn, layer_maps(s, cfg, kv_rank, rope_dim), cfg)


def mla_layer(attn: dict, maps: LayerMaps, cfg) -> dict:
    """The MLA attention params of a Llama layer's `attn` under its conversion `maps`."""
    rope_dim = maps.rope_key.shape[1]
    w_q, w_k, w_v = (np.asarray(attn[n]["kernel"], np.float64) for n in ("q_proj", "k_proj", "v_proj"))
    w_kv = np.concatenate([w_k, w_v], axis=1)  # x -> u
    return layer_params(attn, query_heads(w_q, maps, cfg, rope_dim), up_heads(maps.up, cfg, rope_dim),
                        np.concatenate([((w_kv @ maps.target) * maps.weights) @ maps.basis,
                                        w_kv @ maps.rope_key], axis=1))


def layer_params(attn: dict, q_proj, kv_b_proj, kv_a_proj=None) -> dict:
    """The converted layer's attention params in the dtype of `attn` (the Llama layer's), o_proj kept;
    without `kv_a_proj` a layer that reads another's latent (CLLA)."""
    as_dt = lambda x: jnp.asarray(x, np.asarray(attn["q_proj"]["kernel"]).dtype)  # noqa: E731
    out = {"q_proj": {"kernel": as_dt(q_proj)}, "kv_b_proj": as_dt(kv_b_proj),
           "o_proj": {"kernel": jnp.asarray(attn["o_proj"]["kernel"])}}
    if kv_a_proj is not None:
        out["kv_a_proj_with_mqa"] = {"kernel": as_dt(kv_a_proj)}
    return out


def mla_config(cfg, kv_rank: int, rope_dim: int, **kw) -> DeepSeekConfig:
    """The DeepSeek config of a Llama-family `cfg` converted to MLA (`kw`: more fields, e.g. CLLA's route)."""
    m = rope_dim // cfg.head_dim
    return DeepSeekConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                          d_ff=cfg.d_ff, kv_lora_rank=kv_rank, qk_nope_head_dim=(cfg.n_kv_heads - m) * cfg.head_dim,
                          qk_rope_head_dim=rope_dim, v_head_dim=cfg.head_dim, rms_eps=cfg.rms_eps,
                          rope_theta=cfg.rope_theta, max_positions=cfg.max_positions,
                          tie_embeddings=cfg.tie_embeddings, dtype=cfg.dtype, latent_norm=False,
                          rope_period=cfg.head_dim if m > 1 else None, **kw)


def with_attention(params: dict, layer: int, attn: dict) -> dict:
    """`params` with layer `layer`'s attention params replaced (the rest shared, not copied)."""
    block = dict(params[f"layers_{layer}"])
    block["attn"] = attn
    return {**params, f"layers_{layer}": block}


def convert(lm, ids: np.ndarray, kv_rank: int, rope_dim: int):
    """(DeepSeekConfig, params) of `lm` (a Llama-family `LM`) converted to MLA on calibration ids [n, T]."""
    check(lm.cfg, kv_rank, rope_dim)
    params = dict(lm.params)
    for i, s in enumerate(kv_moments(lm, ids)):
        params = with_attention(params, i, convert_layer(params[f"layers_{i}"]["attn"], s, lm.cfg, kv_rank, rope_dim))
    return mla_config(lm.cfg, kv_rank, rope_dim), params


def write(out_dir, cfg: DeepSeekConfig, params: dict, settings: dict) -> Path:
    """Write a converted model (`cfg`, `params`) and its `settings` (method "mla": `kvjax.load` opens it)."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}
    save_flat(str(out / WEIGHTS), flat, cfg)
    (out / "settings.json").write_text(json.dumps(dict(method="mla", **settings), indent=1))
    return out


def save(out_dir, lm, ids: np.ndarray, kv_rank: int, rope_dim: int) -> Path:
    """`kvjax convert mla`: convert and write the model and its settings to `out_dir`."""
    cfg, params = convert(lm, ids, kv_rank, rope_dim)
    return write(out_dir, cfg, params, dict(model=lm.name, kv_rank=kv_rank, rope_dim=rope_dim,
                                            calib_tokens=int(ids.size)))


def converted(path) -> dict | None:
    """The settings of a `kvjax convert mla` directory, or None."""
    return run_of(path, "mla")


def load_converted(path, dtype: str):
    """(config, params) of a `kvjax convert mla` directory."""
    return load_flat(str(Path(path).expanduser() / WEIGHTS), dtype)


__all__ = ["check", "convert", "save", "write", "converted", "load_converted", "rotations", "key_rotation", "interleave",
           "LayerMaps", "layer_maps", "mla_layer", "query_heads", "up_heads", "layer_params", "mla_config", "with_attention"]
