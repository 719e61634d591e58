"""The `kvjax` command line.

    kvjax generate --model smollm2-135m --prompt "What is the capital of France?" --chat
    kvjax info --model smollm2-135m
    kvjax eval ppl --import my_press.py --method my_press --ratio 0.5     # your own method
    kvjax train matryoshka --model smollm2-135m --steps 500 --out runs/m   # data: --data, $KVJAX_DATA, TFDS or generated
    kvjax cache list                      # what $KVJAX_CACHE holds; kvjax cache clean [KEY] [--older-than DAYS]

Bad input, and a file or folder that cannot be read or written, print one line `kvjax: error: ...` and
exit with status 2 (no traceback). Ctrl-C prints one line and exits with status 130 (`kvjax.interrupt`);
for eval and train the line says how to resume. Compiles longer than half a second show a
"kvjax: compiling ..." line on stderr (`kvjax.timing.report_compiles`). JAX's persistent compilation
cache is on (`kvjax.compile_cache`; off with --no-compile-cache or KVJAX_COMPILE_CACHE=0).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import jax
import numpy as np

import kvjax
from kvjax import clla, compile_cache, hub, interrupt, methods, recompress, sharding, timing, transmla
from kvjax.methods import expected_attention_stats, kvsharer, palu, qfilter
from kvjax.eval import command as eval_command
from kvjax.hub import DEFAULT_MODEL, KNOWN_MODELS
from kvjax.plugins import load_plugins

NPY_MAGIC = b"\x93NUMPY"
COMMANDS_GROUP = "kvjax.commands"


def added_commands() -> dict:
    """Subcommands that installed packages add through the entry-point group `kvjax.commands`: each a
    module with `add_parser(subparsers)` and `run(args)`. `kvjax.train` adds `kvjax train` so (setup.cfg):
    core never imports the training package."""
    return {ep.name: ep.load() for ep in entry_points(group=COMMANDS_GROUP)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvjax", description="KV-cache compression research framework (JAX).")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not read or write JAX's persistent compilation cache ($KVJAX_CACHE/xla); "
                        "the same as KVJAX_COMPILE_CACHE=0")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text, streaming it, then print speed and cache size")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"known name ({', '.join(KNOWN_MODELS)}), a .gguf file or an HF checkpoint directory")
    _prompt_args(g.add_mutually_exclusive_group(required=True))
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on accelerators")
    _compression_args(g)
    g.add_argument("--quant", default=None,
                   help="store the KV cache quantized: kivi-2, kivi-4, per_token-2/4/8, kvquant-2/3/4, int8, fp8")
    g.add_argument("--attention-impl", default=None, choices=["xla", "pallas", "auto"],
                   help="attention kernels: xla (plain jnp) or pallas (kvjax.kernels; interpreted on CPU); "
                        "auto: kernels where a cache layout has one; default auto on GPU/TPU, xla on CPU")
    g.add_argument("--capacity", type=int, default=None,
                   help="bound the cache to this many tokens per layer/head while decoding "
                        "(decode-time eviction: streaming_llm, h2o, tova)")
    g.add_argument("--compress-local", action="store_true",
                   help="evict in sliding-window layers too (Gemma 3's local layers; by default compression "
                        "applies to global layers only)")
    add_filling_args(g)
    g.add_argument("--layout", default=None, choices=["paged"],
                   help="paged: the KV cache in one pool of pages per layer shared by the rows and KV heads; "
                        "--method evicts from the pages and the pool keeps only the pages held (kvjax.states.paged)")
    g.add_argument("--page-size", type=int, default=16, help="slots per page with --layout paged (a power of two)")
    g.add_argument("--mesh", default=None, metavar="data=N,model=M",
                   help="shard over a device mesh (kvjax.sharding): KV heads over model, rows over data; on CPU "
                        "simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=N")
    add_import_arg(g)

    m = sub.add_parser("methods", help="list the compression methods, quantizers and their parameters")
    add_import_arg(m)

    n = sub.add_parser("inspect", help="write the positions a method keeps, per layer (and head), to .npz")
    n.add_argument("--model", default=DEFAULT_MODEL)
    source = n.add_mutually_exclusive_group(required=True)
    source.add_argument("--input-ids", type=Path, help=".npy of int ids [T] (or [1, T])")
    _prompt_args(source)
    n.add_argument("--out", required=True, type=Path, help="output .npz: layer{i} = int32 [K, n] kept positions")
    n.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _compression_args(n, required=True)
    add_import_arg(n)

    i = sub.add_parser("info", help="print the model config and KV-cache bytes per token")
    i.add_argument("--model", default=DEFAULT_MODEL)
    i.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])

    k = sub.add_parser("kvsharer", help="search a KVSharer share plan on generated calibration text; write it as JSON")
    k.add_argument("--model", default=DEFAULT_MODEL)
    k.add_argument("--out", required=True, type=Path, help="the plan file (use it with --plan FILE)")
    k.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    for name, f in ((f.name, f) for f in dataclasses.fields(kvsharer.KVSharer) if f.name not in ("plan", "press")):
        k.add_argument(f"--{name.replace('_', '-')}", type=type(f.default) if f.default is not None else int,
                       default=f.default, help=f"default {f.default}")

    v = sub.add_parser("convert", help="convert a model's K/V to latent form; write a directory --model DIR opens")
    v_sub = v.add_subparsers(dest="convert_command", required=True)
    pc = v_sub.add_parser("palu", help="Palu low-rank K/V from a whitened SVD of calibration activations "
                                         "(arXiv 2407.21118; no training)")
    pc.add_argument("--rank", type=int, required=True, help="latent rank of each group's keys (and values)")
    pc.add_argument("--rank-v", type=int, default=None, help="latent rank of the values (default: --rank)")
    pc.add_argument("--group", type=int, default=1, help="KV heads per latent (1: per head; G-LRD groups)")
    mc = v_sub.add_parser("mla", help="TransMLA: GQA to multi-head latent attention (RoRoPE + balanced K/V PCA; "
                                       "arXiv 2502.07864); the result is a DeepSeek-format model with an MLA cache")
    lc = v_sub.add_parser("clla", help="CLLA: TransMLA, then groups of adjacent layers share one latent (fitted "
                                        "up-projections; arXiv 2410.15252); int4 with --quant per_token-4")
    for conversion in (mc, lc):
        conversion.add_argument("--kv-rank", type=int, required=True, help="latent rank (DeepSeek's kv_lora_rank)")
        conversion.add_argument("--rope-dim", type=int, default=None,
                                help="RoPE dims of the shared key, a multiple of the head dim (default: one head dim)")
    lc.add_argument("--group", type=int, default=2, help="adjacent layers sharing one latent")
    lc.add_argument("--layers", default="all", help="'all' (default), 'deep' (the deep half) or FIRST,END")
    lc.add_argument("--remainder", choices=["own", "short"], default=None,
                    help="when --group does not divide the layers: the leftover layers keep their own latent "
                         "(own) or form a smaller group (short)")
    for conversion in (pc, mc, lc):
        conversion.add_argument("--model", default=DEFAULT_MODEL)
        conversion.add_argument("--calib", type=Path, default=None,
                                help="calibration text file (default: generated prose)")
        conversion.add_argument("--calib-tokens", type=int, default=4096)
        conversion.add_argument("--out", required=True, type=Path, help="the converted model's directory")
        conversion.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])

    cb = sub.add_parser("calibrate", help="build a method's calibration file from calibration text: query "
                                          "statistics (expected_attention_stats) or Q-Filters (qfilter)")
    cb.add_argument("what", choices=["expected_attention_stats", "qfilter"])
    cb.add_argument("--model", default=DEFAULT_MODEL)
    cb.add_argument("--calib", type=Path, default=None, help="calibration text file (default: generated prose)")
    cb.add_argument("--calib-tokens", type=int, default=16384)
    cb.add_argument("--n-sink", type=int, default=4, help="first positions of each window left out (kvpress: 4)")
    cb.add_argument("--out", required=True, type=Path, help="the .npz file to write")
    cb.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])

    eval_command.add_parsers(sub)
    for command in added_commands().values():
        command.add_parser(sub)

    c = sub.add_parser("cache", help="list or clean what the kvjax cache folder ($KVJAX_CACHE) holds")
    c_sub = c.add_subparsers(dest="cache_command", required=True)
    c_sub.add_parser("list", help="each entry: key, what, size, last used")
    clean = c_sub.add_parser("clean", help="delete entries (all, by key, or unused for some days); prints bytes freed")
    clean.add_argument("keys", nargs="*", metavar="KEY", help="entries to delete (keys from `kvjax cache list`)")
    clean.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                       help="only entries last used more than DAYS days ago")
    return p


def _prompt_args(group) -> None:
    """--prompt TEXT | --prompt-file FILE (- for stdin), in a mutually exclusive group."""
    group.add_argument("--prompt", help="the prompt text")
    group.add_argument("--prompt-file", type=Path, metavar="FILE", help="read the prompt from a UTF-8 text file "
                                                                        "(- for stdin)")


def add_import_arg(p: argparse.ArgumentParser) -> None:
    """--import FILE_OR_MODULE (repeatable): user plugins, imported before method names are resolved."""
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="import your own methods or quantizers first: a .py file or a module name that "
                        "registers them (@kvjax.register_method); repeatable")


def _compression_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--method", required=required, default=None,
                   help="compression method: a name from `kvjax methods`, wrapper:name (e.g. adakv:snapkv), "
                        "name(key=value,...) (e.g. 'snapkv(window=16)') or 'compose(METHOD, QUANTIZER)'")
    budget = p.add_mutually_exclusive_group(required=required)
    budget.add_argument("--ratio", type=float, default=None, help="fraction of the prompt's tokens removed")
    budget.add_argument("--budget", type=int, default=None, help="tokens kept per layer and KV head")
    p.add_argument("--checkpoint", default=None,
                   help="a trained method's run directory (the --out of `kvjax train locret`)")
    p.add_argument("--plan", default=None, metavar="FILE",
                   help="a KVSharer share plan (`kvjax kvsharer --out FILE`): the same as --method 'kvsharer(plan=FILE)'")


def _compression(args) -> dict:
    return dict(method=kvsharer.with_plan(args.method, args.plan), ratio=args.ratio, budget=args.budget,
                capacity=args.capacity, quant=args.quant, checkpoint=args.checkpoint, **filling(args))


def add_filling_args(p: argparse.ArgumentParser) -> None:
    """Compression while the cache fills (`kvjax.recompress`): --chunked-compression [CHUNK] and kvpress
    DecodingPress's --compression-interval / --target-size / --hidden-states-buffer-size /
    --target-compression-ratio."""
    p.add_argument("--chunked-compression", nargs="?", const=True, default=None, type=int, metavar="CHUNK",
                   help="compress after every prefill chunk (of CHUNK tokens, default 512), so the cache never holds "
                        "more than the budget plus a chunk per layer and head (needs --method and --ratio/--budget)")
    p.add_argument("--compression-interval", type=int, default=None, metavar="N",
                   help="decode-time compression (kvpress DecodingPress): every N new tokens, re-score the cache with "
                        "--method and keep --target-size tokens per layer and head")
    p.add_argument("--target-size", type=int, default=None, help="tokens kept at each decode-time compression "
                                                                 "(default 2048)")
    p.add_argument("--hidden-states-buffer-size", type=int, default=256,
                   help="decode steps before a compression whose queries score it, minus one (default 256)")
    p.add_argument("--target-compression-ratio", type=float, default=None,
                   help="keep this fraction removed of the tokens seen so far instead of --target-size "
                        "(kvpress CompressionRatioDecodingPress)")


def filling(args) -> dict:
    """chunked_compression= and decoding= from `add_filling_args`' flags (ValueError on a bad combination)."""
    decoding = None
    if args.compression_interval is not None:
        decoding = recompress.DecodeCompression(args.compression_interval, args.target_size,
                                                args.hidden_states_buffer_size, args.target_compression_ratio)
    elif args.target_size is not None or args.target_compression_ratio is not None:
        raise ValueError("--target-size / --target-compression-ratio are for decode-time compression: give "
                         "--compression-interval N too")
    return dict(chunked_compression=args.chunked_compression, decoding=decoding)


