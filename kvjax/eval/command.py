"""`kvjax eval <task>` and `kvjax plot results.csv`: argument parsing, checks before the run, the run.

Everything that can be wrong with a request (task, lengths, depths, methods and budgets at each
length, haystack folder, text file, output path) raises ValueError before the model runs. Haystack
and perplexity text come from `kvjax.data.resolve`: `--haystack` / `--text`, else `$KVJAX_DATA`, else
a prepared TFDS dataset, else prose generated from `--seed`; the CSV's `options` record which.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import sys
from pathlib import Path

from tqdm import tqdm

import kvjax
from kvjax import data, distributed
from kvjax.eval import leaderboard, prompts, records, ruler, runner, summary
from kvjax.eval.bench import run_bench
from kvjax.eval.perplexity import run_ppl, text_chunks
from kvjax.eval.plots import plot_all
from kvjax.eval.prompts import cut, sample_rng
from kvjax.hub import DEFAULT_MODEL
from kvjax.methods.spec import spec_of

TASKS = ("passkey", "niah", "ruler", "ppl", "bench")


def add_parsers(sub) -> None:
    """The `eval` and `plot` subcommands."""
    e = sub.add_parser("eval", help="evaluate methods on a task: passkey, niah, ruler, ppl, bench; or the leaderboard",
                       description="Evaluate every method x ratio (or budget) x quantizer on a task; writes a CSV "
                                   "(one row per sample x configuration), a markdown summary and plots. "
                                   "`kvjax eval leaderboard` runs every method family on several models and tasks "
                                   "and ranks them against real cache bytes (kvjax.eval.leaderboard).")
    e.add_argument("task", help=f"one of {', '.join(TASKS)}, or leaderboard")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    e.add_argument("--method", nargs="+", default=["full"],
                   help="methods to compare: full and names from `kvjax methods` (or wrapper:name, "
                        "name(key=value,...), e.g. 'locret(checkpoint=runs/locret)', or a name from --import)")
    budget = e.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, nargs="+", default=[], help="fractions of the context removed")
    budget.add_argument("--budget", type=int, nargs="+", default=[], help="tokens kept per layer and KV head")
    e.add_argument("--quant", nargs="+", default=["none"], help="quantizers (none, kivi-2, int8, ...), each combined "
                                                                "with every method")
    e.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="context lengths in tokens (default: 1024 2048 4096; leaderboard: 4096)")
    e.add_argument("--depths", type=float, nargs="+", default=None,
                   help="needle depths in [0, 1] (passkey default: drawn per sample; niah default: 0 .25 .5 .75 1)")
    e.add_argument("--n", type=int, default=10, help="samples per cell (ppl: chunks)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", type=Path, default=None, help="results CSV (default: <task>.csv)")
    e.add_argument("--resume", action="store_true", help="continue an interrupted run: skip the rows in --out")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    e.add_argument("--batch", type=int, default=8, help="samples prefilled together")
    e.add_argument("--max-new-tokens", type=int, default=None, help="greedy tokens per answer (task default)")
    e.add_argument("--question-in-context", action="store_true",
                   help="query-aware variant: the question also ends the compressed context")
    e.add_argument("--haystack", type=Path, default=None,
                   help="niah, ruler, bench: folder of .txt files (default: $KVJAX_DATA/paul_graham_essays, "
                        "else a prepared TFDS dataset, else prose generated from --seed)")
    e.add_argument("--needle", default=prompts.NIAH_NEEDLE)
    e.add_argument("--question", default=prompts.NIAH_QUESTION)
    e.add_argument("--answer-prefix", default=prompts.NIAH_ANSWER_PREFIX)
    e.add_argument("--expect", nargs="+", default=list(prompts.NIAH_EXPECT),
                   help="phrases a correct niah answer contains")
    e.add_argument("--subtasks", nargs="+", default=None, help="RULER subtasks (default: all)")
    e.add_argument("--text", type=Path, default=None,
                   help="ppl: text file (default: $KVJAX_DATA/wikitext-2/test.txt, else a prepared TFDS dataset, "
                        "else prose generated from --seed)")
    e.add_argument("--context-len", type=int, default=2048, help="ppl: tokens prefilled and compressed")
    e.add_argument("--eval-len", type=int, default=256, help="ppl: tokens teacher-forced on top")
    e.add_argument("--new-tokens", type=int, default=64, help="bench: tokens decoded")
    e.add_argument("--no-plots", action="store_true")
    e.add_argument("--chunked-compression", type=int, default=None, metavar="CHUNK",
                   help="every evicting configuration compresses after each prefill chunk of CHUNK tokens (its cache "
                        "never holds more than the budget plus a chunk; kvjax.recompress)")
    distributed.add_args(e)
    leaderboard.add_args(e)
    e.add_argument("--import", dest="imports", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="import your own methods or quantizers first: a .py file or a module name that "
                        "registers them (@kvjax.register_method); repeatable")

    p = sub.add_parser("plot", help="re-draw the figures of a results CSV")
    p.add_argument("csv", type=Path)
    p.add_argument("--out-dir", type=Path, default=None, help="default: beside the CSV")


def _keep_rss_bounded() -> None:
    """glibc raises its mmap threshold (up to 32 MiB) after large frees; XLA's freed per-layer buffers
    (tens of MB) then stay in the heap, and a sweep's resident memory grew by gigabytes per
    configuration (out of memory at 4k context on a 23 GB machine) while the live arrays did not.
    A fixed 4 MiB threshold (mallopt M_MMAP_THRESHOLD) returns them to the system. No-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _positive(**kw) -> None:
    for k, v in kw.items():
        if v is not None and v < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {v}")


