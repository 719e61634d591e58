"""`DuoKV`: DuoAttention's layer state (Xiao et al. 2024, arXiv 2410.10819, sec. 3.2 "deployment"):
retrieval heads keep every token, streaming heads keep the attention sinks and a recent window.

The two kinds are stored apart, so the bytes are real (kvpress's DuoAttentionPress keeps every key and
masks the streaming heads' middle ones: no memory saved):

* `full`: the Kr retrieval heads, a `DenseKV` [B, Kr, S, D] that grows as tokens come (or the
  `QuantKV` it becomes when quantized);
* `stream`: the Ks streaming heads, a `RollingKV` of C = N + W slots with the "streaming" rule: the
  first N positions (sinks) stay, and once full each new token replaces the oldest non-sink one, so
  a streaming head holds its sinks and its W most recent tokens at every decode step;
* `heads`: int32 [B, K], the model's KV heads in storage order (the Kr retrieval heads, then the Ks
  streaming ones). Which heads stream is data (a trained gate file fixes it, the on-the-fly ranking
  picks it per prompt); how many stream in a layer is static (its arrays' shapes).

Attention gathers each kind's query heads (the G heads of a KV group go with their KV head), attends
over that kind's state and puts the outputs back in the model's head order. Tokens fed on top of a
compressed prompt (T > 1) go through the streaming heads one at a time (a `lax.scan` of the rolling
rule); their queries then see what the heads hold after the whole chunk (the chunk's earliest queries
may miss up to T - 1 of the oldest tokens of their window; a decode step, T = 1, is exact).

Legend: B batch, T new tokens, K KV heads (Kr retrieval + Ks streaming), G = H/K, H query heads,
S slots of the retrieval heads, C = N + W slots of the streaming heads, D head dim.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.states.base import EMPTY_POS, LayerState, tree_nbytes
from kvjax.states.dense import DenseKV
from kvjax.states.rolling import RollingKV


def _take_heads(x, heads, axis: int):
    """x with its KV-head axis `axis` gathered by heads int32 [B, k] (per row)."""
    idx = heads.reshape(heads.shape[:1] + (1,) * (axis - 1) + heads.shape[1:] + (1,) * (x.ndim - axis - 1))
    return jnp.take_along_axis(x, idx, axis=axis)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DuoKV(LayerState):
    """Attributes:
      full: the retrieval heads' state ([B, Kr, S, D] dense or quantized), None if Kr = 0.
      stream: the streaming heads' `RollingKV` ([B, Ks, C, D], rule "streaming", n_sink N), None if Ks = 0.
      heads: int32 [B, K] KV head of each storage index: retrieval heads first, then streaming ones.
    """

    full: LayerState | None
    stream: RollingKV | None
    heads: jax.Array

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype, streaming=(), sink: int = 128,
             recent: int = 256) -> "DuoKV":
        """Empty: KV heads `streaming` (a tuple of indices, the same for every row) stream with `sink`
        sinks and `recent` recent tokens; the others keep up to `capacity` tokens."""
        streaming = tuple(sorted(int(h) for h in streaming))
        retrieval = tuple(h for h in range(n_kv_heads) if h not in streaming)
        full = DenseKV.init(batch, len(retrieval), capacity, head_dim, dtype) if retrieval else None
        stream = (RollingKV.init(batch, len(streaming), sink + recent, head_dim, dtype, "streaming", sink)
                  if streaming else None)
        heads = jnp.broadcast_to(jnp.asarray(retrieval + streaming, jnp.int32), (batch, n_kv_heads))
        return cls(full=full, stream=stream, heads=heads)

    @property
    def capacity(self) -> int:
        return (self.full or self.stream).capacity

    @property
    def length(self) -> jax.Array:
        """int32 [B] tokens the retrieval heads hold (the streaming heads' count when there are none)."""
        return (self.full or self.stream).length

    def has_room(self, n: int = 1) -> jax.Array:
        return jnp.asarray(True) if self.full is None else self.full.has_room(n)

    def with_room(self, n: int, round_up=lambda c: c) -> "DuoKV":
        return self if self.full is None else dataclasses.replace(self, full=self.full.with_room(n, round_up))

    def shrunk(self, capacity: int, room: int = 0, round_up=lambda c: c) -> "DuoKV":
        return self if self.full is None else dataclasses.replace(self, full=self.full.shrunk(capacity, room,
                                                                                               round_up))

    def quantize(self, quantizer, tokens: int, room: int = 0) -> "DuoKV":
        """Both kinds stored quantized: the retrieval heads as a `QuantKV` for `tokens` tokens, the
        streaming heads as a quantized `RollingKV` (its capacity C)."""
        return dataclasses.replace(self, full=None if self.full is None else self.full.quantize(quantizer, tokens,
                                                                                                 room),
                                   stream=None if self.stream is None else self.stream.quantize(quantizer))

    def _kr(self) -> int:
        return self.heads.shape[1] - (0 if self.stream is None else self.stream.score.shape[1])

    def append(self, k, v, pos, n_valid, features=None) -> "DuoKV":
        """k, v [B, K, T, D] (post-RoPE), pos int32 [B, T], n_valid int32 [B]: the retrieval heads append
        the T tokens, the streaming heads take them one at a time under the rolling rule."""
        kr = self._kr()
        kp, vp = _take_heads(k, self.heads, 1), _take_heads(v, self.heads, 1)  # storage order
        full, stream = self.full, self.stream
        if full is not None:
            full = full.append(kp[:, :kr], vp[:, :kr], pos, n_valid)
        if stream is not None:
            ks, vs = kp[:, kr:], vp[:, kr:]
            if k.shape[2] == 1:
                stream = stream.append(ks, vs, pos, n_valid)
            else:
                def one(st, x):
                    kt, vt, pt, i = x
                    return st.append(kt[:, :, None], vt[:, :, None], pt[:, None], (n_valid > i).astype(jnp.int32)), None

                xs = (ks.transpose(2, 0, 1, 3), vs.transpose(2, 0, 1, 3), pos.T, jnp.arange(k.shape[2]))
                stream = jax.lax.scan(one, stream, xs)[0]
        return dataclasses.replace(self, full=full, stream=stream)

    def attend(self, q, q_pos, block: int | None = None, return_lse: bool = False, impl: str = "xla"):
        """q [B, T, H, D] -> [B, T, H, D]: each kind's query heads over its own state (its kernel where
        `impl` asks for one and it has one)."""
        if return_lse:
            raise ValueError("DuoKV does not provide observations for eviction (compress a fresh prefill)")
        b, t, h, d = q.shape
        n_kv, kr = self.heads.shape[1], self._kr()
        g = h // n_kv
        qp = _take_heads(q.reshape(b, t, n_kv, g, d), self.heads, 2)  # [B, T, K, G, D] storage order
        outs = []
        for part, lo, hi in ((self.full, 0, kr), (self.stream, kr, n_kv)):
            if part is not None:
                out = part.attend(qp[:, :, lo:hi].reshape(b, t, (hi - lo) * g, d), q_pos, block, impl=impl)
                outs.append(out.reshape(b, t, hi - lo, g, -1))
        out = jnp.concatenate(outs, axis=2)
        back = jnp.argsort(self.heads, axis=1)  # storage index of each model head
        return _take_heads(out, back, 2).reshape(b, t, h, -1)

    def attend_jnp(self, q, q_pos, block: int | None = None, return_lse: bool = False):
        return self.attend(q, q_pos, block, return_lse, impl="xla")

    def positions(self) -> list[np.ndarray]:
        """Per KV head (model order), int32 [B, n_k] original positions held, ascending (rows must hold
        equal counts per head)."""
        heads = np.asarray(self.heads)
        kr = self._kr()
        parts = [(np.asarray(self.full.positions()), np.asarray(self.full.length)) if self.full is not None else None,
                 (np.asarray(self.stream.positions()), None) if self.stream is not None else None]
        out = []
        for kh in range(heads.shape[1]):
            held = []
            for b in range(heads.shape[0]):
                j = int(np.nonzero(heads[b] == kh)[0][0])
                pos, length = parts[0] if j < kr else parts[1]
                row = pos[b, j if j < kr else j - kr]
                row = row[: int(length[b])] if length is not None else row
                held.append(np.sort(row[row != EMPTY_POS]))
            if len({len(x) for x in held}) > 1:
                raise ValueError("rows hold different numbers of tokens; select one row first")
            out.append(np.stack(held))
        return out

    def memory_parts(self) -> dict:
        parts = [p.memory_parts() for p in (self.full, self.stream) if p is not None]
        out = {k: sum(p.get(k, 0) for p in parts) for k in {k for p in parts for k in p} - {"itemsize"}}
        out["itemsize"] = parts[0]["itemsize"]
        out["metadata"] += tree_nbytes(self.heads)
        return out