def _read_prompt(args) -> str:
    """The prompt of --prompt or --prompt-file (- : stdin), as UTF-8 text; empty or only whitespace is an error."""
    if args.prompt_file is None:
        text = args.prompt
    else:
        name = "stdin" if str(args.prompt_file) == "-" else str(args.prompt_file)
        if name != "stdin" and not args.prompt_file.is_file():
            raise ValueError(f"--prompt-file: no such file {args.prompt_file}")
        data = sys.stdin.buffer.read() if name == "stdin" else args.prompt_file.read_bytes()
        if b"\0" in data:
            raise ValueError(f"--prompt-file {name} holds NUL bytes: not a text file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt-file {name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                             f"{e.start}); convert it, e.g. iconv -t utf-8") from None
    if not text.strip():
        raise ValueError("empty prompt: the prompt is empty or only whitespace")
    return text


def _generate(args) -> None:
    text = _read_prompt(args)
    mesh = sharding.make_mesh(**sharding.parse_mesh(args.mesh)) if args.mesh else None  # bad input: before loading
    lm = kvjax.load(args.model, dtype=args.dtype)
    if mesh is not None:
        lm = lm.shard(mesh)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": text}]
        ids = lm.chat(messages)
    else:
        if args.system:
            raise ValueError("--system needs --chat")
        ids = lm.encode(text)
    shown = ""
    result = None
    for result in lm.stream(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            attention_impl=args.attention_impl, compress_local=args.compress_local,
                            layout=args.layout, page_size=args.page_size, **_compression(args)):
        text = result.text.rstrip("\ufffd")  # hold back a partly decoded UTF-8 character
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write(result.text[len(shown):] + "\n")
    print(_stats_line(len(ids), result))
    rep = kvjax.memory_report(result.cache)
    if lm.mesh is not None:
        print(f"[KV cache per device: {sharding.bytes_per_device(result.cache):,} bytes on a "
              f"{' x '.join(f'{k}={v}' for k, v in lm.mesh.shape.items())} mesh]")
    if rep["local_bytes"]:
        print(f"[KV cache by layer kind: sliding-window layers {rep['local_bytes']:,} bytes, global layers "
              f"{rep['global_bytes']:,} bytes]")
    if args.layout == "paged":
        layers = result.cache.layers
        print(f"[paged KV cache: {sum(int(x.pages_held()) for x in layers):,} pages of {args.page_size} slots held "
              f"({sum(int(x.held_bytes()) for x in layers):,} bytes) in pools of "
              f"{sum(x.n_pages for x in layers):,} pages]")
    if args.quant:
        parts = ", ".join(f"{k} {rep[k]:,}" for k in ("codes", "scales", "zeros", "outliers", "residual", "sink", "kv",
                                                      "metadata") if rep[k])
        print(f"[quantized cache: {parts} bytes | {rep['bits_per_element']:.2f} bits per element | "
              f"{rep['full_precision_bytes']:,} bytes at full precision]")


