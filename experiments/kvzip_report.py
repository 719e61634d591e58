"""The KVzip passkey table: kvjax's query-agnostic passkey accuracy per method and ratio, and kvpress's KVzipPress
answers on the same prompts (`kvpress_passkey_sweep.py`), compared answer by answer.

    python experiments/kvzip_report.py [--dir experiments/results/kvzip]

Reads passkey.csv (`kvjax eval passkey`) and, if present, kvpress_passkey.csv; prints markdown.
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("experiments/results/kvzip"))
    args = ap.parse_args()
    rows = list(csv.DictReader((args.dir / "passkey.csv").open()))
    lengths = sorted({int(r["length"]) for r in rows})
    acc, comp, pre, kept = defaultdict(list), defaultdict(list), defaultdict(list), {}
    for r in rows:
        key = (r["method"], r["ratio"] or "-")
        acc[key, int(r["length"])].append(int(r["correct"]))
        comp[key, int(r["length"])].append(float(r["compress_s"]))
        pre[int(r["length"])].append(float(r["prefill_s"]))
        kept[key] = float(r["cache_bytes"]) / float(r["full_cache_bytes"])
    methods = list(dict.fromkeys((r["method"], r["ratio"] or "-") for r in rows))
    n = len(acc[methods[0], lengths[0]])
    out = [f"### Query-agnostic passkey (question after compression), % correct of {n} prompts per length",
           "", "| method | ratio | bytes / full | " + " | ".join(map(str, lengths)) + " | compress s / prompt (" +
           ", ".join(map(str, lengths)) + ") |", "|---|---|---|" + "---|" * (len(lengths) + 1)]
    for m in methods:
        cells = [f"{100 * sum(acc[m, n_]) / len(acc[m, n_]):.0f}" if acc[m, n_] else "" for n_ in lengths]
        times = ", ".join(f"{min(comp[m, n_]):.2f}" for n_ in lengths if comp[m, n_])
        out.append(f"| {m[0]} | {m[1]} | {kept[m]:.3f} | " + " | ".join(cells) + f" | {times} |")
    out += ["", "prefill s / prompt (shared by every configuration): " +
            ", ".join(f"{n_}: {min(pre[n_]):.2f}" for n_ in lengths)]
    ref = args.dir / "kvpress_passkey.csv"
    if ref.is_file():
        theirs = {(int(r["length"]), int(r["sample"]), r["method"], r["ratio"]): r for r in csv.DictReader(ref.open())}
        same = total = 0
        lines = []
        for r in rows:
            k = (int(r["length"]), int(r["sample"]), r["method"], r["ratio"])
            if k not in theirs:
                continue
            total += 1
            t = theirs[k]
            equal = r["answer"].strip() == t["answer"].strip()
            same += equal
            if not equal:
                lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3] or '-'} | {r['answer'].strip()!r} | "
                             f"{t['answer'].strip()!r} |")
        out += ["", f"### kvpress 0.5.5 on the same prompts: {same} of {total} answers identical to kvjax's", ""]
        acc_t = defaultdict(list)
        for (length, _, m, ratio), t in theirs.items():
            acc_t[m, ratio or "-", length].append(int(t["correct"]))
        out += ["| method | ratio | " + " | ".join(f"kvpress {n_}" for n_ in lengths) + " |",
                "|---|---|" + "---|" * len(lengths)]
        for m, ratio in dict.fromkeys((m, ratio) for m, ratio, _ in acc_t):
            out.append(f"| {m} | {ratio} | " + " | ".join(
                f"{100 * sum(acc_t[m, ratio, n_]) / len(acc_t[m, ratio, n_]):.0f}" if acc_t[m, ratio, n_] else ""
                for n_ in lengths) + " |")
        if lines:
            out += ["", "| length | sample | method | ratio | kvjax | kvpress |", "|---|---|---|---|---|---|"] + lines
    print("\n".join(out))


if __name__ == "__main__":
    main()
