"""`LM`: the public entry point. A loaded model, its tokenizer, and prefill / generate / logits.

    lm = kvjax.load("smollm2-135m")
    out = lm.generate("The capital of France is", max_new_tokens=16)
    print(out.text, out.cache_bytes)

Inputs are validated on the host, before anything is compiled; bad input raises `ValueError`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import generation, pipeline, sharding, transmla
from kvjax.generation import Sampler
from kvjax import recompress
from kvjax.shapes import MIN_BUCKET, bucket
from kvjax.hub import DEFAULT_MODEL, load_checkpoint
from kvjax.kernels.dispatch import resolve_impl
from kvjax.methods import palu
from kvjax.checkpoints import run_of
from kvjax.methods.crosslayer import healed_run, load_healed
from kvjax.methods.spec import spec_of
from kvjax.models.config import LlamaConfig
from kvjax.states import KVCache, cache_nbytes
from kvjax.states.cache import model_cache
from kvjax.states.paged import paged_cache
from kvjax.timing import compile_seconds
from kvjax.tokenizer import Tokenizer

STREAM_EVERY = 8  # tokens per decode call when streaming


@dataclasses.dataclass
class Generation:
    """Result of `LM.generate`. For a single prompt `ids`/`text` are one list/str, else one per row."""

    ids: list
    text: str | list[str]
    prompt_tokens: list[int]
    prefill_s: float  # wall time of the prefill, compile excluded
    decode_s: float  # wall time of decoding, compile excluded
    compile_s: float  # time spent tracing and compiling during this call
    cache: KVCache
    cache_bytes: int

    @property
    def new_tokens(self) -> int:
        rows = self.ids if self.ids and isinstance(self.ids[0], list) else [self.ids]
        return sum(len(r) for r in rows)


class LM:
    """A language model ready to run: config, params (a plain pytree) and tokenizer."""

    def __init__(self, cfg: LlamaConfig, params: Mapping, tokenizer: Tokenizer, name: str = ""):
        self.cfg, self.params, self.tokenizer, self.name = cfg, params, tokenizer, name
        self.mesh, self.rules = None, None  # set by `shard`
        self.method = None  # a converted model's own cache method (`kvjax convert palu`), used when none is given

    def shard(self, mesh, rules: dict | None = None) -> "LM":
        """This model on a device mesh (`kvjax.sharding.make_mesh`): the parameters placed by their logical
        axes (query and KV heads and MLP columns over `model`), and every cache it builds by its layer
        states' (KV heads over `model`, rows over `data`); `jit` partitions the rest. Greedy generation
        equals one device's. `rules`: logical axis -> mesh axis, default `kvjax.sharding.RULES`."""
        sharding.check_mesh(mesh, self.cfg.n_kv_heads)
        lm = LM(self.cfg, sharding.shard_params(self.params, mesh, rules), self.tokenizer, self.name)
        lm.mesh, lm.rules, lm.method = mesh, rules, self.method
        return lm

    def _place(self, cache: KVCache) -> KVCache:
        """`cache` on this model's mesh by its states' logical axes (unchanged without a mesh)."""
        return cache if self.mesh is None else sharding.shard_state(cache, self.mesh, self.rules)

    def __repr__(self):
        c = self.cfg
        return (f"LM({self.name!r}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads / "
                f"{c.n_kv_heads} KV heads x {c.head_dim}, vocab {c.vocab_size}, {c.dtype})")

    # ----------------------------------------------------------------------------------- text
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids. -1 marks "no token" and ids the model has but its tokenizer lacks (an
        embedding table padded past the tokenizer, Qwen2) have no text: both are skipped. Any other id
        (below -1, or at or past the model's vocabulary) is a ValueError."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i < -1 or i >= self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary [0, {self.cfg.vocab_size})")
        n = self.tokenizer.vocab_size
        return self.tokenizer.decode([i for i in ids if 0 <= i < n], skip_special_tokens)

    def chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.tokenizer.chat(list(messages), add_generation_prompt)

    # ------------------------------------------------------------------------------- forward
    def logits(self, ids_bt) -> np.ndarray:
        """Logits float32 [B, T_max, V] for ids [B, T] or a list of rows (rows shorter than T_max: the
        positions past their end hold padding); [T, V] for a single prompt (ids [T] or text)."""
        rows, single = self._as_rows(ids_bt)
        tokens, lengths = self._pad(rows)
        cache = self._empty_cache(len(rows), bucket(tokens.shape[1]))
        logits, _, _ = generation.prefill(self.params, self.cfg, tokens, lengths, cache, all_logits=True)
        out = np.asarray(logits)[:, : lengths.max()]
        return out[0] if single else out

    def prefill(self, ids, capacity: int | None = None, method=None, ratio: float | None = None,
                budget: int | None = None, quant=None, check_finite: bool = False,
                attention_impl: str | None = None, checkpoint=None, return_logits: bool = False,
                compress_local: bool = False, chunked_compression=None, layout: str | None = None,
                page_size: int = 16):
        """The cache after prefilling ids ([T], [B, T] or a list of rows of different lengths).

        With `method` (a name, "wrapper:name" or a method object) and `ratio` (fraction removed) or
        `budget` (tokens kept per layer and KV head), the cache is compressed after the prefill
        (kvpress semantics); its arrays then hold only the kept tokens. With `quant` (a spec such as
        "kivi-2", "per_token-4", "int8", "fp8", or a quantizer object), what is kept is stored
        quantized (`QuantKV`); `check_finite=True` (debug mode) first checks the K/V for NaN/Inf and
        raises a ValueError naming the layer. `capacity`: slots to allocate for an uncompressed cache.
        `attention_impl`: "xla" (plain jnp), "pallas" (`kvjax.kernels`; interpreted on CPU; a state
        with no kernel is a ValueError), "auto" (kernels where they exist) or None (auto on GPU/TPU,
        xla on CPU). `checkpoint`: the run directory of a trained method (`kvjax train locret`).
        With `return_logits`, returns (logits float32 [B, V] at each row's last token, cache).
        `compress_local`: a model's sliding-window layers are evicted too (by default they keep their
        window and compression applies to global layers only). `chunked_compression` (True: chunks of
        `PREFILL_CHUNK` tokens, or a chunk size): compress after every prefill chunk, so no layer and head
        ever holds more than the budget plus a chunk (`kvjax.recompress`). `layout="paged"`: the cache is a
        `PagedKV` per layer (`kvjax.states.paged`): one pool of pages of `page_size` slots (a power of two)
        shared by the rows and KV heads, each holding only its pages; a `method` evicts from the pages and
        the pool is cut to the pages kept (plus `capacity` room); None: the model's own layout.
        """
        impl = resolve_impl(attention_impl)
        rows, _ = self._as_rows(ids)
        pages = _page_size(layout, page_size)
        plan = self._plan(rows, method, ratio, budget, quant=quant, checkpoint=checkpoint,
                          compress_local=compress_local, chunked_compression=chunked_compression, page_size=pages)
        if check_finite and plan is not None:
            plan = dataclasses.replace(plan, check_finite=True)
        logits, cache = self._prefill(rows, capacity or 0, plan=plan, attention_impl=impl, page_size=pages)
        return (logits, cache) if return_logits else cache

    def _plan(self, rows, method=None, ratio=None, budget=None, capacity=None, quant=None, checkpoint=None,
              cache=None, compress_local: bool = False, chunked_compression=None,
              decoding=None, page_size: int | None = None) -> pipeline.Plan | None:
        """Validate a compression request before anything compiles (`kvjax.pipeline.plan`). A converted
        model (`self.method`) prefills with its own method; another method is an error."""
        if self.method is not None and cache is None:
            if method not in (None, "full"):
                raise ValueError(f"{self.name} is a converted model with its own cache ({spec_of(self.method)}): "
                                 f"method={method!r} does not apply to it")
            method = self.method
        return pipeline.plan(self.cfg, [len(r) for r in rows], method, ratio, budget, capacity, quant, checkpoint,
                             model_name=self.name, fresh=cache is None, compress_local=compress_local, lm=self,
                             tokenizer=self.tokenizer, chunked_compression=chunked_compression, decoding=decoding,
                             page_size=page_size)

    def _prefill(self, rows: list[list[int]], extra: int = 0, cache: KVCache | None = None, plan=None,
                 attention_impl: str = "xla", page_size: int | None = None):
        """Prefill rows onto `cache` (or a new one, paged with a `page_size`) with room for `extra` slots
        past its current length, then compress / quantize with `plan` (`kvjax.pipeline`)."""
        tokens, lengths = self._pad(rows)
        room = max(tokens.shape[1], extra)
        if cache is None and page_size is not None:  # a pool of the pages the rows and their room fill
            cache = paged_cache(self.cfg, bucket(room), lengths + max(0, extra - int(lengths.max())), page_size,
                                attention_impl)
        elif cache is None:  # chunked compression allocates its own bounded cache
            cache = self._empty_cache(len(rows), MIN_BUCKET if plan is not None and plan.chunk else bucket(room),
                                      attention_impl)
        else:
            if cache.batch != len(rows):
                raise ValueError(f"cache holds {cache.batch} rows but {len(rows)} prompts were given")
            # the jitted steps donate the cache: work on a copy so the caller's cache stays usable
            # (e.g. several questions asked on top of one compressed context)
            cache = jax.tree_util.tree_map(jnp.copy, cache).with_room(room, bucket)
            cache = dataclasses.replace(cache, attention_impl=attention_impl)
        self._check_positions(cache, lengths)
        # `extra` beyond the prompt is room for decoding
        logits, cache = pipeline.prefill(self.params, self.cfg, plan, tokens, lengths, self._place(cache),
                                         max(0, extra - int(lengths.max())))
        return logits, self._place(cache)

    # ------------------------------------------------------------------------------ generate
    def generate(self, ids_or_text, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, cache: KVCache | None = None,
                 stop_at_eos: bool = True, method=None, ratio: float | None = None,
                 budget: int | None = None, capacity: int | None = None, quant=None,
                 attention_impl: str | None = None, checkpoint=None, compress_local: bool = False,
                 chunked_compression=None, decoding=None, layout: str | None = None,
                 page_size: int = 16) -> Generation:
        """Generate up to `max_new_tokens` per prompt (greedy by default).

        `ids_or_text`: a str, a list of str, ids [T], ids [B, T] or a list of id rows of different
        lengths. With `cache` (from `prefill`), the ids are fed on top of it and continue its positions.
        With `method` and `ratio`/`budget`, the prompt's cache is compressed before decoding. With
        `method` and `capacity=C` (streaming_llm, h2o, tova), the cache holds at most C tokens per layer
        and KV head for the whole generation: a longer prompt is compressed to C, then each new
        token first evicts one under the method's decode rule (`kvjax.states.rolling`). With `quant`, the
        kept cache is stored quantized and new tokens join it through the residual window.
        `attention_impl`: "xla" (plain jnp), "pallas" (`kvjax.kernels`; interpreted on CPU; a state
        with no kernel is a ValueError), "auto" (kernels where they exist) or None (auto on GPU/TPU,
        xla on CPU). `checkpoint`: the run directory of a trained method, e.g. `method="locret"`
        with the --out directory of `kvjax train locret`. `compress_local`: evict in a model's
        sliding-window layers too (see `prefill`). `chunked_compression`: see `prefill`. `decoding`
        (a `kvjax.recompress.DecodeCompression`, kvpress's DecodingPress parameters): every
        `compression_interval` new tokens, re-score the cache with `method` and keep `target_size` tokens per
        layer and head, inside the jitted decode loop; with ratio= / budget= the prompt is compressed first.
        `layout="paged"` (`page_size` slots a page): the cache is paged (see `prefill`); a method's
        evicted pages leave the pool, and each row and head takes pages from it as it decodes.
        """
        chunks = list(self.stream(ids_or_text, max_new_tokens, temperature, top_k, top_p, seed, cache,
                                  stop_at_eos, every=None, method=method, ratio=ratio, budget=budget,
                                  capacity=capacity, quant=quant, attention_impl=attention_impl,
                                  checkpoint=checkpoint, compress_local=compress_local,
                                  chunked_compression=chunked_compression, decoding=decoding, layout=layout,
                                  page_size=page_size))
        return chunks[-1]

    def stream(self, ids_or_text, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, cache: KVCache | None = None, stop_at_eos: bool = True,
               every: int | None = STREAM_EVERY, method=None, ratio: float | None = None,
               budget: int | None = None, capacity: int | None = None, quant=None,
               attention_impl: str | None = None, checkpoint=None,
               compress_local: bool = False, chunked_compression=None, decoding=None, layout: str | None = None,
               page_size: int = 16) -> Iterator[Generation]:
        """Like `generate`, yielding the growing result every `every` tokens (None: once at the end)."""
        if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        sampler = Sampler(float(temperature), top_k, float(top_p))
        impl = resolve_impl(attention_impl)
        rows, single = self._as_rows(ids_or_text)
        longest = max(len(r) for r in rows) + (int(np.max(np.asarray(cache.next_pos))) if cache else 0)
        if longest + max_new_tokens > self.cfg.max_positions:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's maximum positions ({self.cfg.max_positions})")
        pages = _page_size(layout, page_size)
        plan = self._plan(rows, method, ratio, budget, capacity, quant, checkpoint, cache, compress_local,
                          chunked_compression, decoding, pages)
        compressor, room = None, max_new_tokens
        if plan is not None and plan.decoding is not None:  # slots for the most held between two compressions
            slots = recompress.decode_slots(plan, max(len(r) for r in rows), max_new_tokens)
            compressor, room = recompress.Compressor(plan.method, plan.decoding, slots), slots - int(plan.n_keep.max())
        c0, t0 = compile_seconds(), time.perf_counter()
        logits, cache = self._prefill(rows, max(len(r) for r in rows) + room, cache, plan, impl, pages)
        if plan is not None:  # every head's room for the new tokens (per-head pools are packed tight)
            cache = self._place(cache.with_room(room, pipeline.round_step))
        if compressor is not None:
            cache = dataclasses.replace(cache, layers=tuple(recompress.resized(x, slots) for x in cache.layers))
        carry = None if compressor is None else compressor.init(self.cfg, cache)
        logits.block_until_ready()
        prefill_compile = compile_seconds() - c0
        prefill_s = time.perf_counter() - t0 - prefill_compile
        n_buffer = bucket(max_new_tokens) if every is None else every
        eos = tuple(self.tokenizer.eos_ids) if stop_at_eos else ()
        done = jnp.zeros((len(rows),), bool)
        key = jax.random.key(seed)
        new: list[list[int]] = [[] for _ in rows]
        c1, t1 = compile_seconds(), time.perf_counter()
        remaining = max_new_tokens
        while True:
            if remaining > 0:
                out, state = generation.decode(self.params, cache, logits, done, key, jnp.int32(remaining), carry,
                                               cfg=self.cfg, sampler=sampler, eos_ids=eos, n_buffer=n_buffer,
                                               compressor=compressor)
                out = np.asarray(out)
                cache, logits, done, key = self._place(state.cache), state.logits, state.done, state.key
                carry = state.carry
                for r, row in enumerate(out):
                    new[r].extend(int(t) for t in row if t >= 0)
                remaining -= int(state.step)
                finished = remaining <= 0 or int(state.step) == 0 or bool(np.all(np.asarray(done)))
            else:
                finished = True
            if finished or every is not None:
                ids = new[0] if single else new
                text = [self.decode(r, skip_special_tokens=True) for r in new]
                decode_compile = compile_seconds() - c1
                yield Generation(ids=list(ids), text=text[0] if single else text,
                                 prompt_tokens=[len(r) for r in rows], prefill_s=prefill_s,
                                 decode_s=time.perf_counter() - t1 - decode_compile,
                                 compile_s=prefill_compile + decode_compile, cache=cache,
                                 cache_bytes=cache_nbytes(cache))
            if finished:
                return

    # ---------------------------------------------------------------------------- validation
    def _as_rows(self, x) -> tuple[list[list[int]], bool]:
        """Normalize text / ids input to a list of id rows; True if the input was a single prompt."""
        if isinstance(x, str):
            rows, single = [self.encode(x)], True
        elif isinstance(x, np.ndarray) or hasattr(x, "__array__") and not isinstance(x, (list, tuple)):
            arr = np.asarray(x)
            if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"ids must be an integer array [T] or [B, T], got {arr.dtype} {arr.shape}")
            rows, single = ([arr.tolist()] if arr.ndim == 1 else arr.tolist()), arr.ndim == 1
        elif isinstance(x, (list, tuple)) and x and all(isinstance(s, str) for s in x):
            rows, single = [self.encode(s) for s in x], False
        elif isinstance(x, (list, tuple)) and x and all(isinstance(r, (list, tuple, np.ndarray)) for r in x):
            rows, single = [list(r) for r in x], False
        elif isinstance(x, (list, tuple)):
            rows, single = [list(x)], True
        else:
            raise ValueError(f"expected text, a list of texts, or token ids; got {type(x).__name__}")
        for r in rows:
            if not r:
                raise ValueError("empty prompt: give at least one token")
            for t in r:
                if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
                    raise ValueError(f"token ids must be integers, got {t!r} ({type(t).__name__})")
                if not 0 <= t < self.cfg.vocab_size:
                    raise ValueError(f"token id {t} outside the vocabulary [0, {self.cfg.vocab_size})")
        return [[int(t) for t in r] for r in rows], single

    def _pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.array([len(r) for r in rows], np.int32)
        if lengths.max() > self.cfg.max_positions:
            raise ValueError(f"prompt of {lengths.max()} tokens exceeds the model's maximum positions "
                             f"({self.cfg.max_positions})")
        tokens = np.zeros((len(rows), bucket(int(lengths.max()))), np.int32)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
        return tokens, lengths

    def _empty_cache(self, batch: int, capacity: int, attention_impl: str = "xla") -> KVCache:
        return model_cache(self.cfg, batch, capacity, attention_impl)

    def _check_positions(self, cache: KVCache, lengths: np.ndarray) -> None:
        end = np.asarray(cache.next_pos) + lengths
        if end.max() > self.cfg.max_positions:
            raise ValueError(f"cache + prompt reach position {end.max()}, beyond the model's maximum "
                             f"positions ({self.cfg.max_positions})")