def eval_parser():
    """A parser of `eval ...` argument lists (the leaderboard runs the eval through it)."""
    parser = argparse.ArgumentParser(prog="kvjax")
    add_parsers(parser.add_subparsers())
    return parser


def run_eval(args) -> None:
    if args.task == "leaderboard":
        args.lengths = args.lengths or [4096]
        return leaderboard.run(args, run_eval, eval_parser)
    if args.task not in TASKS:
        raise ValueError(f"unknown task {args.task!r}; tasks: {', '.join(TASKS)}, leaderboard")
    args.lengths = args.lengths or [1024, 2048, 4096]
    _keep_rss_bounded()
    _positive(n=args.n, batch=args.batch, max_new_tokens=args.max_new_tokens, context_len=args.context_len,
              eval_len=args.eval_len, new_tokens=args.new_tokens)
    if args.eval_len < 2 and args.task == "ppl":
        raise ValueError(f"--eval-len must be >= 2, got {args.eval_len}")
    for n in args.lengths:
        _positive(lengths=n)
    depths = args.depths
    if depths is None:
        depths = [0.0, 0.25, 0.5, 0.75, 1.0] if args.task == "niah" else [None]
    for d in depths:
        if d is not None and not 0 <= d <= 1:
            raise ValueError(f"--depths must be in [0, 1], got {d}")
    quants = [None if q == "none" else q for q in args.quant]
    configs = runner.make_configs(args.method, args.ratio, args.budget, quants, args.chunked_compression)
    out = args.out or Path(f"{args.task}.csv")
    corpus = None
    if args.task in ("niah", "ruler", "bench"):
        corpus = data.resolve("haystack", args.haystack, args.seed)
    elif args.task == "ppl":  # generated text: ~8 characters per token needed is ample for any tokenizer
        corpus = data.resolve("text", args.text, args.seed, min_chars=8 * args.n * (args.context_len + args.eval_len))
    procs = distributed.from_args(args)  # before JAX computes anything
    lm = kvjax.load(args.model, dtype=args.dtype)
    if lm.method is not None:  # a converted model (`kvjax convert palu`): "full" is its own cache, nothing else
        if any(c.method != "full" for c in configs):
            raise ValueError(f"{args.model} is a converted model with its own cache: only --method full applies")
        configs = [dataclasses.replace(c, method=spec_of(lm.method)) for c in configs]
    lengths = [args.context_len] if args.task == "ppl" else args.lengths
    for n in lengths:
        if n + (args.eval_len if args.task == "ppl" else 0) > lm.cfg.max_positions:
            raise ValueError(f"length {n} exceeds the model's maximum positions ({lm.cfg.max_positions})")
    runner.check_configs(lm.cfg, configs, lengths, lm)
    runner.union_spec(configs)

    options = dict(task=args.task, lengths=lengths)
    if args.chunked_compression is not None:
        options["chunked_compression"] = args.chunked_compression
    tok = lm.tokenizer
    samples = chunks = bench_prompts = None  # the task's work items: samples, text chunks or bench prompts
    if args.task in ("passkey", "niah", "ruler"):
        new = args.max_new_tokens
        if args.task == "passkey":
            filler = prompts.filler_haystack(prompts.piece_encoder(tok))
            samples = [prompts.passkey_sample(tok, filler, n, d, i, args.seed, args.question_in_context, new or 10)
                       for n in lengths for d in depths for i in range(args.n)]
            options.update(question_in_context=args.question_in_context, max_new_tokens=new or 10)
        elif args.task == "niah":
            hay = prompts.tokenize_haystack(prompts.piece_encoder(tok), prompts.corpus_sentences(corpus))
            samples = [prompts.niah_sample(tok, hay, n, d, i, args.seed, args.needle, args.question, args.answer_prefix,
                                           args.expect, args.question_in_context, new or 32)
                       for n in lengths for d in depths for i in range(args.n)]
            options.update(haystack=corpus.label, needle=args.needle, question=args.question,
                           answer_prefix=args.answer_prefix, expect=args.expect,
                           question_in_context=args.question_in_context, max_new_tokens=new or 32)
        else:
            subtasks = args.subtasks or list(ruler.SUBTASKS)
            for s in subtasks:
                if s not in ruler.SUBTASKS:
                    raise ValueError(f"unknown RULER subtask {s!r}; known: {', '.join(ruler.SUBTASKS)}")
            hay = prompts.tokenize_haystack(prompts.piece_encoder(tok), prompts.corpus_sentences(corpus))
            samples = [ruler.ruler_sample(tok, hay, s, n, i, args.seed) for s in subtasks for n in lengths
                       for i in range(args.n)]
            if new:
                samples = [dataclasses.replace(s, max_new_tokens=new) for s in samples]
            options.update(haystack=corpus.label, subtasks=subtasks, max_new_tokens=new)
        for s in samples:
            end = len(s.context) + len(s.suffix) + s.max_new_tokens
            if end > lm.cfg.max_positions:
                raise ValueError(f"length {s.length}: prompt and answer need {end} positions, beyond the model's "
                                 f"maximum ({lm.cfg.max_positions})")
        total = len(samples) * len(configs)
    elif args.task == "ppl":
        chunks = text_chunks(tok, corpus, args.context_len, args.eval_len, args.n)
        options.update(text=corpus.label, context_len=args.context_len, eval_len=args.eval_len)
        total = len(chunks) * len(configs)
    else:
        hay = prompts.tokenize_haystack(prompts.piece_encoder(tok), prompts.corpus_sentences(corpus))
        bench_prompts = {n: cut(hay, int(sample_rng(args.seed, "bench", n, None, 0).integers(len(hay.starts))), n)[0]
                         .tolist() for n in lengths}
        options.update(haystack=corpus.label, new_tokens=args.new_tokens)
        total = len(lengths) * len(configs)

    try:
        _run_shared(args, procs, lm, out, options, total, configs, samples, chunks, bench_prompts)
    finally:
        distributed.shutdown(procs)
    if not procs.leader:
        return
    rows = [r for r in records.read_rows(out) if r["task"] == args.task]
    table = summary.markdown_summary(rows)
    print(table)
    out.with_suffix(".md").write_text(table + "\n")
    if not args.no_plots:
        for path in plot_all(out):
            print(f"wrote {path}", file=sys.stderr)


