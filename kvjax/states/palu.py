"""`PaluKV`: keys and values stored as low-rank latents of their pre-RoPE form, RoPE re-applied to the
reconstructed keys (Palu, Chang et al. 2024, arXiv 2407.21118).

Palu factorizes a layer's key (and value) projection W [E, gD] of a group of g KV heads as W ~ A B
(A [E, r], B [r, gD]; g = 1 is its per-head M-LRD, g > 1 its group-head G-LRD, g = K its joint J-LRD),
caches the latent h = x A [r] per token and group, and at attention reconstructs k = RoPE(h B) (Sec. 3.1,
3.4: RoPE cannot be folded into the query, so keys are rebuilt, which Palu's kernel fuses). Its whitened
SVD (SVD-LLM, Sec. 3.2) minimizes ||X W - X A B|| over calibration inputs X: with X^T X = L L^T and
L^T W = U S V^T, A = L^-T U_r S_r and B = V_r^T. Then x A = (x W) V_r: the latent is the token's full
pre-RoPE key projected on V_r, the top right singular vectors, which are also the top eigenvectors of the
keys' second moment (x W)^T (x W) summed over the calibration tokens (`kvjax.methods.palu`). This state
stores exactly that projection, h_k = k_pre V_k, h_v = v V_v, taking k_pre from the tokens' features.

Values need no reconstruction: attention's weighted sum of h_v, mapped back by V_v^T per head, equals
attention over the reconstructed values (Palu fuses B_v into the output projection: the same product).
Each block mixes latents (`LatentValues`); the map back runs once, after the softmax. At full rank
(r = gD) everything is exact.

**Decode cost.** Keys are rebuilt a block at a time inside the online softmax (`attention_part`,
`RebuiltKeys`): one [S_blk, R_k] x [R_k, gD] product per group and block, RoPE from a constant table of
offsets with the query turned by each block's first position, never the whole cache's keys at once and
no sin or cos per key. The product is the floor of any exact order: q . RoPE_p(h B) = h . (B R(-p) q)
costs R_k gD multiply-adds per key and group whichever side the rotation goes, since R(p) differs per
key; folding the query into B (the right-hand form) costs that per query head, G times more (measured
1.5x slower on CPU). Against the dense cache's 2 G D per key and KV head (scores and mix) that is
R_k D / (2 G D) = 5.3x the multiply-adds at SmolLM2's R_k = 32, G = 3, which a compute-bound CPU pays
(a Palu layer decodes slower than a dense one there; experiments/results/latent/README.md), and a
memory-bound GPU hides behind the halved reads (Palu's fused kernel).

Legend: B batch, T new tokens, S slots, H query heads, K KV heads, g KV heads per latent group,
N = K / g groups, D head dim, R_k / R_v latent ranks.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.attention import online_attention, slot_blocks
from kvjax.models.rope import apply_rope, consecutive_run, offset_rotations, rotate
from kvjax.states.base import StoreBacked
from kvjax.states.cache import KVCache
from kvjax.states.dense import DenseKV

DECODE_BLOCK = 256  # slots per key block of a decode step: 128 and 256 measured alike, 512 and 1024 ~1.4x slower
# (SmolLM2's sizes, 2k context, CPU; the rebuilt block, 256 x g D floats per group, stays in cache)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RebuiltKeys:
    """A block of post-RoPE keys [B, K, S_blk, D] as `online_attention` reads them, held as the group latents
    h [B, N, S_blk, R_k]: `scores(qf)` rebuilds k = h V_k^T (one [S_blk, R_k] x [R_k, gD] product per group)
    and scores it. Where the unmasked slots of each row hold consecutive positions p0 + j
    (`models.rope.consecutive_run`: every block of a cache that evicted nothing), q . R(p0 + j) k_j =
    (R(-p0) q) . (R(j) k_j): the query turns by -p0 (one sin/cos per row and block) and the keys by the
    constant table of j theta; other blocks rotate each key by its position."""

    h: jax.Array  # [B, N, S_blk, R_k]
    uk: jax.Array  # [N, gD, R_k]
    pos: jax.Array  # int32 [B, K, S_blk]
    hidden: jax.Array  # bool [B, K, S_blk]: masked slots (their keys are not needed)
    inv_freq: jax.Array  # float32 [D/2]
    table: tuple  # (cos, sin) [S_blk, D/2] of j theta (`models.rope.offset_rotations`)

    @property
    def shape(self):
        return self.pos.shape + (2 * self.inv_freq.shape[0],)

    def scores(self, qf):
        """qf [B, K, G*T, D] (scaled float32) -> q . k^T float32 [B, K, G*T, S_blk]."""
        b, n, s, _ = self.h.shape
        n_kv, d = self.pos.shape[1], self.shape[-1]
        k = jnp.einsum("bnsr,njr->bnsj", self.h.astype(jnp.float32), self.uk.astype(jnp.float32))
        if n_kv != n:  # [B, N, S, g D] -> [B, K, S, D]
            k = k.reshape(b, n, s, n_kv // n, d).transpose(0, 1, 3, 2, 4).reshape(b, n_kv, s, d)
        run, p0 = consecutive_run(self.pos, self.hidden)

        def table(k, qf):
            a0 = p0[..., None].astype(jnp.float32) * self.inv_freq  # [B, K, 1, D/2]
            return jnp.einsum("bkqd,bksd->bkqs", rotate(qf, jnp.cos(a0), -jnp.sin(a0)), rotate(k, *self.table))

        def per_key(k, qf):
            return jnp.einsum("bkqd,bksd->bkqs", qf, apply_rope(k, self.pos, self.inv_freq))

        return jax.lax.cond(run, table, per_key, k, qf)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentValues:
    """A block of value latents h_v [B, N, S_blk, R_v] read by the g KV heads of each group: `mix(p)` is the
    weighted sum of the latents, mapped back by V_v^T once after the softmax (`PaluKV.attend_jnp`)."""

    h: jax.Array  # [B, N, S_blk, R_v]
    group: int = dataclasses.field(metadata=dict(static=True), default=1)

    @property
    def shape(self):
        b, n, s, r = self.h.shape
        return (b, n * self.group, s, r)

    def mix(self, p):
        """p [B, K, G*T, S_blk] float32 -> [B, K, G*T, R_v]."""
        b, n, s, r = self.h.shape
        p = p.reshape(b, n, self.group * p.shape[2], s)  # the g heads of a group are consecutive
        out = jnp.einsum("bnqs,bnsr->bnqr", p, self.h.astype(jnp.float32))
        return out.reshape(b, n * self.group, -1, r)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PaluKV(StoreBacked):
    """Attributes:
      store: `DenseKV` with k = h_k [B, N, S, R_k] and v = h_v [B, N, S, R_v] (one row per group).
      uk: [N, gD, R_k] orthonormal columns V_k of each group's pre-RoPE keys (head-major within gD).
      uv: [N, gD, R_v] orthonormal columns V_v of its values.
      inv_freq: float32 [D/2] the layer's RoPE frequencies (`models.rope.rope_inv_freq`).
    """

    store: DenseKV
    uk: jax.Array
    uv: jax.Array
    inv_freq: jax.Array

    # logical axes (`kvjax.sharding`): latent groups are rows of KV heads; the frequencies are shared
    AXES = {"uk": ("kv_heads",), "uv": ("kv_heads",), "inv_freq": (None,)}

    @property
    def group(self) -> int:
        """g: KV heads per latent group."""
        return self.uk.shape[1] // self.head_dim

    @property
    def head_dim(self) -> int:
        return 2 * self.inv_freq.shape[0]

    @classmethod
    def init(cls, batch: int, capacity: int, uk: jax.Array, uv: jax.Array, inv_freq, dtype) -> "PaluKV":
        """An empty state of `capacity` slots per row with bases uk [N, gD, R_k], uv [N, gD, R_v]."""
        store = DenseKV.init(batch, uk.shape[0], capacity, uk.shape[2], dtype, value_dim=uv.shape[2])
        return cls(store=store, uk=jnp.asarray(uk, dtype), uv=jnp.asarray(uv, dtype),
                   inv_freq=jnp.asarray(inv_freq, jnp.float32))

    def positions(self) -> jax.Array:
        """int32 [B, K, S]: each KV head holds its group's tokens."""
        return jnp.repeat(self.store.pos, self.group, axis=1)

    def append(self, k, v, pos, n_valid, features=None) -> "PaluKV":
        """Project and write T tokens: k (post-RoPE, unused), v [B, K, T, D]; the pre-RoPE keys come from
        `features` [B, T, (H + 2K) D] (`models.llama.token_features`)."""
        if features is None:
            raise ValueError("a Palu layer stores latents of the pre-RoPE keys: pass features= (the model does)")
        b, n_kv, t, d = v.shape
        k_pre = features[..., -2 * n_kv * d: -n_kv * d].reshape(b, t, n_kv * d)  # [B, T, K D], head-major
        groups = self.uk.shape[0]
        v_flat = v.transpose(0, 2, 1, 3).reshape(b, t, n_kv * d)
        hk = jnp.einsum("btnj,njr->bntr", k_pre.reshape(b, t, groups, -1).astype(self.uk.dtype), self.uk)
        hv = jnp.einsum("btnj,njr->bntr", v_flat.reshape(b, t, groups, -1).astype(self.uv.dtype), self.uv)
        return dataclasses.replace(self, store=self.store.append(hk, hv, pos, n_valid))

    def keys(self) -> jax.Array:
        """The reconstructed post-RoPE keys [B, K, S, D]: RoPE(h_k V_k^T) at each slot's position (whole; the
        attention rebuilds them a block at a time, `RebuiltKeys`)."""
        b, groups, s, _ = self.store.k.shape
        g, d = self.group, self.head_dim
        k_pre = jnp.einsum("bnsr,njr->bnsj", self.store.k, self.uk).reshape(b, groups, s, g, d)
        k_pre = k_pre.transpose(0, 1, 3, 2, 4).reshape(b, groups * g, s, d)
        return apply_rope(k_pre, self.positions(), self.inv_freq)

    def attention_part(self, block: int | None):
        """`kvjax.attention.online_attention`'s part over the stored latents, `block` slots at a time (None:
        one block): `RebuiltKeys` and `LatentValues` blocks, each group's positions and masks repeated to
        its g KV heads."""
        g = self.group
        read, n = slot_blocks((self.store.k, self.store.v, self.store.pos), self.length, block)
        s_blk = jax.eval_shape(lambda: read(0))[0].shape[2]
        table = offset_rotations(s_blk, self.inv_freq)  # once per attention, outside the block loop

        def read_block(i):
            hk, hv, pos, hidden = read(i)
            pos, hidden = jnp.repeat(pos, g, axis=1), jnp.repeat(hidden, g, axis=1)
            return (RebuiltKeys(hk, self.uk, pos, hidden, self.inv_freq, table), LatentValues(hv, g), pos,
                    hidden)

        return read_block, n

    def attend_jnp(self, q, q_pos, block: int | None = None, return_lse: bool = False):
        """Attention of q [B, T, H, D] over the keys rebuilt a block at a time and the value latents, mapped
        back per head -> [B, T, H, D] (and the lse [B, K, G*T]). A decode step (T = 1) reads `DECODE_BLOCK`
        slots at a time whatever `block` (one pass would rebuild every key at once); a prefill chunk reads
        `block` (None: one block)."""
        b, t, h, d = q.shape
        g = self.group
        n_kv = self.uk.shape[0] * g
        if t == 1:
            block = DECODE_BLOCK
        out = online_attention(q, q_pos, [self.attention_part(block)], return_lse)
        out, lse = out if return_lse else (out, None)
        uv = self.uv.reshape(self.uv.shape[0], g, d, -1).reshape(n_kv, d, -1)  # [K, D, R_v]: head k's rows
        full = jnp.einsum("btkgr,kdr->btkgd", out.reshape(b, t, n_kv, h // n_kv, -1), uv.astype(out.dtype))
        full = full.reshape(b, t, h, d)
        return (full, lse) if return_lse else full

    def with_room(self, n: int, round_up=lambda c: c) -> "PaluKV":
        return dataclasses.replace(self, store=self.store.with_room(n, round_up))


def palu_cache(bases_k, bases_v, inv_freqs, batch: int, capacity: int, dtype):
    """An empty cache of `PaluKV` layers: per layer l, the bases `bases_k[l]` (`[N, gD, R_k]`) and `bases_v[l]`
    (`[N, gD, R_v]`) and the RoPE frequencies `inv_freqs[l]` (`[D/2]`)."""
    layers = tuple(PaluKV.init(batch, capacity, uk, uv, f, dtype) for uk, uv, f in zip(bases_k, bases_v, inv_freqs))
    return KVCache(layers=layers, next_pos=jnp.zeros((batch,), jnp.int32))