def _page_size(layout, page_size) -> int | None:
    """The page size of a `layout="paged"` request (None: the model's own layout)."""
    if layout not in (None, "paged"):
        raise ValueError(f"layout must be None (the model's own) or 'paged', got {layout!r}")
    return None if layout is None else page_size


def load(name_or_path: str = DEFAULT_MODEL, dtype: str | None = None) -> LM:
    """Load a model: a known name ("smollm2-135m"), a .gguf file, an HF checkpoint directory, the run
    directory of `kvjax train cla` (its base model with the healed projections; use it with its `cla` method),
    a `kvjax convert palu` directory (its base model, prefilling onto its Palu latent cache by default), a
    `kvjax convert mla` directory (the model converted to MLA, a DeepSeek-format model), or
    the run directory of `kvjax train distill` (that converted model with its healed attention projections).

    dtype defaults to float32 on CPU and bfloat16 on accelerators.
    """
    if dtype is None:
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    distilled = run_of(name_or_path, "distill")
    if distilled is not None:  # a `kvjax train distill` run: its student with the healed projections
        student = distilled["model"].rsplit(" (", 1)[0]
        lm = load(student, dtype)
        healed = LM(lm.cfg, load_healed(name_or_path, lm.params, lm.cfg, student, "distill"), lm.tokenizer,
                    name=str(name_or_path))
        healed.method = lm.method
        return healed
    mla = transmla.converted(name_or_path)
    if mla is not None:  # a `kvjax convert mla` directory: a DeepSeek-format model, the base's tokenizer
        cfg, params = transmla.load_converted(name_or_path, dtype)
        return LM(cfg, params, load(mla["model"], dtype).tokenizer, name=str(name_or_path))
    converted = palu.converted(name_or_path)
    if converted is not None:  # a `kvjax convert palu` directory: its base model with a Palu cache
        lm = load(converted["model"], dtype)
        lm = LM(lm.cfg, lm.params, lm.tokenizer, name=str(name_or_path))
        lm.method = palu.Palu(checkpoint=str(name_or_path), group=converted["group"])
        return lm
    run = healed_run(name_or_path)
    if run is not None:  # a `kvjax train cla` run: its base model with the healed consumer projections
        base = run["model"].rsplit(" (", 1)[0]
        lm = load(base, dtype)
        return LM(lm.cfg, load_healed(name_or_path, lm.params, lm.cfg, base), lm.tokenizer, name=str(name_or_path))
    cfg, params, tokenizer = load_checkpoint(name_or_path, dtype)
    return LM(cfg, params, tokenizer, name=str(name_or_path))