def _run_shared(args, procs, lm, out, options, total, configs, samples, chunks, bench_prompts) -> None:
    """Compute this process's share of the rows (`distributed.Processes.share`: samples, text chunks or
    bench lengths, every configuration of each, so a prefill is still shared by all of them). Process 0
    alone opens the results file (lock, resume checks) and tells the others which rows are done; their
    rows reach it through `distributed.Exchange` and it writes them, so the CSV holds each row once."""
    exchange = distributed.Exchange(procs, f"eval-{args.task}")
    results = None
    if procs.leader:
        try:
            results = records.ResultsFile(out, records.run_metadata(lm, args.seed, options), args.resume,
                                          args.overwrite)
        except ValueError as e:
            exchange.broadcast("done", {"error": str(e)})  # the others stop with the same message
            raise
    done = exchange.broadcast("done", sorted(results.done) if results else None)
    if isinstance(done, dict):
        raise ValueError(f"process 0: {done['error']}")
    done = {tuple(k) for k in done}
    progress = tqdm(total=total, desc=f"eval {args.task}", unit="row", file=sys.stderr, dynamic_ncols=True,
                    disable=not procs.leader)
    ours = {tuple(records.fmt(v) for v in c.key().values()) for c in configs}  # rows of this run's configurations
    progress.update(sum(1 for k in done if k[0] == args.task and k[-4:] in ours))
    emit = results.append if procs.leader else exchange.send
    kw = dict(todo=lambda key: key not in done, emit=emit, progress=progress)
    if args.task in ("passkey", "niah", "ruler"):
        runner.run_retrieval(lm, procs.share(samples), configs, max_batch=args.batch, **kw)
    elif args.task == "ppl":
        run_ppl(lm, chunks, args.context_len, configs, max_batch=args.batch,
                indices=procs.share(list(range(len(chunks)))), **kw)
    else:
        run_bench(lm, dict(procs.share(list(bench_prompts.items()))), configs, new_tokens=args.new_tokens, **kw)
    if procs.leader:
        for rows in exchange.gather():
            results.append(rows)
            progress.update(len(rows))
        results.close()
    else:
        exchange.finish()
    progress.close()


def run_plot(args) -> None:
    for path in plot_all(args.csv, args.out_dir):
        print(f"wrote {path}")
