"""`kvjax train METHOD`: train a learned compressor on a frozen model.

    kvjax train locret --model smollm2-135m --steps 200 --out runs/locret [--resume] [--data PATH]
    kvjax generate --method locret --checkpoint runs/locret --ratio 0.5 --prompt "..."
    kvjax train matryoshka --model smollm2-135m --steps 500 --out runs/matryoshka [--resume] \\
        [--cache-fraction 0.5]     # no --data: $KVJAX_DATA/tinyshakespeare.txt, TFDS or generated prose
    kvjax train cla --model smollm2-135m --steps 100 --out runs/cla [--spec "cla(layers=all)"]
    kvjax eval ppl --model runs/cla --method cla    # the healed model (its consumers' q/o) with its conversion
    kvjax train duo --model smollm2-135m --steps 200 --out runs/duo --data essays/ [--n-keys 10]
    kvjax generate --method "duo(gates=runs/duo, sparsity=0.5)" --prompt "..."
    kvjax train kvzap --model smollm2-135m --steps 300 --out runs/kvzap --data essays/ [--hidden 0: linear]
    kvjax train distill --student runs/palu16 --steps 100 --out runs/palu16-healed [--teacher smollm2-135m]
    kvjax eval ppl --model runs/palu16-healed        # a converted model healed by distillation (X-EcoMLA)
    kvjax generate --method "kvzap(checkpoint=runs/kvzap)" --ratio 0.5 --prompt "..."   # or threshold= in the name

Writes `OUT/checkpoints/<step>/` (orbax), `OUT/metrics.jsonl`, and (matryoshka) with
`--cache-fraction` the greedy per-layer ranks meeting that fraction of the full K/V bytes to
`OUT/ranks.json`. `OUT/settings.json` records the run's settings; `--resume` refuses (exit 2, naming
each one) settings that differ from them, except `--steps`, `--save-every`, `--keep`, `--log-every`
and the `--data` path (the data's tokens must be the same): see `kvjax.train.loop`.
Heavy imports (optax, grain, the training modules) happen only when the command runs (the CLI
imports this module at start-up, through the entry point `kvjax.commands: train` in setup.cfg).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvjax import distributed
from kvjax.hub import DEFAULT_MODEL

METHODS = ("locret", "matryoshka", "duo", "cla", "kvzap", "distill")
# locret, duo, kvzap: the references' rates; distill as cla (both heal attention projections)
DEFAULT_LR = {"locret": 5e-4, "matryoshka": 1e-3, "duo": 0.02, "cla": 1e-4, "kvzap": 5e-3, "distill": 1e-4}


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a learned KV-cache compressor on a frozen model")
    t.add_argument("method", choices=METHODS)
    t.add_argument("--model", default=DEFAULT_MODEL)
    t.add_argument("--data", default=None,
                   help="a text file, a directory of *.txt, a .npy of token ids, or tfds:NAME[/CONFIG][:SPLIT] "
                        "(default: $KVJAX_DATA/tinyshakespeare.txt, else a prepared TFDS dataset, else prose "
                        "generated from --seed; see kvjax/data.py)")
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, metrics.jsonl)")
    t.add_argument("--resume", action="store_true", help="continue from the newest readable checkpoint in --out")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: locret 5e-4, matryoshka 1e-3, duo 0.02, cla 1e-4, kvzap 5e-3, "
                        "distill 1e-4)")
    t.add_argument("--warmup", type=int, default=20)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--devices", type=int, default=None, help="data-parallel devices (default: all)")
    t.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    t.add_argument("--hidden", type=int, default=None,
                   help="locret: the retaining heads' hidden size (default 1024); kvzap: the MLP's (default 512; "
                        "0: the linear scorer)")
    t.add_argument("--response", type=float, default=0.25,
                   help="locret: fraction of each window whose tokens are the queries that label the rest")
    distributed.add_args(t)
    t.add_argument("--n-levels", type=int, default=8, help="matryoshka: nested ranks are multiples of D / n-levels")
    t.add_argument("--spec", default="cla", help="cla: the conversion to heal, e.g. 'cla(group=2, layers=all)'")
    t.add_argument("--cache-fraction", type=float, default=None,
                   help="matryoshka: after training, search per-layer ranks storing this fraction of the K/V bytes")
    t.add_argument("--sink", type=int, default=128, help="duo: the streaming heads' attention sinks")
    t.add_argument("--recent", type=int, default=256, help="duo: the streaming heads' recent window")
    t.add_argument("--n-keys", type=int, default=10, help="duo: pass keys hidden in each training window")
    t.add_argument("--key-digits", type=int, default=5, help="duo: digits of each pass key")
    t.add_argument("--windows", type=int, default=48, help="kvzap: text windows whose KVzip scores are the targets")
    t.add_argument("--context", type=int, default=512, help="kvzap: tokens per text window")
    t.add_argument("--sample", type=int, default=256, help="kvzap: tokens drawn from each window as training rows")
    t.add_argument("--student", default=None,
                   help="distill: the converted model to heal (`kvjax convert palu|mla|clla --out`)")
    t.add_argument("--teacher", default=None, help="distill: the teacher (default: the student's base model; the "
                                                   "same vocabulary)")
    t.add_argument("--fake-quant", default=None, help="distill: an MLA student's latents trained through this "
                                                      "quantizer's round trip (straight-through), e.g. per_token-4")


def run(args: argparse.Namespace) -> None:
    import kvjax
    from kvjax.train.data import TFDS_PREFIX, load_tokens, token_batches
    from kvjax.train.loop import TrainConfig, check_mesh, data_digest, make_mesh, train
    from kvjax.train.duo import DuoTask, PasskeyBatches
    from kvjax.train.cla import CLATask
    from kvjax.train.locret import LocretTask
    from kvjax.train.matryoshka import MatryoshkaTask
    from kvjax.train.kvzap import KVzapTask, RowBatches, collect, load_or_collect
    from kvjax.train.distill import DistillTask
    from kvjax.methods import palu
    from kvjax import transmla

    lr = DEFAULT_LR[args.method] if args.lr is None else args.lr
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=lr,
                      warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip, save_every=args.save_every,
                      keep=args.keep, log_every=args.log_every, seed=args.seed)
    if args.data is not None and not args.data.startswith(TFDS_PREFIX) and not Path(args.data).expanduser().exists():
        raise ValueError(f"--data: no such file or directory {args.data}")
    procs = distributed.from_args(args)  # before JAX computes anything: the mesh spans every process's devices
    mesh = make_mesh(args.devices)
    check_mesh(mesh, cfg.batch_size)
    if args.cache_fraction is not None and args.method != "matryoshka":
        raise ValueError("--cache-fraction searches MatryoshkaKV ranks: it applies to `kvjax train matryoshka` only")
    if args.cache_fraction is not None and not 1 / args.n_levels <= args.cache_fraction <= 1:
        raise ValueError(f"--cache-fraction must be in [1/{args.n_levels}, 1], got {args.cache_fraction}")
    distill_only = (args.student, args.teacher, args.fake_quant)
    if any(a is not None for a in distill_only) != (args.method == "distill"):
        raise ValueError("--student / --teacher / --fake-quant are for `kvjax train distill`, which needs --student")
    converted = args.student and (palu.converted(args.student) or transmla.converted(args.student))
    if args.method == "distill" and not converted:
        raise ValueError(f"--student {args.student}: not a converted model directory (`kvjax convert palu|mla --out`)")
    try:
        lm = kvjax.load(args.model if args.student is None else args.student, dtype=args.dtype)
        if args.method == "distill":
            teacher = kvjax.load(args.teacher or converted["model"], dtype=args.dtype)
            task = DistillTask(lm.cfg, model_name=args.student, student_method=lm.method, teacher=teacher.name,
                               teacher_cfg=None if teacher.cfg == lm.cfg else teacher.cfg, fake_quant=args.fake_quant)
            backbone = {"student": lm.params, "teacher": teacher.params}
        elif args.method == "locret":
            task = LocretTask(lm.cfg, model_name=args.model, hidden=1024 if args.hidden is None else args.hidden,
                              response=args.response, seed=args.seed)
            task.n_prefix(cfg.seq_len)  # a window too short to split is an error before the model runs
        elif args.method == "matryoshka":
            task = MatryoshkaTask(lm.cfg, model_name=args.model, n_levels=args.n_levels)
        elif args.method == "cla":
            task = CLATask(lm.cfg, model_name=args.model, spec=args.spec)
        elif args.method == "kvzap":
            task = KVzapTask(lm.cfg, model_name=args.model, hidden=512 if args.hidden is None else args.hidden,
                             seed=args.seed)
        tokens = load_tokens(args.data, lm.tokenizer, args.seed)
        extra = {}
        if args.method != "distill":
            backbone = lm.params
        if args.method == "kvzap":  # a table of (hidden state, log KVzip score) rows, computed once per run
            extra = dict(windows=args.windows, context=args.context, sample=args.sample)
            key = json.dumps(dict(extra, data=data_digest(tokens), model=task.meta()["model"], seed=args.seed))
            backbone = load_or_collect(args.out, key, lambda: collect(
                lm.params, lm.cfg, lm.tokenizer, tokens, n_windows=args.windows, context=args.context,
                sample=args.sample, seed=args.seed))
            batches = RowBatches(len(backbone["y"]), cfg.seq_len, cfg.batch_size, cfg.seed)
            backbone = {"x": backbone["x"], "y": backbone["y"]}
        elif args.method == "duo":  # synthetic multi-passkey windows over the text
            batches = PasskeyBatches(tokens, lm.tokenizer, cfg.seq_len, cfg.batch_size, cfg.seed, args.n_keys,
                                     args.key_digits)
            task = DuoTask(lm.cfg, model_name=args.model, answer_len=batches.answer_len, sink=args.sink,
                           recent=args.recent)
            extra = dict(n_keys=args.n_keys, key_digits=args.key_digits)
        else:
            batches = token_batches(tokens, cfg.seq_len, cfg.batch_size, cfg.seed)
        if procs.leader:
            print(f"kvjax train {args.method}: {lm!r}, {len(tokens):,} tokens, {cfg.steps} steps of "
                  f"{cfg.batch_size} x {cfg.seq_len} on {mesh.shape['data']} device(s) in {procs.count} "
                  f"process(es) -> {args.out}")
        settings = dict(data=data_digest(tokens), data_source=args.data, dtype=lm.cfg.dtype, **extra)
        result = train(task, backbone, batches, cfg, args.out, resume=args.resume, mesh=mesh, settings=settings)
        if args.cache_fraction is not None:
            state = result.state
            ranks_k, ranks_v, kl = task.search_ranks(state.params, state.const, lm.params, batches[cfg.steps],
                                                     args.cache_fraction)
            full = lm.cfg.kv_bytes_per_token()
            stored = full * (sum(ranks_k) + sum(ranks_v)) // (2 * lm.cfg.n_layers * lm.cfg.head_dim)
            report = {"cache_fraction": args.cache_fraction, "ranks_k": ranks_k, "ranks_v": ranks_v, "kl": kl,
                      "kv_bytes_per_token": stored, "full_kv_bytes_per_token": full, "step": int(state.step)}
            if procs.leader:
                (args.out / "ranks.json").write_text(json.dumps(report, indent=1) + "\n")
                print(f"ranks at {args.cache_fraction:.0%} of the K/V bytes ({stored:,} of {full:,} bytes per "
                      f"token): keys {ranks_k}, values {ranks_v}, KL {kl:.4f} -> {args.out / 'ranks.json'}")
    finally:
        distributed.shutdown(procs)
