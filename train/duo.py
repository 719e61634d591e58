"""DuoAttention gates (Xiao et al. 2024, arXiv 2410.10819, sec. 3.1): which KV heads need the whole context.

One gate a[l, k] per layer and KV head, initialised at 1 and projected back to [0, 1] after every step
(the reference clamps `full_attention_heads` in place). During training every head mixes its two
attentions (paper eq. 1):

    attn[l, k] = a[l, k] · full_attention + (1 - a[l, k]) · streaming_attention

streaming attention seeing, for a query at position t, the `sink` first positions and the positions
(t - recent, t] (the Λ-shaped mask; `kvjax.attention.online_attention(window=recent, sink=sink)`).
Loss (eq. 2-3): the mean squared difference of the final hidden states (after the final norm) of the
full model and the gate-mixed one at the answer tokens, plus `reg` (0.05) · mean |a|. The backbone is
frozen; lr 0.02 (`kvjax train duo`'s default).

Data (the reference's multi-passkey task): a haystack of real text with `n_keys` needles ("Pass key i
is DIGITS.") at random depths, then "The pass keys are:" and the answer, the keys in order, each
followed by ", ": the answer is the last `answer_len` tokens of every window, and the loss reads the
hidden states that predict them. Batch s is a pure function of (seed, s), so resume is exact.

Deployment: `kvjax.methods.duo` (`duo(gates=RUN_DIR, sparsity=...)`) stores retrieval and streaming
heads apart (`kvjax.states.duo.DuoKV`).

Legend: B batch, T window tokens, A answer tokens, L layers, K KV heads, G = H/K, E d_model.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import online_attention, slot_blocks
from kvjax.checkpoints import model_id
from kvjax.models.config import LlamaConfig
from kvjax.models.family import model_for
from kvjax.states.base import StoreBacked
from kvjax.states.cache import KVCache, model_cache
from kvjax.states.dense import DenseKV


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GateMixKV(StoreBacked):
    """A training-time layer state: a `DenseKV` of every token, attended twice (full and streaming) and
    mixed per KV head by its gate (paper eq. 1).

    Attributes:
      store: the layer's `DenseKV` [B, K, S, D].  gate: float32 [K] (traced: it is trained).
      sink, recent: static, the streaming attention's sinks and window.
    """

    store: DenseKV
    gate: jax.Array
    sink: int = dataclasses.field(metadata=dict(static=True), default=128)
    recent: int = dataclasses.field(metadata=dict(static=True), default=256)

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype, gate, sink: int = 128,
             recent: int = 256) -> "GateMixKV":
        return cls(store=DenseKV.init(batch, n_kv_heads, capacity, head_dim, dtype),
                   gate=jnp.asarray(gate, jnp.float32), sink=sink, recent=recent)

    def append(self, k, v, pos, n_valid, features=None) -> "GateMixKV":
        return dataclasses.replace(self, store=self.store.append(k, v, pos, n_valid))

    def attend_jnp(self, q, q_pos, block=None, return_lse: bool = False):
        """gate · full + (1 - gate) · streaming attention of q [B, T, H, D] -> [B, T, H, D] (float32 mix)."""
        if return_lse:
            raise ValueError("GateMixKV gives no observations")
        s = self.store
        part = slot_blocks((s.k, s.v, s.pos), s.length, block)
        full = online_attention(q, q_pos, [part]).astype(jnp.float32)
        stream = online_attention(q, q_pos, [part], window=self.recent, sink=self.sink).astype(jnp.float32)
        b, t, h, d = q.shape
        g = jnp.repeat(self.gate, h // self.gate.shape[0])[None, None, :, None]  # [1, 1, H, 1]
        return (g * full + (1 - g) * stream).astype(q.dtype)


def final_hidden(backbone, cfg, x, cache: KVCache | None = None):
    """The normed final hidden states float32 [B, T, E] of tokens x [B, T] from position 0 (the decoder's
    sown `hidden/final`), on `cache` (default: the dense cache)."""
    b, t = x.shape
    cache = model_cache(cfg, b, t) if cache is None else cache
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    _, state = model_for(cfg)(cfg).apply({"params": backbone}, x, positions, cache, mutable=["hidden"])
    return state["hidden"]["final"][0].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class DuoTask:
    """DuoAttention's gates of one model, as a training task (`kvjax.train.loop`).

    Attributes:
      cfg: the backbone's config.  model_name: recorded in checkpoints (with a hash of `cfg`).
      answer_len: A, the answer tokens at the end of every window (`PasskeyBatches.answer_len`).
      sink, recent: the streaming attention (paper: 128 / 256).  reg: the gates' L1 weight (paper: 0.05).
    """

    cfg: LlamaConfig
    model_name: str
    answer_len: int
    sink: int = 128
    recent: int = 256
    reg: float = 0.05
    name: ClassVar[str] = "duo"

    def __post_init__(self):
        for f in ("answer_len", "recent"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"{f} must be an integer >= 1, got {getattr(self, f)!r}")
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"sink must be an integer >= 0, got {self.sink!r}")

    def meta(self) -> dict:
        return {"method": self.name, "model": model_id(self.model_name, self.cfg), "sink": self.sink,
                "recent": self.recent}

    def init(self, backbone, calib_tokens) -> tuple[dict, dict]:
        """({gates: float32 [L, K] ones}, {})."""
        return {"gates": jnp.ones((self.cfg.n_layers, self.cfg.n_kv_heads), jnp.float32)}, {}

    def project(self, params) -> dict:
        """The gates clipped to [0, 1] (after every optimizer step)."""
        return {"gates": jnp.clip(params["gates"], 0.0, 1.0)}

    def mixed_cache(self, gates, batch: int, capacity: int) -> KVCache:
        c = self.cfg
        layers = tuple(GateMixKV.init(batch, c.n_kv_heads, capacity, c.head_dim, c.jnp_dtype, gates[i], self.sink,
                                      self.recent) for i in range(c.n_layers))
        return KVCache(layers=layers, next_pos=jnp.zeros((batch,), jnp.int32))

    def loss(self, params, const, backbone, tokens, key):
        """MSE of the final hidden states predicting the answer (the last A tokens of tokens [B, T + 1])
        between the full and the gate-mixed model, + reg · mean |gates|."""
        x = tokens[:, :-1]
        b, t = x.shape
        a = self.answer_len
        teacher = jax.lax.stop_gradient(final_hidden(backbone, self.cfg, x))[:, t - a:]
        student = final_hidden(backbone, self.cfg, x, self.mixed_cache(params["gates"], b, t))[:, t - a:]
        mse = jnp.mean(jnp.square(student - teacher))
        l1 = jnp.mean(jnp.abs(params["gates"]))
        return mse + self.reg * l1, {"mse": mse, "gate_mean": l1}


class PasskeyBatches:
    """Random-access synthetic multi-passkey windows: `batches[s]` is int32 [B, T + 1], a pure function of
    (seed, s). Each window: haystack text (a random slice of `tokens`) with `n_keys` needles
    " Pass key i is DIGITS." at random depths, then " The pass keys are:" and the answer (every key's
    digits and ", ", in order): the last `answer_len` tokens."""

    def __init__(self, tokens, tokenizer, seq_len: int, batch_size: int, seed: int = 0, n_keys: int = 10,
                 digits: int = 5):
        enc = lambda s: list(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
        self.digit_ids = [enc(str(i)) for i in range(10)]
        if any(len(d) != 1 for d in self.digit_ids):
            raise ValueError("passkey data needs a tokenizer that writes each digit as one token")
        self.digit_ids = np.array([d[0] for d in self.digit_ids], np.int32)
        self.tokens = np.asarray(tokens, np.int32)
        self.seq_len, self.batch_size, self.seed, self.n_keys, self.digits = seq_len, batch_size, seed, n_keys, digits
        self.needles = [(enc(f" Pass key {i + 1} is "), enc(".")) for i in range(n_keys)]
        self.tail, self.sep = enc(" The pass keys are:"), enc(", ")
        self.answer_len = n_keys * (digits + len(self.sep))
        fixed = sum(len(a) + digits + len(c) for a, c in self.needles) + len(self.tail) + self.answer_len
        self.haystack = seq_len + 1 - fixed
        if self.haystack < 1:
            raise ValueError(f"seq_len {seq_len} leaves no haystack for {n_keys} pass keys of {digits} digits "
                             f"({fixed} tokens of needles, question and answer)")
        if len(self.tokens) < self.haystack:
            raise ValueError(f"the text holds {len(self.tokens)} tokens, a window needs {self.haystack} of haystack")

    def window(self, rng) -> np.ndarray:
        keys = rng.integers(0, 10, size=(self.n_keys, self.digits))
        start = rng.integers(0, len(self.tokens) - self.haystack + 1)
        hay = self.tokens[start:start + self.haystack]
        cuts = np.sort(rng.integers(0, self.haystack + 1, size=self.n_keys))
        out, prev = [], 0
        for (pre, post), cut, key in zip(self.needles, cuts, keys):
            out += [hay[prev:cut], pre, self.digit_ids[key], post]
            prev = cut
        out += [hay[prev:], self.tail]
        out += [x for key in keys for x in (self.digit_ids[key], self.sep)]
        return np.concatenate([np.asarray(x, np.int32) for x in out])

    def __getitem__(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(step)])
        return np.stack([self.window(rng) for _ in range(self.batch_size)])
