"""Markdown summaries of result rows (as read back from the CSV: every value a string).

* retrieval tasks (passkey, niah, ruler): mean score (%) per configuration and context length, with
  the mean over lengths and the cache bytes against the full cache; RULER also per subtask;
* ppl: nll and perplexity per configuration (token-weighted over chunks), and the change against
  the full cache;
* bench: prefill / decode tok/s, compile time, cache bytes and peak memory per configuration.
"""
from __future__ import annotations

import math
from collections import defaultdict

CONFIG = ("method", "ratio", "budget", "quant")


def number(x: str) -> float:
    """A CSV cell as a float (empty: NaN)."""
    return float(x) if x not in ("", None) else math.nan


def _config_order(rows: list[dict]) -> list[tuple]:
    """Configurations in order: full first, then methods as they first appear, by budget."""
    seen = list(dict.fromkeys(tuple(r[k] for k in CONFIG) for r in rows))
    methods = list(dict.fromkeys(c[0] for c in seen))
    return sorted(seen, key=lambda c: (c[0] != "full", methods.index(c[0]), number(c[1]), number(c[2]), c[3]))


def _label(c: tuple) -> list[str]:
    method, ratio, budget, quant = c
    return [method, ratio or (f"{budget} tok" if budget else "-"), quant or "-"]


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def retrieval_table(rows: list[dict], title: str) -> list[str]:
    lengths = sorted({int(r["length"]) for r in rows})
    by = defaultdict(list)
    for r in rows:
        by[tuple(r[k] for k in CONFIG), int(r["length"])].append(r)
    body = []
    for c in _config_order(rows):
        cells = [by.get((c, n), []) for n in lengths]
        scores = [100 * sum(number(r["score"]) for r in cell) / len(cell) if cell else math.nan for cell in cells]
        every = [r for cell in cells for r in cell]
        frac = sum(number(r["cache_bytes"]) / number(r["full_cache_bytes"]) for r in every) / len(every)
        mean = 100 * sum(number(r["score"]) for r in every) / len(every)
        body.append(_label(c) + [f"{frac:.3f}"] + [f"{s:.1f}" for s in scores] + [f"{mean:.1f}"])
    n = len({(r["length"], r["depth"], r["sample"], r["subtask"]) for r in rows})
    return [f"### {title} (score %, {n} prompts)", ""] + _table(
        ["method", "ratio", "quant", "bytes / full"] + [str(n) for n in lengths] + ["mean"], body) + [""]


def _mean_nll(rows: list[dict]) -> float:
    """Token-weighted mean negative log-likelihood of perplexity rows."""
    return sum(number(r["nll"]) * number(r["n_tokens"]) for r in rows) / sum(number(r["n_tokens"]) for r in rows)


def ppl_table(rows: list[dict]) -> list[str]:
    by = defaultdict(list)
    for r in rows:
        by[tuple(r[k] for k in CONFIG)].append(r)
    full = [c for c in by if c[0] == "full" and not c[3]]
    ref = _mean_nll(by[full[0]]) if full else None
    body = []
    for c in _config_order(rows):
        rs = by[c]
        nll = _mean_nll(rs)
        delta = [f"{math.exp(nll) - math.exp(ref):+.3f}"] if ref is not None else []
        body.append(_label(c) + [f"{number(rs[0]['kept_fraction']):.3f}", f"{int(number(rs[0]['cache_bytes'])):,}",
                                 f"{nll:.4f}", f"{math.exp(nll):.3f}"] + delta)
    r0 = rows[0]
    head = ["method", "ratio", "quant", "kept", "cache bytes", "nll", "ppl"] + (["Δppl vs full"] if full else [])
    return [f"### Perplexity: {len({r['sample'] for r in rows})} chunks of {r0['length']} context + "
            f"{r0['n_tokens']} predicted tokens", ""] + _table(head, body) + [""]


def bench_table(rows: list[dict]) -> list[str]:
    body = []
    for n in sorted({int(r["length"]) for r in rows}):
        part = [r for r in rows if int(r["length"]) == n]
        for c in _config_order(part):
            r = next(r for r in part if tuple(r[k] for k in CONFIG) == c)
            body.append([str(n)] + _label(c) + [f"{number(r['prefill_tok_s']):.0f}", f"{number(r['decode_tok_s']):.1f}",
                                                f"{number(r['compile_s']):.1f}", f"{int(number(r['cache_bytes'])):,}",
                                                f"{int(number(r['peak_bytes'])):,}"])
    return ["### Speed and memory", ""] + _table(
        ["length", "method", "ratio", "quant", "prefill tok/s", "decode tok/s", "compile s", "cache bytes",
         "peak bytes"], body) + [""]


def markdown_summary(rows: list[dict]) -> str:
    """All tables for the tasks present in `rows`."""
    out: list[str] = []
    for task in dict.fromkeys(r["task"] for r in rows):
        part = [r for r in rows if r["task"] == task]
        if task == "ppl":
            out += ppl_table(part)
        elif task == "bench":
            out += bench_table(part)
        elif task == "ruler":
            out += retrieval_table(part, "RULER (mean over subtasks)")
            for sub in dict.fromkeys(r["subtask"] for r in part):
                out += retrieval_table([r for r in part if r["subtask"] == sub], f"RULER {sub}")
        else:
            out += retrieval_table(part, task)
    return "\n".join(out)