def _stats_line(n_prompt: int, result) -> str:
    """Compile first (apart: the prefill and decode figures exclude it), then run times and speeds."""
    n_new = result.new_tokens
    return (f"[compile {result.compile_s:.1f} s, not in the times below | prompt {n_prompt} tokens: prefill "
            f"{result.prefill_s:.2f} s, {n_prompt / max(result.prefill_s, 1e-9):.1f} tok/s | new {n_new} tokens: "
            f"decode {result.decode_s:.2f} s, {max(n_new - 1, 0) / max(result.decode_s, 1e-9):.1f} tok/s "
            f"| KV cache {result.cache_bytes:,} bytes]")


def _methods(args) -> None:
    sections = [
        ("score", "score methods (score a finished prefill; use with --method NAME --ratio R | --budget N):"),
        ("prefill", "prefill methods (build their cache while prefilling; --method NAME --checkpoint DIR "
                    "--ratio R | --budget N):"),
        ("quantizer", "quantizers (--quant NAME or NAME-BITS, e.g. kivi-2; or the last part of a compose):"),
    ]
    for kind, title in sections:
        print(title)
        for name, cls in sorted(methods.registry(kind).items()):
            print(f"  {name:20s} {_fields(cls) or '-'}\n  {'':20s} {_summary(name, cls)}")
    print("wrappers (use as WRAPPER:METHOD, e.g. adakv:snapkv):")
    for name, cls in sorted(methods.WRAPPERS.items()):
        print(f"  {name:20s} {_fields(cls, skip='press')}")
    print("compose (a token method, then a quantizer, as one method):")
    print(f"  {'compose':20s} --method 'compose(snapkv(window=16), kivi-2)' (the same as --method "
          "'snapkv(window=16)' --quant kivi-2)")
    print("your own: a file that registers a class (@kvjax.register_method / @kvjax.register_quantizer), "
          "loaded with --import FILE")


