"""`PagedKV`: a paged layer state in which eviction frees pages (issue 22).

One pool of NP pages of P slots is shared by every row and KV head; each (row, KV head) has a page
table of MP entries (vLLM's PagedAttention, Kwon et al. 2023, arXiv 2309.06180, with one table per KV
head so that per-head eviction frees pages too). Logical slot s of head k of row b lives in pool page
table[b, k, s // P] at offset s % P. Free pages are a stack (`free[:n_free]`); appending pops the
pages a head needs, so rows of very different lengths hold only ceil(fill / P) pages each.

**Eviction** (`evict`, from any keep mask: `keep_top` for a score method's scores, `keep_top_pairs`
for Ada-KV's per-head budgets, `roll` for decode-time rolling by StreamingLLM, H2O or TOVA) writes `EMPTY_POS` into the dropped
slots (holes: no query position reaches it) and returns every page left with no token to the free
list, where any row's next append takes it. When a head's fragmentation (the fraction of the slots of
the pages it holds that hold no token) passes `threshold` and packing would free a page, the head is
**compacted**: its tokens move, in logical order, into its first ceil(n / P) held pages, and the rest
are freed. Everything is one jittable function of arrays with static shapes (the pool, the tables and
the free stack never change shape); vLLM's RFC for eviction from its paged cache is still open.

**Use**: `LM.generate(ids, method="snapkv", ratio=0.5, layout="paged", page_size=16)` (or `kvjax
generate --layout paged --page-size 16`) prefills onto `paged_cache` (a pool of exactly the pages the
prompts and their decode room fill), evicts each layer by the method's `page_keep` (a plain scorer's
per-head top-k, Ada-KV's pairs) and cuts each pool to the pages held plus the decode room (`shrunk`):
the same greedy tokens as the padded layout. Room: `has_room(n)` is true exactly when `append` writes
(without it nothing is written); `with_room` grows the pool and tables host-side. Not wired yet:
decode-time eviction (`roll`) from `generate(capacity=)`, quantized pages, one pool shared by layers.

**Memory**: `nbytes()` is the allocated pool (capacity: NP pages whether held or not, plus tables);
`held_bytes()` = pages held x `page_bytes` is what the layout uses (what a shared pool would charge
this layer).

Legend: B batch, T new tokens, K KV heads, D head dim, NP pool pages, P page size (slots), MP table
entries per head, L = MP * P logical slots per head.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import online_attention
from kvjax.kernels.dispatch import unsupported
from kvjax.kernels.paged_decode_attention import paged_decode_attention
from kvjax.states.base import EMPTY_POS, LayerState
from kvjax.states.cache import KVCache
from kvjax.states.dense import DenseKV

RULES = ("streaming", "h2o", "tova")


def _cdiv(a, b):
    return (a + b - 1) // b


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKV(LayerState):
    """Attributes:
      k, v: [NP, P, D] the page pool (post-RoPE keys, values).
      pos: int32 [NP, P] position of each pool slot's token (`EMPTY_POS`: none: evicted, unwritten, free).
      table: int32 [B, K, MP] pool page of each logical page of each head (-1: none / freed).
      fill: int32 [B, K] logical slots written per head (appends go there; holes below it are not reused).
      length: int32 [B, K] tokens held per head.
      free: int32 [NP] a stack: free[:n_free] are the free pages.  n_free: int32 [].
      score: float32 [NP, P] the decode-time rule's keep-score of each pool slot (None for "streaming").
      threshold: static fragmentation above which `evict` compacts a head.
      rule: static decode-time eviction rule of `roll` ("streaming", "h2o", "tova"; as `RollingKV`).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    table: jax.Array
    fill: jax.Array
    length: jax.Array
    free: jax.Array
    n_free: jax.Array
    score: jax.Array | None = None
    threshold: float = dataclasses.field(default=0.25, metadata=dict(static=True))
    rule: str = dataclasses.field(default="streaming", metadata=dict(static=True))

    # logical axes (`kvjax.sharding`): the pool and its free stack are shared by every row and head, so
    # replicated; the tables, fills and lengths are [B, K] (the convention)
    AXES = {"k": (), "v": (), "pos": (), "free": (), "score": ()}

    # ------------------------------------------------------------------------------ shapes
    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    @property
    def n_pages(self) -> int:
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        """Logical slots per head (L = MP * P)."""
        return self.table.shape[2] * self.page_size

    @property
    def page_bytes(self) -> int:
        """Bytes of one page: its K and V and its slots' positions (and scores)."""
        return self.page_size * (2 * self.k.shape[2] * self.k.dtype.itemsize + 4 + 4 * (self.score is not None))

    def pages_held(self) -> jax.Array:
        """int32 []: pages taken from the pool."""
        return self.n_pages - self.n_free

    def held_bytes(self) -> jax.Array:
        """Memory used: pages held x page bytes (`nbytes()` is the allocated pool)."""
        return self.pages_held() * self.page_bytes

    def used_pages(self) -> jax.Array:
        """int32 [B, K]: table entries in use per head (ceil(fill / P); freed holes among them)."""
        return _cdiv(self.fill, self.page_size)

    @classmethod
    def init(cls, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype, page_size: int = 16,
             n_pages: int | None = None, threshold: float = 0.25, rule: str = "streaming") -> "PagedKV":
        """An empty pool: tables of ceil(capacity / P) entries per head, `n_pages` pages in all (default:
        enough for every head to fill its table, the dense cache's size). `page_size` must be a power
        of two, so it tiles the kernel's (power-of-two) block. `rule`: what `roll` evicts by (a score
        per slot is kept for "h2o" and "tova")."""
        check_page_size(page_size)
        if not 0 <= threshold <= 1:
            raise ValueError(f"fragmentation threshold must be in [0, 1], got {threshold!r}")
        if rule not in RULES:
            raise ValueError(f"decode-time rule must be one of {RULES}, got {rule!r}")
        n_table = _cdiv(capacity, page_size)
        n_pages = batch * n_kv_heads * n_table if n_pages is None else n_pages
        if n_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got n_pages={n_pages}")
        return cls(k=jnp.zeros((n_pages, page_size, head_dim), dtype), v=jnp.zeros((n_pages, page_size, head_dim), dtype),
                   pos=jnp.full((n_pages, page_size), EMPTY_POS, jnp.int32),
                   table=jnp.full((batch, n_kv_heads, n_table), -1, jnp.int32),
                   fill=jnp.zeros((batch, n_kv_heads), jnp.int32), length=jnp.zeros((batch, n_kv_heads), jnp.int32),
                   free=jnp.arange(n_pages - 1, -1, -1, dtype=jnp.int32), n_free=jnp.asarray(n_pages, jnp.int32),
                   score=None if rule == "streaming" else jnp.zeros((n_pages, page_size), jnp.float32),
                   threshold=threshold, rule=rule)

    # ------------------------------------------------------------------------------ writing
    def has_room(self, n=1) -> jax.Array:
        """bool []: every head can take `n` more tokens (int, or int32 [B] per row): table entries and
        free pages. Exactly when `append` writes them."""
        last = _cdiv(self.fill + jnp.asarray(n, jnp.int32).reshape(-1, 1), self.page_size)
        return (jnp.max(last) <= self.table.shape[2]) & (jnp.sum(last - self.used_pages()) <= self.n_free)

    def with_room(self, n: int, round_up=lambda c: c) -> "PagedKV":
        """Host-side: a state in which every head can take `n` more tokens. The tables grow to the
        longest head's fill + n slots and the pool by the pages missing (both through `round_up` of
        slots); the state itself when it has the room."""
        fill, used = np.asarray(self.fill), np.asarray(self.used_pages())
        last = _cdiv(fill + n, self.page_size)
        n_table = max(self.table.shape[2], self._pages(round_up(int(last.max()) * self.page_size)))
        need = int(self.pages_held()) + int(np.sum(last - used))
        if n_table == self.table.shape[2] and need <= self.n_pages:
            return self
        return self.resized(n_table, max(self.n_pages, self._pages(round_up(need * self.page_size))))

    def shrunk(self, capacity: int, room: int, round_up=lambda c: c) -> "PagedKV":
        """Host-side, after an eviction: the pool cut to the pages held plus those `room` more tokens per
        head would open, the tables to the longest head's fill + `room` slots (both through `round_up`
        of slots; `capacity` is unused: every head has its own table)."""
        fill, used = np.asarray(self.fill), np.asarray(self.used_pages())
        last = _cdiv(fill + room, self.page_size)
        need = int(self.pages_held()) + int(np.sum(last - used))
        return self.resized(max(1, self._pages(round_up(int(last.max()) * self.page_size))),
                            max(1, self._pages(round_up(need * self.page_size))))

    def _pages(self, slots: int) -> int:
        return _cdiv(int(slots), self.page_size)

    def resized(self, n_table: int, n_pages: int) -> "PagedKV":
        """Host-side: the same tokens in a pool of `n_pages` pages and tables of `n_table` entries per
        head; the held pages are renumbered 0, 1, ... in table order and the rest go on the free stack.
        A ValueError if the held pages or the used table entries do not fit."""
        table = np.asarray(self.table)
        held = table >= 0
        n_held, n_used = int(held.sum()), int(np.asarray(self.used_pages()).max(initial=0))
        if n_held > n_pages or n_used > n_table:
            raise ValueError(f"a paged layer holding {n_held} pages (up to {n_used} per head) does not fit "
                             f"{n_pages} pages with tables of {n_table} entries")
        old = table[held]
        new = np.full(table.shape[:2] + (max(n_table, table.shape[2]),), -1, np.int32)
        new[..., :table.shape[2]][held] = np.arange(n_held)
        ids = jnp.asarray(old, jnp.int32)

        def pool(x, fill):
            out = jnp.full((n_pages,) + x.shape[1:], fill, x.dtype)
            return out.at[:n_held].set(x[ids]) if n_held else out

        free = np.zeros(n_pages, np.int32)
        free[:n_pages - n_held] = np.arange(n_pages - 1, n_held - 1, -1)  # the lowest id on top
        return dataclasses.replace(
            self, k=pool(self.k, 0), v=pool(self.v, 0), pos=pool(self.pos, EMPTY_POS),
            score=None if self.score is None else pool(self.score, 0.0), table=jnp.asarray(new[..., :n_table]),
            free=jnp.asarray(free), n_free=jnp.asarray(n_pages - n_held, jnp.int32))

    def append(self, k, v, pos, n_valid, features=None) -> "PagedKV":
        """Write the first n_valid[b] of T tokens per row after each head's fill, popping the pages
        they open from the free stack (padding tokens are not written). k, v: [B, K, T, D]; pos: int32
        [B, T]; n_valid: int32 [B]. Without the room for all of them (`has_room(n_valid)`: a table
        entry or a free page missing) nothing is written and the state is returned unchanged, so no
        page in use is ever handed out twice; callers make the room first (`with_room`, host-side; the
        decode loop stops on `has_room`)."""
        b, n_kv, t, d = k.shape
        p, n_table, n_pool = self.page_size, self.table.shape[2], self.n_pages
        n_new = jnp.where(self.has_room(n_valid), n_valid.astype(jnp.int32), 0)[:, None]  # [B, 1]
        first, last = self.used_pages(), _cdiv(self.fill + n_new, p)
        opened = (last - first).reshape(-1)  # pages each head opens, [B*K]
        offset = (jnp.cumsum(opened) - opened).reshape(b, n_kv, 1)
        u = jnp.arange(-(-t // p) + 1)
        take = u < (last - first)[..., None]  # [B, K, U]
        ids = self.free[jnp.clip(self.n_free - 1 - offset - u, 0, n_pool - 1)]  # popped from the top
        rows, heads = jnp.arange(b)[:, None, None], jnp.arange(n_kv)[None, :, None]
        table = self.table.at[rows, heads, jnp.where(take, first[..., None] + u, n_table)].set(ids, mode="drop")
        slot = self.fill[..., None] + jnp.arange(t)  # [B, K, T] logical slots
        page = jnp.take_along_axis(table, jnp.minimum(slot // p, n_table - 1), axis=2)
        flat = jnp.where(jnp.arange(t) < n_new[..., None], page * p + slot % p, n_pool * p).reshape(-1)
        put = lambda pool, new: pool.reshape((n_pool * p,) + pool.shape[2:]).at[flat].set(  # noqa: E731
            new.reshape((-1,) + pool.shape[2:]).astype(pool.dtype), mode="drop").reshape(pool.shape)
        score = None if self.score is None else put(self.score, jnp.zeros((b, n_kv, t), jnp.float32))
        return dataclasses.replace(self, k=put(self.k, k), v=put(self.v, v), score=score,
                                   pos=put(self.pos, jnp.broadcast_to(pos[:, None, :], (b, n_kv, t))),
                                   table=table, fill=self.fill + n_new, length=self.length + n_new,
                                   n_free=self.n_free - jnp.sum(opened))

    # ------------------------------------------------------------------------------ reading
    def physical(self) -> jax.Array:
        """int32 [B, K, L]: the flat pool slot (page * P + offset) of every logical slot (NP * P for a
        slot whose page is freed or not taken)."""
        p = self.page_size
        slot = jnp.arange(self.capacity)
        page = self.table[:, :, slot // p]
        return jnp.where(page >= 0, page * p + slot % p, self.n_pages * p)

    def logical(self):
        """(k, v [B, K, L, D], pos int32 [B, K, L]) every head's slots in logical order (`EMPTY_POS`
        where no token is held): the dense view a score method scores (a copy of the pool)."""
        return self.gather(self.k, 0), self.gather(self.v, 0), self.gather(self.pos, EMPTY_POS)

    def gather(self, pool, fill) -> jax.Array:
        """A pool array [NP, P, ...] read in logical order, [B, K, L, ...] (`fill` where no page is)."""
        flat = jnp.concatenate([pool.reshape((-1,) + pool.shape[2:]), jnp.full((1,) + pool.shape[2:], fill, pool.dtype)])
        return flat[self.physical()]

    def dense(self) -> DenseKV:
        """The logical view as a `DenseKV` (a copy; `length`: each row's longest fill): what a score
        method scores (`kvjax.compress`). Right after a prefill, logical slot s holds position s, as in a
        dense cache of L slots."""
        k, v, pos = self.logical()
        return DenseKV(k=k, v=v, pos=pos, length=jnp.max(self.fill, axis=1))

    def positions(self) -> jax.Array:
        """int32 [B, K, L] original position of every logical slot (`EMPTY_POS` where none is held)."""
        return self.logical()[2]

    def attend_jnp(self, q, q_pos, block=None, return_lse: bool = False):
        """Causal attention of q [B, T, H, D] over each head's pages, gathered `block // P` table
        entries at a time (default 512 slots); freed entries and entries past `used_pages` are hidden."""
        p, n_table = self.page_size, self.table.shape[2]
        per = max(1, min(block or 512, self.capacity) // p)  # table entries per block
        used = self.used_pages()
        b, n_kv = used.shape

        def read(i):
            entry = i * per + jnp.arange(per)
            page = self.table[:, :, jnp.minimum(entry, n_table - 1)]  # [B, K, per]
            hidden = (page < 0) | (entry >= used[..., None])
            ids = jnp.maximum(page, 0)
            blk = lambda x: x[ids].reshape((b, n_kv, per * p) + x.shape[2:])  # noqa: E731
            return blk(self.k), blk(self.v), blk(self.pos), jnp.repeat(hidden, p, axis=2)

        return online_attention(q, q_pos, [(read, _cdiv(jnp.max(used), per))], return_lse)

    def attend_kernel(self, q, q_pos, return_lse: bool, interpret: bool):
        """`kernels.paged_decode_attention`: each head reads only its own pages."""
        if return_lse:  # "auto" falls back to `attend_jnp`, which gives them
            raise unsupported("PagedKV gives no prefill observations in the Pallas path")
        return paged_decode_attention(q, self.k, self.v, self.pos, self.table, self.used_pages(), q_pos,
                                      interpret=interpret)

    # ------------------------------------------------------------------------------ eviction
    def evict(self, keep) -> "PagedKV":
        """Drop every held token where `keep` bool [B, K, L] (logical slots) is false; free the pages
        left empty; compact the heads whose fragmentation passes `threshold` (when that frees a page).
        Freed pages return to the free stack for any row's next append."""
        b, n_kv, n_table = self.table.shape
        p, n_pool = self.page_size, self.n_pages
        src = self.physical()  # [B, K, L]
        held = self.positions() != EMPTY_POS
        drop = held & ~keep
        held = held & keep
        count = held.reshape(b, n_kv, n_table, p).sum(-1)  # [B, K, MP] tokens per logical page
        length = held.sum(-1).astype(jnp.int32)
        nonempty = count > 0
        n_held = nonempty.sum(-1)
        need = _cdiv(length, p)
        frag = 1.0 - length / jnp.maximum(n_held * p, 1)
        compact = (frag > self.threshold) & (need < n_held)  # [B, K]
        # compacted heads: tokens packed, in logical order, into their first `need` non-empty pages
        page_rank = jnp.cumsum(nonempty, -1) - 1  # [B, K, MP]
        keeps_page = nonempty & jnp.where(compact[..., None], page_rank < need[..., None], True)
        rows, heads = jnp.arange(b)[:, None, None], jnp.arange(n_kv)[None, :, None]
        packed = jnp.full_like(self.table, -1).at[rows, heads, jnp.where(keeps_page, page_rank, n_table)].set(
            self.table, mode="drop")
        table = jnp.where(compact[..., None], packed, jnp.where(nonempty, self.table, -1))
        freed = (self.table >= 0) & ~keeps_page
        # data: the compacted heads' tokens move to slot (rank) of their packed pages
        rank = jnp.cumsum(held, -1) - 1
        dst_page = jnp.take_along_axis(packed, jnp.clip(rank // p, 0, n_table - 1), axis=2)
        moves = held & compact[..., None]
        dst = jnp.where(moves, dst_page * p + rank % p, n_pool * p).reshape(-1)
        vacate = jnp.where(drop | moves, src, n_pool * p).reshape(-1)
        k, v, pos = self.logical()

        def move(pool, new, clear=None):
            flat = pool.reshape((n_pool * p,) + pool.shape[2:])
            if clear is not None:
                flat = flat.at[vacate].set(clear, mode="drop")
            return flat.at[dst].set(new.reshape((-1,) + pool.shape[2:]), mode="drop").reshape(pool.shape)

        # the freed pages go on the free stack
        order = (jnp.cumsum(freed.reshape(-1)) - 1).reshape(freed.shape)
        free = self.free.at[jnp.where(freed, self.n_free + order, n_pool)].set(self.table, mode="drop")
        last = jnp.max(jnp.where(held, jnp.arange(self.capacity) + 1, 0), axis=-1)
        score = None if self.score is None else move(self.score, self.gather(self.score, 0.0), 0.0)
        return dataclasses.replace(self, k=move(self.k, k), v=move(self.v, v), pos=move(self.pos, pos, EMPTY_POS),
                                   score=score,
                                   table=table, fill=jnp.where(compact, length, last).astype(jnp.int32),
                                   length=length, free=free, n_free=self.n_free + jnp.sum(freed).astype(jnp.int32))

    def keep_top(self, scores, n_keep) -> jax.Array:
        """bool [B, K, L]: each head's `n_keep` ([B] or [B, K]) held tokens of highest `scores`
        [B, K, L] (logical slots; any score method's, e.g. scored on `logical()`)."""
        s = jnp.where(self.positions() != EMPTY_POS, scores.astype(jnp.float32), -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-s, axis=-1), axis=-1)
        n_keep = jnp.asarray(n_keep).reshape(s.shape[0], -1, 1)
        return (rank < n_keep) & jnp.isfinite(s)

    def keep_top_pairs(self, scores, n_keep, alpha_safeguard: float = 0.2) -> jax.Array:
        """bool [B, K, L]: Ada-KV's per-head budgets (Feng et al. 2024, arXiv 2407.11550; as
        `methods.adakv.AdaKV.select`): each row keeps its K * n_keep[b] best (head, token) pairs over
        all heads together, each head's top floor(alpha * n_keep) first (the safeguard)."""
        b, n_kv, n = scores.shape
        n_keep = jnp.asarray(n_keep).reshape(b)
        held = self.positions() != EMPTY_POS
        s = jnp.where(held, scores.astype(jnp.float32), -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-s, axis=-1), axis=-1)
        n_safe = jnp.floor(n_keep * alpha_safeguard).astype(jnp.int32)
        s = jnp.where(held & (rank < n_safe[:, None, None]), jnp.finfo(jnp.float32).max, s)
        flat = jnp.argsort(jnp.argsort(-s.reshape(b, n_kv * n), axis=-1), axis=-1).reshape(b, n_kv, n)
        return (flat < (n_kv * n_keep)[:, None, None]) & held

    def roll(self, capacity: int, n_sink: int = 4, recent: int = 0) -> "PagedKV":
        """Decode-time eviction by the state's `rule`, called after each one-token append (as
        `RollingKV`, whose victims it picks): each head holding more than `capacity` tokens drops one.

        * "streaming" (StreamingLLM, Xiao et al. 2023): the oldest token past the `n_sink` first positions;
        * "h2o" (Zhang et al. 2023) / "tova" (Oren et al. 2024): the token of least `score` (`observe_query`),
          never the newest token nor the `recent` positions before it.

        A page is freed once every one of its tokens has gone (or by compaction past `threshold`)."""
        pos = self.positions()
        held = pos != EMPTY_POS
        if self.rule == "streaming":
            key = jnp.where(pos < n_sink, EMPTY_POS, pos)  # sinks and empty slots never chosen
            last = EMPTY_POS
        else:
            newest = jnp.max(jnp.where(held, pos, -1), axis=-1, keepdims=True)  # the token just appended
            key = jnp.where(held & (pos < newest - recent), self.gather(self.score, 0.0), jnp.inf)
            last = jnp.inf
        victim = jnp.argmin(key, axis=-1)  # [B, K]
        over = (self.length > capacity) & (jnp.min(key, axis=-1) != last)
        drop = over[..., None] & (jnp.arange(self.capacity) == victim[..., None])
        return self.evict(~drop)

    def observe_query(self, q, q_pos) -> "PagedKV":
        """Fold the newest query's attention (q [B, 1, H, D]) into the scores `roll` evicts by: H2O adds
        it per KV head (mean over the group), TOVA replaces the scores by its mean over all heads (as
        `RollingKV.observe_query`)."""
        if self.score is None:
            return self
        k, _, pos = self.logical()
        b, _, h, d = q.shape
        n_kv = k.shape[1]
        qg = q[:, 0].reshape(b, n_kv, h // n_kv, d).astype(jnp.float32) * (d ** -0.5)
        sc = jnp.einsum("bkgd,bksd->bkgs", qg, k.astype(jnp.float32))
        visible = pos[:, :, None, :] <= q_pos[:, :1, None, None]
        p = jax.nn.softmax(jnp.where(visible, sc, -jnp.inf), axis=-1)
        p = jnp.where(visible, p, 0.0)  # a head that holds nothing: no NaN
        old = self.gather(self.score, 0.0)
        new = old + p.mean(2) if self.rule == "h2o" else jnp.broadcast_to(p.mean(axis=(1, 2))[:, None], old.shape)
        flat = jnp.where(pos != EMPTY_POS, self.physical(), self.n_pages * self.page_size).reshape(-1)
        score = self.score.reshape(-1).at[flat].set(new.reshape(-1), mode="drop").reshape(self.score.shape)
        return dataclasses.replace(self, score=score)

def paged_cache(cfg, capacity: int, tokens, page_size: int = 16, attention_impl: str = "xla") -> KVCache:
    """The empty paged cache a model of `cfg` prefills onto (`LM.generate(layout="paged")`): a `PagedKV`
    per layer with tables of `capacity` slots per KV head and a pool of exactly the pages rows of `tokens`
    [B] tokens fill, K x sum over rows of ceil(tokens / P) (the prompts and their decode room), so that
    rows of different lengths take only their pages. `with_room` grows the pool for more."""
    check_paged(cfg, page_size)
    tokens = np.asarray(tokens, np.int64)
    n_pages = cfg.n_kv_heads * int(np.sum(_cdiv(tokens, page_size)))
    layers = tuple(PagedKV.init(len(tokens), cfg.n_kv_heads, capacity, cfg.head_dim, cfg.jnp_dtype, page_size,
                                n_pages=max(1, n_pages)) for _ in range(cfg.n_layers))
    return KVCache(layers=layers, next_pos=jnp.zeros((len(tokens),), jnp.int32), attention_impl=attention_impl)


def check_paged(cfg, page_size) -> None:
    """One-line ValueError unless a model of `cfg` can hold its cache in pages of `page_size` slots:
    every layer dense K/V (no latent, no sliding window) and a power-of-two page size."""
    layout = getattr(cfg, "kv_layout", "dense")
    if layout != "dense" or any(getattr(cfg, "windows", None) or ()):
        raise ValueError("the paged layout holds dense K/V in every layer; this model has "
                         + ("sliding-window layers" if layout == "dense" else f"a {layout} cache"))
    check_page_size(page_size)


def check_page_size(page_size: int) -> None:
    """One-line error for a page size that cannot tile the kernel's block (a power of two)."""
    if not isinstance(page_size, (int, np.integer)) or page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size!r} does not tile the kernel's block: pages must be a power of two "
                         "of slots (the paged kernel reads blocks of whole pages)")
