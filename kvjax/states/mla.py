"""`MLAKV`: the latent layer state of multi-head latent attention (MLA, DeepSeek-V2, arXiv 2405.04434).

MLA caches per token only the normalized latent c^KV_t = RMSNorm(W^DKV h_t) of rank d_c (eq. 9) and the
decoupled RoPE key k^R_t = RoPE(W^KR h_t) of P dims shared by every head (eq. 14), not per-head keys
and values: (d_c + P) numbers per token and layer, whatever the number of heads. Head i's key and
value are up-projections of the latent, k^C_{t,i} = W^UK_i c_t and v^C_{t,i} = W^UV_i c_t (eqs. 10-11),
and its full key is [k^C_{t,i}; k^R_t] (eq. 15).

**Absorbed form** (Sec. 2.1.2, "we can absorb W^UK into W^Q, and W^UV into W^O"): since
q_{t,i}^C . k^C_{s,i} = (W^UK_i^T q_{t,i}^C) . c_s, the model folds W^UK into the query,
q~_{t,i} = [W^UK_i^T q^C_{t,i}; q^R_{t,i}] (width d_c + P), and attention is plain softmax attention
of one KV head whose key is [c_s; k^R_s] and whose value is c_s; the latent output o~_{t,i} is mapped
back by W^UV_i (eq. 18) before W^O (eq. 19). `attend` is exactly that: it takes q~ (already scaled,
see below) and returns the latent output [B, T, H, d_c]; per-head keys and values never exist.
**Expanded form** (`attend_expanded`, for prefill chunks, where T queries share each key's
expansion): each key block is up-projected per head inside the blockwise engine (k = [c W^UK; k^R],
v = c W^UV), so the cost per key is O(d_c H (d_h + d_v)) once per chunk instead of per query.

Both run on `kvjax.attention.online_attention` (block by block, never [T, S]) over the store's parts.
The engine scales scores by 1/sqrt(query width); the model pre-multiplies its query by
softmax_scale * sqrt(width) so the scores are exactly the model's (DeepSeek's 1/sqrt(d_h + P) times
YaRN's mscale^2).

The state generalizes to K latent heads (K = 1 for DeepSeek; K > 1 is a grouped latent, as the
state table exercises). Layout: a `DenseKV` store whose "keys" are k^R [B, K, S, P] and whose "values"
are c [B, K, S, d_c], so slots, positions, lengths, growth, eviction (`keep_top`) and quantization
(`DenseKV.quantize` -> `QuantKV` over a `QuantStore`: k^R per the quantizer's key layout, c per its
value layout; an int4 latent is `quantize(get("kivi-4"))` or `per_token-4`) are the dense ones.

**Eviction.** Score methods see the latent as K = 1 KV head (`ScoreContext.k` = [c; k^R], `v` = c) and
the model's observed queries are the absorbed, scaled q~: SnapKV / TOVA / PyramidKV window
attention, H2O column sums and Knorm then score exactly the attention MLA computes (window attention
and column sums are real MLA attention probabilities), and the group mean runs over all H query
heads. A kept token is kept for every head (one latent per token). Methods that rotate pre-RoPE
queries (ExpectedAttention) or store per-head pools (Ada-KV) do not apply.

Legend: B batch, T new tokens, S slots, H query heads, K latent heads (1), R latent rank d_c, P RoPE
key dims, N per-head no-RoPE query/key dims d_h, V per-head value dims.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.attention import online_attention, score_block, slot_blocks
from kvjax.states.base import StoreBacked
from kvjax.states.cache import KVCache, register_layout, route_share
from kvjax.states.dense import DenseKV, QuantKV


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MLAKV(StoreBacked):
    """One layer's MLA cache: the latents and the shared RoPE keys, nothing per head.

    Attributes:
      store: `DenseKV` with k = k^R [B, K, S, P] (post-RoPE shared key) and v = c [B, K, S, R]
        (normalized latent), or the same stored quantized (`QuantKV`).
      fake_quant: static; None, or a quantizer whose round trip (quantize, dequantize) `append` applies to
        what it stores, with a straight-through gradient (identity backward, Bengio et al. 2013): training
        against the numbers an int4 latent will hold (CLLA's int4 latent, arXiv 2410.15252).
    """

    store: DenseKV | QuantKV
    fake_quant: object = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def init(cls, batch: int, capacity: int, rank: int, rope_dim: int, dtype, n_latent: int = 1,
             fake_quant=None) -> "MLAKV":
        """An empty state of `capacity` slots per row: latent rank R = `rank`, RoPE key dims P = `rope_dim`."""
        return cls(store=DenseKV.init(batch, n_latent, capacity, rope_dim, dtype, value_dim=rank),
                   fake_quant=fake_quant)

    # ------------------------------------------------------------------------ what scorers read
    @property
    def k_rope(self) -> jax.Array:  # [B, K, S, P]
        return self.store.k

    @property
    def latent(self) -> jax.Array:  # [B, K, S, R]
        return self.store.v

    @property
    def k(self) -> jax.Array:
        """[B, K, S, R + P]: the key of the absorbed form, [c; k^R] (what score methods see)."""
        return jnp.concatenate([self.store.v, self.store.k], axis=-1)

    @property
    def v(self) -> jax.Array:
        """[B, K, S, R]: the value of the absorbed form, c."""
        return self.store.v

    @property
    def pos(self) -> jax.Array:
        return self.store.pos

    # ----------------------------------------------------------------------------------- writing
    def append(self, k, v, pos, n_valid, features=None) -> "MLAKV":
        """Write T tokens: k = k^R [B, K, T, P] (post-RoPE shared key), v = c [B, K, T, R] (normalized
        latent), pos int32 [B, T], n_valid int32 [B]."""
        if self.fake_quant is not None:
            k, v = fake_quantized(self.fake_quant, k, v, pos)
        return dataclasses.replace(self, store=self.store.append(k, v, pos, n_valid))

    # ----------------------------------------------------------------------------------- reading
    def latent_parts(self, block: int | None):
        """`online_attention` parts whose blocks read (k^R, c, pos, hidden) [B, K, blk, ...]: the dense
        store's slots, or the quantized store's sink | store blocks (dequantized one at a time) | residual."""
        if isinstance(self.store, QuantKV):
            return self.store.store.attention_parts(block, dequantized=True)  # blocks are concatenated
        return [slot_blocks((self.store.k, self.store.v, self.store.pos), self.store.length, block)]

    def attend_jnp(self, q, q_pos, block: int | None = None, return_lse: bool = False):
        """Absorbed attention (eqs. 17-18 with W^UK folded into q): q~ [B, T, H, R + P] = [W^UK^T q^C; q^R],
        pre-scaled (module docstring) -> the latent output [B, T, H, R] (and the lse [B, K, G*T])."""
        def absorbed(read):
            def block_of(i):
                kr, c, pos, hidden = read(i)
                return jnp.concatenate([c, kr.astype(c.dtype)], axis=-1), c, pos, hidden
            return block_of

        parts = [(absorbed(read), n) for read, n in self.latent_parts(score_block(block, q, self.store.pos.shape[1]))]
        return online_attention(q, q_pos, parts, return_lse)

    def attend_expanded(self, q, q_pos, w_uk, w_uv, block: int | None = None, return_lse: bool = False):
        """Expanded attention (eqs. 10-11, 15-18): q [B, T, H, N + P] = [q^C; q^R] (pre-scaled), w_uk
        [R, H, N], w_uv [R, H, V]. Each key block is up-projected per head as it is scored (the
        latent's K = 1 group is repeated to H heads); -> [B, T, H, V] (and the lse [B, H, T]).
        Every query head has its own key here, so this is H KV heads with G = 1."""
        h = q.shape[2]
        if self.store.pos.shape[1] != 1:
            raise ValueError("the expanded form is for one latent head (DeepSeek MLA)")

        def expanded(read):
            def block_of(i):
                kr, c, pos, hidden = read(i)  # [B, 1, blk, P], [B, 1, blk, R], [B, 1, blk] x2
                kc = jnp.einsum("bsr,rhn->bhsn", c[:, 0], w_uk.astype(c.dtype))
                vc = jnp.einsum("bsr,rhv->bhsv", c[:, 0], w_uv.astype(c.dtype))
                kr = jnp.broadcast_to(kr.astype(kc.dtype), (kr.shape[0], h) + kr.shape[2:])
                rep = lambda x: jnp.broadcast_to(x, (x.shape[0], h) + x.shape[2:])  # noqa: E731
                return jnp.concatenate([kc, kr], axis=-1), vc, rep(pos), rep(hidden)
            return block_of

        parts = [(expanded(read), n) for read, n in self.latent_parts(score_block(block, q, h))]
        return online_attention(q, q_pos, parts, return_lse)

    # --------------------------------------------------------------------- eviction, room, quantization
    def keep_top(self, scores, n_keep, capacity: int, carry=None):
        """Each row's top `n_keep[b]` latents by score [B, K, S] (`DenseKV.keep_top` of the store)."""
        out = self.store.keep_top(scores, n_keep, capacity, carry)
        store, rest = (out, None) if carry is None else out
        kept = dataclasses.replace(self, store=store)
        return kept if carry is None else (kept, rest)

    def with_room(self, n: int, round_up=lambda c: c) -> "MLAKV":
        return dataclasses.replace(self, store=self.store.with_room(n, round_up))

    def shrunk(self, capacity: int, room: int = 0, round_up=lambda c: c) -> "MLAKV":
        return dataclasses.replace(self, store=self.store.shrunk(capacity, room, round_up))

    def quantize(self, quantizer, tokens: int, room: int = 0) -> "MLAKV":
        """The latents (as values) and RoPE keys (as keys) in a quantized store for up to `tokens` per
        row: an int4 latent is `quantize(get("per_token-4"))`. A quantizer of pre-RoPE keys (KVQuant)
        does not apply: it would undo the model's Llama RoPE, not MLA's decoupled one."""
        if getattr(quantizer, "rotate", None) is not None:
            raise ValueError(f"{getattr(quantizer, 'name', quantizer)!r} quantizes pre-RoPE keys; an MLA state "
                             "stores the decoupled RoPE key (no Llama RoPE to undo)")
        return dataclasses.replace(self, store=self.store.quantize(quantizer, tokens, room))


def fake_quantized(quantizer, k, v, pos):
    """(k, v) [B, K, T, ...] replaced by their quantize-dequantize round trip under `quantizer` in the
    forward pass, unchanged in the backward pass (straight-through estimator)."""
    kpos = jnp.broadcast_to(pos[:, None, :], k.shape[:3])
    k0, v0 = jax.lax.stop_gradient(k), jax.lax.stop_gradient(v)  # rounding has no derivative to trace
    k_rt = quantizer.dequantize_keys(quantizer.quantize_keys(k0, kpos), kpos, k.dtype)
    v_rt = quantizer.dequantize_values(quantizer.quantize_values(v0), v.dtype)
    return k + (k_rt - k0), v + (v_rt - v0)


def mla_cache(cfg, batch: int, capacity: int, attention_impl: str = "xla", fake_quant=None) -> KVCache:
    """An empty cache of `MLAKV` layers for a config with `kv_lora_rank` and `qk_rope_head_dim`; with
    `cfg.latent_route` (CLLA), one state per producer layer, read by its group (`KVCache.share`).
    `fake_quant`: a quantizer (`Quantizer.for_model` done) each state fake-quantizes what it stores with
    (training, `MLAKV.fake_quant`)."""
    route = getattr(cfg, "latent_route", None)
    share = None if route is None else route_share(route)
    n_states = cfg.n_layers if share is None else len(set(share))
    layers = tuple(MLAKV.init(batch, capacity, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.jnp_dtype,
                              fake_quant=fake_quant) for _ in range(n_states))
    return KVCache(layers=layers, next_pos=jnp.zeros((batch,), jnp.int32), share=share, attention_impl=attention_impl)


register_layout("mla", mla_cache)
