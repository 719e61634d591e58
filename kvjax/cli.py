"""The `kvjax` command line.

    kvjax generate --model smollm2-135m --prompt "What is the capital of France?" --chat
    kvjax info --model smollm2-135m
    kvjax eval ppl --import my_press.py --method my_press --ratio 0.5     # your own method
    kvjax train matryoshka --model smollm2-135m --data ../shared/data/tinyshakespeare.txt --steps 500 --out runs/m

Bad input prints one line `kvjax: error: ...` and exits with status 2 (no traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np

import kvjax
from kvjax import methods

from kvjax.eval import command as eval_command
from kvjax.train import command as train_command
from kvjax.hub import DEFAULT_MODEL, KNOWN_MODELS
from kvjax.plugins import load_plugins


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvjax", description="KV-cache compression research framework (JAX).")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text, streaming it, then print speed and cache size")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"known name ({', '.join(KNOWN_MODELS)}), a .gguf file or an HF checkpoint directory")
    g.add_argument("--prompt", required=True, help="the prompt text")
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
    add_import_arg(g)

    m = sub.add_parser("methods", help="list the compression methods, quantizers and their parameters")
    add_import_arg(m)

    n = sub.add_parser("inspect", help="write the positions a method keeps, per layer (and head), to .npz")
    n.add_argument("--model", default=DEFAULT_MODEL)
    n.add_argument("--input-ids", required=True, type=Path, help=".npy of int ids [T] (or [1, T])")
    n.add_argument("--out", required=True, type=Path, help="output .npz: layer{i} = int32 [K, n] kept positions")
    n.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _compression_args(n, required=True)
    add_import_arg(n)

    i = sub.add_parser("info", help="print the model config and KV-cache bytes per token")
    i.add_argument("--model", default=DEFAULT_MODEL)
    i.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])

    eval_command.add_parsers(sub)
    train_command.add_parser(sub)
    return p


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


def _compression(args) -> dict:
    return dict(method=args.method, ratio=args.ratio, budget=args.budget, capacity=args.capacity, quant=args.quant,
                checkpoint=args.checkpoint)


def _generate(args) -> None:
    lm = kvjax.load(args.model, dtype=args.dtype)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        ids = lm.chat(messages)
    else:
        if args.system:
            raise ValueError("--system needs --chat")
        ids = lm.encode(args.prompt)
    shown = ""
    result = None
    for result in lm.stream(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            attention_impl=args.attention_impl, **_compression(args)):
        text = result.text.rstrip("\ufffd")  # hold back a partly decoded UTF-8 character
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write(result.text[len(shown):] + "\n")
    n_new = result.new_tokens
    print(f"[prompt {len(ids)} tokens | new {n_new} tokens | prefill {len(ids) / max(result.prefill_s, 1e-9):.1f} tok/s "
          f"| decode {max(n_new - 1, 0) / max(result.decode_s, 1e-9):.1f} tok/s | compile {result.compile_s:.1f} s "
          f"| KV cache {result.cache_bytes:,} bytes]")
    if args.quant:
        rep = kvjax.memory_report(result.cache)
        parts = ", ".join(f"{k} {rep[k]:,}" for k in ("codes", "scales", "zeros", "outliers", "residual", "sink", "kv",
                                                      "metadata") if rep[k])
        print(f"[quantized cache: {parts} bytes | {rep['bits_per_element']:.2f} bits per element | "
              f"{rep['full_precision_bytes']:,} bytes at full precision]")


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


def _inspect(args) -> None:
    if not args.input_ids.is_file():
        raise ValueError(f"--input-ids: no such file {args.input_ids}")
    ids = np.load(args.input_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(f"--input-ids must hold ids [T] or [1, T], got shape {ids.shape}")
    lm = kvjax.load(args.model, dtype=args.dtype)
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


def _info(args) -> None:
    lm = kvjax.load(args.model, dtype=args.dtype)
    print(lm)
    for field in dataclasses.fields(lm.cfg):
        print(f"  {field.name}: {getattr(lm.cfg, field.name)}")
    print(f"  KV bytes per token (full cache, all layers): {lm.cfg.kv_bytes_per_token():,}")
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(lm.params))
    print(f"  parameters: {n_params:,}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "imports", None):
            load_plugins(args.imports)  # user methods, before any name is resolved
        {"generate": _generate, "info": _info, "methods": _methods, "inspect": _inspect,
         "eval": eval_command.run_eval, "plot": eval_command.run_plot,
         "train": train_command.run}[args.command](args)
    except ValueError as e:
        print(f"kvjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