def _summary(name: str, cls) -> str:
    """One line: the class's own docstring, else its module's line on `name`, else the module's first."""
    own = (vars(cls).get("__doc__") or "").strip()
    if own and not own.startswith(f"{cls.__name__}("):  # not the signature dataclasses writes
        return own.split("\n")[0]
    doc = (getattr(sys.modules.get(cls.__module__), "__doc__", None) or "").strip()
    line = next((ln.strip() for ln in doc.split("\n") if f"`{name}`" in ln and ln.strip().startswith("*")), None)
    return (line or doc.split("\n")[0]).lstrip("* ")


def _fields(cls, skip: str = "") -> str:
    out = []
    for f in dataclasses.fields(cls):
        if f.name == skip or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out.append(f"{f.name}={f.default!r}")
        elif f.default_factory is not dataclasses.MISSING:
            out.append(f"{f.name}={f.default_factory()!r}")
        else:
            out.append(f"{f.name} (required)")
    return ", ".join(out)


def _convert(args) -> None:
    """`kvjax convert palu | mla | clla`: checks first, then calibrate and write the directory."""
    if args.convert_command in ("mla", "clla"):
        lm = kvjax.load(args.model, dtype=args.dtype)
        rope_dim = args.rope_dim or getattr(lm.cfg, "head_dim", 0)
        transmla.check(lm.cfg, args.kv_rank, rope_dim)
        if args.convert_command == "clla":
            layers = args.layers if args.layers in ("all", "deep") else tuple(int(x) for x in args.layers.split(","))
            route = clla.route_of(lm.cfg, args.group, layers, args.remainder)
        ids = palu.calibration_ids(lm, None if args.calib is None else str(args.calib), args.calib_tokens)
        if args.convert_command == "mla":
            out = transmla.save(args.out, lm, ids, args.kv_rank, rope_dim)
            print(f"wrote {out}: {lm.name} as MLA (latent rank {args.kv_rank}, RoPE dims {rope_dim}); use --model {out}")
            return
        out = clla.save(args.out, lm, ids, args.kv_rank, rope_dim, args.group, layers, args.remainder)
        print(f"wrote {out}: {lm.name} as CLLA (latent rank {args.kv_rank}, RoPE dims {rope_dim}, "
              f"{len(set(route))} latents for {len(route)} layers); use --model {out} [--quant per_token-4]")
        return
    method = palu.Palu(group=args.group, rank_k=args.rank, rank_v=args.rank_v or args.rank, calib=args.calib,
                       calib_tokens=args.calib_tokens)
    lm = kvjax.load(args.model, dtype=args.dtype)
    method.check(lm.cfg)
    method.ranks(lm.cfg, None)
    out = palu.save(args.out, lm, method.group, method.rank_k, method.rank_v, method.calib, method.calib_tokens)
    print(f"wrote {out}: Palu bases of {lm.name} (group {method.group}, ranks k {method.rank_k} / v {method.rank_v}); "
          f"use --model {out}")


