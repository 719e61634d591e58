"""Observations: what eviction scorers need from the prefill, gathered chunk by chunk (never T x T).

`ObsSpec` (static) says what to gather; `LayerObs` (a pytree, one per layer) holds it:

* window queries (SnapKV, PyramidKV, TOVA): post-RoPE queries of each row's last `window` prompt
  tokens, captured from whichever prefill chunk holds them;
* column sums (H2O / ObservedAttention): sum over all prompt queries of the attention each key slot
  receives, from a second blockwise pass with the exact log-sum-exp (`attention_column_sums`);
* query statistics (ExpectedAttention): sum and sum of outer products of pre-RoPE queries at
  positions >= `qstats_from`, per query head;
* non-causal chunked column sums (NonCausalAttention): the prompt cut into aligned blocks of
  `nc_chunk` tokens, every query attends to all keys of its block (unscaled logits, kvpress's padding
  of the last block), summed over the block's queries per key. A block lies inside one prefill chunk
  (`nc_chunk` divides it), so each is computed where its queries and keys are;
* output-projected value norms (CriticalKV): ||v_j W_o[h]||_1 per query head h (`wov`), from the
  layer's values and its o_proj weights;
* reconstruction attention (KVzip, `replay`): while a replay prompt is fed on top of a prefilled
  cache, the largest attention each prompt slot of a span receives from the replay queries, per KV
  head (`reconstruction_attention`), softmax over the sinks, the span and the replay tokens only.

Legend: B batch, T chunk tokens, W window, S cache slots, H query heads, D head dim.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from kvjax.attention import _fold_queries, attention_column_sums
from kvjax.kernels import dispatch


@dataclasses.dataclass(frozen=True)
class ObsSpec:
    window: int = 0  # window queries to keep (0: none)
    col_sums: bool = False
    qstats_from: int | None = None  # first position counted in query statistics (None: no stats)
    nc_chunk: int = 0  # block size of non-causal chunked column sums (0: none)
    wov: bool = False  # L1 norms of the output-projected values (CriticalKV)
    replay: "ReplaySpec | None" = None  # reconstruction attention of a replay pass (KVzip)
    hidden: bool = False  # the attention input of every prompt slot (KVzap's scorer input)


@dataclasses.dataclass(frozen=True)
class ReplaySpec:
    """Static widths of a replay pass's key set (KVzip): `sink` first slots, a span of at most `chunk`
    prompt slots, and at most `length` replay tokens (the replay prompt, padded)."""

    sink: int
    chunk: int
    length: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerObs:
    """Attributes (fields a spec does not ask for have a zero-sized axis):
      q_win: [B, W, H, D] post-RoPE queries at positions `win_pos`.
      win_pos: int32 [B, W] positions of the window queries (negative: before the prompt, unused).
      col_sum: float32 [B, H, S] attention received by each slot, summed over prompt queries.
      q_sum: float32 [B, H, D]; q_sq: float32 [B, H, D, D]; q_cnt: float32 [B]: pre-RoPE query stats.
      nc_sum: float32 [B, H, S] non-causal chunked attention received by each slot (summed over the
        queries of its block).  prompt_len: int32 [B] each row's prompt length.
      wov: float32 [B, H, S] ||v_j W_o[h]||_1 for query head h (v_j of its KV head).
      replay: float32 [B, K, S] reconstruction attention of each prompt slot (max so far).
      span: int32 [B, 3] (sinks, start, end) of the replay: slots [0, sinks) and [start, end) are the
        prompt keys its queries see, `prompt_len` the slot where the replay tokens begin.
      hidden: [B, S, E] each prompt slot's attention input (the normed hidden state; slot = position).
    """

    q_win: jax.Array
    win_pos: jax.Array
    col_sum: jax.Array
    q_sum: jax.Array
    q_sq: jax.Array
    q_cnt: jax.Array
    nc_sum: jax.Array = None  # defaults: observations built by hand without them stay valid
    prompt_len: jax.Array = None
    wov: jax.Array = None
    replay: jax.Array = None
    span: jax.Array = None
    hidden: jax.Array = None


def init_layer_obs(spec: ObsSpec, lengths, n_heads: int, head_dim: int, capacity: int, dtype,
                   n_kv_heads: int = 0, d_model: int = 0) -> LayerObs:
    """Empty observations for rows of total prompt lengths `lengths` [B] (`n_kv_heads`: for `replay`,
    `d_model`: for `hidden`)."""
    if spec.hidden and d_model < 1:
        raise ValueError("the hidden-state observation needs the model width: pass d_model=")
    b = lengths.shape[0]
    w = spec.window
    s = capacity if spec.col_sums else 0
    dq = head_dim if spec.qstats_from is not None else 0
    return LayerObs(
        q_win=jnp.zeros((b, w, n_heads, head_dim), dtype),
        win_pos=(jnp.asarray(lengths, jnp.int32)[:, None] - w + jnp.arange(w, dtype=jnp.int32)),
        col_sum=jnp.zeros((b, n_heads, s), jnp.float32),
        q_sum=jnp.zeros((b, n_heads, dq), jnp.float32),
        q_sq=jnp.zeros((b, n_heads, dq, dq), jnp.float32),
        q_cnt=jnp.zeros((b,), jnp.float32),
        nc_sum=jnp.zeros((b, n_heads, capacity if spec.nc_chunk else 0), jnp.float32),
        prompt_len=jnp.asarray(lengths, jnp.int32),
        wov=jnp.zeros((b, n_heads, capacity if spec.wov else 0), jnp.float32),
        replay=jnp.zeros((b, n_kv_heads if spec.replay else 0, capacity if spec.replay else 0), jnp.float32),
        span=jnp.zeros((b, 3), jnp.int32),
        hidden=jnp.zeros((b, capacity if spec.hidden else 0, d_model if spec.hidden else 0), dtype),
    )


def observe_chunk(spec: ObsSpec, obs: LayerObs, q_pre, q, positions, n_valid, state, lse, block,
                  attention_impl: str = "xla", values=None, wo=None, hidden=None) -> LayerObs:
    """Fold one prefill chunk into a layer's observations.

    Args:
      q_pre, q: [B, T, H, D] queries before / after RoPE.  positions: int32 [B, T].
      n_valid: int32 [B] real tokens of each row in this chunk.  state: the layer state after the
        chunk was appended.  lse: [B, K, G*T] log-sum-exp of the chunk's attention (col sums only).
      attention_impl: "pallas"/"auto" sum columns with the key-major kernel (`kvjax.kernels`), "xla" in jnp.
      values: [B, T, K, D] the chunk's values, wo: [H * D, E] the layer's o_proj kernel (`wov` only).
      hidden: [B, T, E] the chunk's attention inputs (`hidden` only).
    """
    valid = jnp.arange(q.shape[1])[None, :] < n_valid[:, None]  # [B, T]
    updates = {}
    if spec.window:
        idx = obs.win_pos - positions[:, :1]  # [B, W] index of each window position in this chunk
        here = (idx >= 0) & (idx < n_valid[:, None])
        picked = jnp.take_along_axis(q, jnp.clip(idx, 0, q.shape[1] - 1)[:, :, None, None], axis=1)
        updates["q_win"] = jnp.where(here[:, :, None, None], picked.astype(obs.q_win.dtype), obs.q_win)
    if spec.col_sums:
        if attention_impl in ("pallas", "auto"):
            col = dispatch.column_sums(q, positions, valid, state, lse)
        else:
            col = attention_column_sums(q, positions, valid, state.k, state.pos, state.length, lse, block)
        updates["col_sum"] = obs.col_sum + col
    if spec.qstats_from is not None:
        m = (valid & (positions >= spec.qstats_from)).astype(jnp.float32)  # [B, T]
        q32 = q_pre.astype(jnp.float32)
        updates["q_sum"] = obs.q_sum + jnp.einsum("bt,bthd->bhd", m, q32)
        updates["q_sq"] = obs.q_sq + jnp.einsum("bt,bthd,bthe->bhde", m, q32, q32)
        updates["q_cnt"] = obs.q_cnt + m.sum(1)
    if spec.nc_chunk:
        if type(state).__name__ != "DenseKV":
            raise ValueError(f"non-causal attention scores read keys at slot = position (a dense prefill); this "
                             f"layer's {type(state).__name__} stores them otherwise")
        updates["nc_sum"] = obs.nc_sum + noncausal_chunk_sums(q, positions, obs.prompt_len, state, spec.nc_chunk,
                                                               obs.nc_sum.shape[2])
    if spec.wov:
        if values is None or wo is None:
            raise ValueError("this model's attention does not pass its values and o_proj weights to the "
                             "observations: CriticalKV cannot score it")
        updates["wov"] = obs.wov + projected_value_norms(values, wo, positions, valid, obs.wov.shape[2])
    if spec.hidden:
        if hidden is None:
            raise ValueError("this model's attention does not pass its hidden states to the observations: "
                             "KVzap cannot score it")
        rows = jnp.where(valid, positions, obs.hidden.shape[1])  # padding: out of range, dropped
        updates["hidden"] = obs.hidden.at[jnp.arange(q.shape[0])[:, None], rows].set(
            hidden.astype(obs.hidden.dtype), mode="drop")
    if spec.replay is not None:
        updates["replay"] = reconstruction_attention(q, positions, valid, state, obs.span, obs.prompt_len, obs.replay,
                                                     spec.replay)
    return dataclasses.replace(obs, **updates)


def reconstruction_attention(q, positions, valid, state, span, prompt_len, acc, r: ReplaySpec) -> jax.Array:
    """float32 [B, K, S]: `acc` raised to the largest attention each slot of the span receives from these
    replay queries (kvpress 0.5.5 `KVzipPress.score_kvzip`: max over the queries and over the G query
    heads of each KV group).

    The softmax of each replay query runs over its key set only (kvpress `_compute_cross_attention`):
    the `span[:, 0]` sink slots, the span slots [span[:, 1], span[:, 2]) and the replay tokens (slots from
    `prompt_len` on, causal), logits q.k / sqrt(D) in float32. q: [B, T, H, D] post-RoPE replay queries at
    `positions` [B, T], `valid` bool [B, T]; `state` the dense layer state after their append (slot =
    position). Memory: [G*T, sink + chunk + length] logits per KV head, bounded by the replay's chunk
    and never by the prompt.
    """
    b, t, h, _ = q.shape
    n_kv, s = state.k.shape[1], state.k.shape[2]
    qf, qf_pos = _fold_queries(q, positions, n_kv)  # [B, K, G*T, D], [B, G*T]
    sink, start, end = span[:, 0:1], span[:, 1:2], span[:, 2:3]
    j_sink, j_chunk, j_self = jnp.arange(r.sink)[None], jnp.arange(r.chunk)[None], jnp.arange(r.length)[None]
    slots = jnp.concatenate([jnp.broadcast_to(j_sink, (b, r.sink)), start + j_chunk, prompt_len[:, None] + j_self], 1)
    used = jnp.concatenate([j_sink < sink, start + j_chunk < end, jnp.ones((b, r.length), bool)], 1)  # [B, W]
    used &= slots < state.length[:, None]
    slots = jnp.minimum(slots, s - 1)
    k = jnp.take_along_axis(state.k, slots[:, None, :, None], axis=2).astype(jnp.float32)  # [B, K, W, D]
    pos = jnp.take_along_axis(state.pos, jnp.broadcast_to(slots[:, None], (b, n_kv, slots.shape[1])), axis=2)
    logits = jnp.einsum("bkqd,bkwd->bkqw", qf, k)
    seen = used[:, None, None, :] & (pos[:, :, None, :] <= qf_pos[:, None, :, None])  # [B, K, G*T, W]
    p = jax.nn.softmax(jnp.where(seen, logits, jnp.finfo(jnp.float32).min), axis=-1)
    rows = jnp.tile(valid, (1, h // n_kv))[:, None, :, None]  # padding queries give nothing
    col = jnp.max(jnp.where(rows & seen, p, 0.0), axis=2)[:, :, r.sink:r.sink + r.chunk]  # [B, K, chunk]
    dest = jnp.where(start + j_chunk < end, start + j_chunk, s)  # slots outside the span: dropped
    return acc.at[jnp.arange(b)[:, None, None], jnp.arange(n_kv)[None, :, None], dest[:, None, :]].max(
        col, mode="drop")



def noncausal_chunk_sums(q, positions, lengths, state, chunk: int, n_slots: int) -> jax.Array:
    """float32 [B, H, n_slots] column sums of non-causal attention inside aligned blocks of `chunk`
    positions (kvpress 0.5.5 `NonCausalAttnPress.non_causal_chunked_attn`): logits q.k without the
    1/sqrt(D) scale; in the block holding the prompt's end, keys past it get logit -1e-9 and queries
    past it logits 0 (kvpress's zero padding), and both still take part in the softmax and the sums.

    q: [B, T, H, D] post-RoPE queries at `positions` [B, T] (one prefill chunk, starting at a multiple of
    `chunk`; padded here to whole blocks); keys are read from the dense prefill state (slot = position).
    Memory: T x chunk logits per head, never T x T.
    """
    b, t, h, d = q.shape
    n_kv = state.k.shape[1]
    g = h // n_kv
    pad = (-t) % chunk
    idx = jnp.clip(positions, 0, state.k.shape[2] - 1)
    k = jnp.take_along_axis(state.k, idx[:, None, :, None], axis=2).astype(jnp.float32)  # [B, K, T, D]
    qq = q.astype(jnp.float32).reshape(b, t, n_kv, g, d)
    pos = positions
    if pad:  # the chunk ends inside a block (past the prompt's end): pad to whole blocks
        qq = jnp.pad(qq, [(0, 0), (0, pad), (0, 0), (0, 0), (0, 0)])
        k = jnp.pad(k, [(0, 0), (0, 0), (0, pad), (0, 0)])
        pos = jnp.concatenate([pos, pos[:, -1:] + 1 + jnp.arange(pad, dtype=pos.dtype)[None]], axis=1)
    n = (t + pad) // chunk
    qb = qq.reshape(b, n, chunk, n_kv, g, d)
    kb = k.reshape(b, n_kv, n, chunk, d)
    valid = (pos < lengths[:, None]).reshape(b, n, chunk)  # [B, N, C]
    dots = jnp.einsum("bnikgd,bknjd->bkgnij", qb, kb)  # [B, K, G, N, Cq, Ck]
    vq, vk = valid[:, None, None, :, :, None], valid[:, None, None, :, None, :]
    dots = jnp.where(vk, jnp.where(vq, dots, 0.0), -1e-9)
    col = jax.nn.softmax(dots, axis=-1).sum(-2)  # [B, K, G, N, Ck]
    col = jnp.where(valid[:, None, None], col, 0.0).reshape(b, h, -1)[..., :t]  # keys past the prompt: 0
    out = jnp.zeros((b, h, n_slots), jnp.float32)
    return out.at[jnp.arange(b)[:, None], :, positions].add(col.transpose(0, 2, 1), mode="drop")


def projected_value_norms(values, wo, positions, valid, n_slots: int) -> jax.Array:
    """float32 [B, H, n_slots]: ||v_j W_o[h]||_1, the L1 norm over the model dim of value j (of head h's KV
    head) through head h's rows of o_proj (kvpress 0.5.5 `CriticalKVPress.vwl1norm`, before its group mean)."""
    b, t, n_kv, d = values.shape
    h = wo.shape[0] // d
    w = wo.astype(jnp.float32).reshape(n_kv, h // n_kv, d, -1)  # [K, G, D, E]
    norms = jnp.abs(jnp.einsum("btkd,kgde->btkge", values.astype(jnp.float32), w)).sum(-1).reshape(b, t, h)
    norms = jnp.where(valid[..., None], norms, 0.0)
    out = jnp.zeros((b, h, n_slots), jnp.float32)
    return out.at[jnp.arange(b)[:, None], :, positions].add(norms, mode="drop")