def _calibrate(args) -> None:
    """`kvjax calibrate expected_attention_stats | qfilter`: the method's file from calibration text."""
    if args.calib_tokens < 1 or args.n_sink < 0:
        raise ValueError("--calib-tokens must be >= 1 and --n-sink >= 0")
    lm = kvjax.load(args.model, dtype=args.dtype)
    ids = palu.calibration_ids(lm, None if args.calib is None else str(args.calib), args.calib_tokens)
    if ids.shape[1] <= args.n_sink:
        raise ValueError(f"calibration windows of {ids.shape[1]} tokens leave nothing after --n-sink {args.n_sink}")
    calibrate = qfilter.calibrate if args.what == "qfilter" else expected_attention_stats.calibrate
    data = calibrate(lm, ids, args.n_sink)
    out = expected_attention_stats.save(args.out, data, lm.name)
    print(f"wrote {out}: {args.what} of {lm.name} from {int(data['n_tokens'])} query tokens "
          f"({ids.shape[0]} windows of {ids.shape[1]}); use --method '{args.what}"
          f"({'filters' if args.what == 'qfilter' else 'stats'}={out})'")


def _kvsharer(args) -> None:
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(kvsharer.KVSharer)
                if f.name not in ("plan", "press")}
    kvsharer.KVSharer(**settings)  # checks the settings before the model loads
    lm = kvjax.load(args.model, dtype=args.dtype)
    plan = kvsharer.calibrate(lm, **settings, on_try=lambda t: print(
        f"kvsharer: layer {t['pair'][1]} -> {t['pair'][0]}: cosine {t['cosine']:.4f} "
        f"{'accepted' if t['accepted'] else 'rejected'}", flush=True))
    kvsharer.save_plan(args.out, plan)
    print(f"kvsharer: {len(plan['shared_layers'])} of {lm.cfg.n_layers} layers read another layer's K/V "
          f"({len(plan['tried'])} pairs tried); route {plan['route']} -> {args.out}")


def _inspect(args) -> None:
    ids = _read_ids(args.input_ids) if args.input_ids is not None else None
    text = _read_prompt(args) if ids is None else None
    lm = kvjax.load(args.model, dtype=args.dtype)
    if ids is None:
        ids = np.asarray(lm.encode(text), np.int32)
    cache = lm.prefill(ids, method=args.method, ratio=args.ratio, budget=args.budget, checkpoint=args.checkpoint)
    out = {}
    for i, layer in enumerate(kvjax.kept_positions(cache)):
        if isinstance(layer, list):  # per-head counts differ: [K, max_n] padded with -1
            width = max(h.shape[-1] for h in layer)
            out[f"layer{i}"] = np.stack([np.pad(h[0], (0, width - h.shape[-1]), constant_values=-1) for h in layer])
        else:
            out[f"layer{i}"] = layer[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **out)
    print(f"wrote kept positions of {len(out)} layers to {args.out} "
          f"(cache {kvjax.cache_nbytes(cache):,} bytes for {len(ids)} tokens)")


def _read_ids(path: Path) -> np.ndarray:
    """Token ids [T] from a .npy file of ids [T] or [1, T]."""
    if not path.is_file():
        raise ValueError(f"--input-ids: no such file {path}")
    with path.open("rb") as f:
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise ValueError(f"--input-ids {path} is not a .npy file (no NumPy header); "
                             "write the ids with numpy.save(path, ids)")
    ids = np.load(path, allow_pickle=False)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"--input-ids must hold integer token ids, got {ids.dtype}")
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(f"--input-ids must hold ids [T] or [1, T], got shape {ids.shape}")
    return ids


def _info(args) -> None:
    lm = kvjax.load(args.model, dtype=args.dtype)
    print(lm)
    for field in dataclasses.fields(lm.cfg):
        print(f"  {field.name}: {getattr(lm.cfg, field.name)}")
    print(f"  KV bytes per token (full cache, all layers): {lm.cfg.kv_bytes_per_token():,}")
    if any(getattr(lm.cfg, "windows", None) or ()):  # sliding-window layers hold a fixed ring instead
        print(f"  (global layers only: {sum(map(bool, lm.cfg.windows))} sliding-window layers hold a ring of "
              f"{max(w or 0 for w in lm.cfg.windows)} tokens each, whatever the context)")
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(lm.params))
    print(f"  parameters: {n_params:,}")


def _cache(args) -> None:
    """kvjax cache list | clean [KEY ...] [--older-than DAYS]."""
    root = hub.cache_dir()
    entries = hub.cache_entries()
    if args.cache_command == "list":
        if not entries:
            print(f"{root}: empty")
            return
        print(f"{root}:")
        for e in entries:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
            print(f"  {e.key:28s} {_size(e.nbytes):>9s}  last used {used}  {e.what}")
        print(f"  total {_size(sum(e.nbytes for e in entries))}")
        return
    if args.older_than is not None and args.older_than < 0:
        raise ValueError(f"--older-than must be >= 0 days, got {args.older_than}")
    known = {e.key: e for e in entries}
    unknown = [k for k in args.keys if k.rstrip("/") not in known]
    if unknown:
        raise ValueError(f"no cache entry {unknown[0]!r} in {root}; entries: {', '.join(known) or 'none'}")
    chosen = [known[k.rstrip("/")] for k in args.keys] if args.keys else entries
    if args.older_than is not None:
        chosen = [e for e in chosen if time.time() - e.last_used > args.older_than * 86400]
    freed = sum(hub.remove_entry(e.key) for e in chosen)
    print(f"removed {len(chosen)} entr{'y' if len(chosen) == 1 else 'ies'} from {root}, freed {freed:,} bytes "
          f"({_size(freed)})")


def _size(n: float) -> str:
    """Bytes for people: '538.1 MB'."""
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"


def _interrupt_message(args) -> str:
    """The one line Ctrl-C prints: for eval and train, where the results are and how to resume."""
    if args.command == "eval":
        where = f"rows so far are in {args.out or Path(f'{args.task}.csv')}"
    elif args.command == "train":
        where = f"checkpoints so far are in {args.out}"
    else:
        return "kvjax: interrupted"
    how = ("rerun the same command to continue" if args.resume else
           "rerun it with --resume instead of --overwrite to continue" if getattr(args, "overwrite", False) else
           "rerun the same command with --resume to continue")
    return f"kvjax: interrupted; {where}: {how}"


def main(argv: list[str] | None = None) -> int:
    """Run the `kvjax` command; returns the exit status. As the program (argv None), Ctrl-C ends the
    process with status 130 at once (`kvjax.interrupt`); called with argv, it returns 130."""
    program = argv is None
    if program:
        interrupt.install()
    args = _parser().parse_args(argv)
    if args.no_compile_cache:
        compile_cache.disable()
    line = _interrupt_message(args)

    def message() -> str:  # on a line of its own, also after a "compiling ..." line or a progress bar
        return ("\n" if timing.mid_line() else "") + line

    with interrupt.running(message), timing.report_compiles(sys.stderr):
        try:
            if getattr(args, "imports", None):
                load_plugins(args.imports)  # user methods, before any name is resolved
            {"generate": _generate, "info": _info, "methods": _methods, "inspect": _inspect, "kvsharer": _kvsharer,
             "convert": _convert, "calibrate": _calibrate,
             "eval": eval_command.run_eval, "plot": eval_command.run_plot,
             "cache": _cache, **{name: c.run for name, c in added_commands().items()}}[args.command](args)
        except (ValueError, OSError) as e:
            print(f"kvjax: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if program:
                interrupt.exit_now(message)
            print(message(), file=sys.stderr)
            return interrupt.EXIT_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
