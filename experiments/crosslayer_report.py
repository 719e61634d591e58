"""Tables and a plot of experiments/crosslayer.sh's CSVs: perplexity and passkey against the cache bytes each
configuration really holds (the rows' `cache_bytes`), the KVSharer plans found and the healing curve.

    python experiments/crosslayer_report.py experiments/results/crosslayer
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import cpu_line  # noqa: E402


def rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.is_file() else []


def label(r: dict, healed: str) -> str:
    name = r["method"].replace("kvsharer(plan=experiments/results/crosslayer/", "kvsharer(").replace(".json", "")
    extra = (f" ratio {r['ratio']}" if r["ratio"] else "") + (f" +{r['quant']}" if r["quant"] else "")
    return (f"{healed} " if healed else "") + name + extra


def healed_rows(out: Path, task: str) -> list[tuple[dict, str]]:
    """Rows of the healed models' runs, tagged by file: cla_kvsharer_{task}_healed{STEPS}.csv ("healed" = 40 steps)."""
    tagged = []
    for path in sorted(out.glob(f"cla_kvsharer_{task}_healed*.csv")):
        steps = path.stem.rsplit("healed", 1)[1] or "40"
        tagged += [(r, f"healed {steps} steps:") for r in rows(path)]
    return tagged


def grouped(table: list[tuple[dict, str]], value: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r, healed in table:
        g = out.setdefault(label(r, healed), dict(values=[], bytes=int(r["cache_bytes"]),
                                                  full=int(r["full_cache_bytes"])))
        g["values"].append(float(r[value]))
    return out


def ppl_table(groups: dict) -> list[str]:
    lines = ["| configuration | cache bytes | of full | ppl (mean of chunk NLLs) | chunk ppl min .. max |",
             "|---|---:|---:|---:|---:|"]
    for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["bytes"]):
        nll = sum(math.log(v) for v in g["values"]) / len(g["values"])
        lines.append(f"| {name} | {g['bytes']:,} | {g['bytes'] / g['full']:.3f} | {math.exp(nll):.2f} | "
                     f"{min(g['values']):.2f} .. {max(g['values']):.2f} |")
    return lines


def main(out: Path) -> None:
    md = ["# Cross-layer sharing on SmolLM2-135M (issue 19)", "",
          "Made by `bash experiments/crosslayer.sh` (see its header for the settings); bytes are the "
          "`cache_bytes` of each row: what the compressed cache holds after the prefill (exact `nbytes`).", "",
          cpu_line(), ""]
    ppl = [(r, "") for r in rows(out / "cla_kvsharer_ppl.csv") + rows(out / "minicache_xkv_ppl.csv")] + \
        healed_rows(out, "ppl")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if ppl:
        groups = grouped(ppl, "ppl")
        md += ["## Perplexity (WikiText-2 test, 2 chunks: 512 context tokens, 64 teacher-forced)", "",
               *ppl_table(groups), ""]
        for name, g in groups.items():
            nll = sum(math.log(v) for v in g["values"]) / len(g["values"])
            axes[0].scatter(g["bytes"] / 2 ** 20, math.exp(nll))
            axes[0].annotate(name, (g["bytes"] / 2 ** 20, math.exp(nll)), fontsize=6)
        axes[0].set(xlabel="cache MiB (512-token context)", ylabel="perplexity (log)", yscale="log",
                    title="perplexity vs real cache bytes")
    passkey = [(r, "") for r in rows(out / "cla_kvsharer_passkey.csv") + rows(out / "minicache_xkv_passkey.csv")] + \
        healed_rows(out, "passkey")
    if passkey:
        groups = grouped(passkey, "correct")
        md += ["## Passkey (512 tokens, 4 samples)", "", "| configuration | cache bytes | of full | correct |",
               "|---|---:|---:|---:|"]
        for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["bytes"]):
            md.append(f"| {name} | {g['bytes']:,} | {g['bytes'] / g['full']:.3f} | "
                      f"{int(sum(g['values']))}/{len(g['values'])} |")
            axes[1].scatter(g["bytes"] / 2 ** 20, sum(g["values"]) / len(g["values"]))
            axes[1].annotate(name, (g["bytes"] / 2 ** 20, sum(g["values"]) / len(g["values"])), fontsize=6)
        axes[1].set(xlabel="cache MiB (512-token context)", ylabel="accuracy", title="passkey vs real cache bytes")
        md.append("")
    fig.tight_layout()
    fig.savefig(out / "cla_kvsharer.png", dpi=130)
    plans = sorted(out.glob("kvsharer_*.json"))
    if plans:
        md += ["## KVSharer plans (calibration: 30 x 64 tokens of generated prose)", "",
               "| plan | order | threshold | layers reading another (reader -> layer read) | pairs tried |",
               "|---|---|---:|---|---:|"]
        for p in plans:
            plan = json.loads(p.read_text())
            shared = ", ".join(f"{i}->{r}" for i, r in enumerate(plan["route"]) if r != i) or "none"
            md.append(f"| {p.name} | {plan['order']} | {plan['threshold']} | {shared} | {len(plan['tried'])} |")
        md.append("")
    retained = out / "minicache_retained.md"  # experiments/minicache_retained.py
    if retained.is_file():
        md += ["## MiniCache" + retained.read_text().split("\n", 1)[0].split("MiniCache", 1)[1],
               retained.read_text().split("\n", 1)[1]]
    metrics = out / "cla_train_metrics.jsonl"
    if metrics.is_file():
        recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        md += ["## Healing `cla` (consumers' q/o, KL to the unconverted model)", "",
               "| step | KL | student CE |", "|---:|---:|---:|"]
        md += [f"| {r['step']} | {r['kl']:.4f} | {r['ce']:.3f} |" for r in recs if r["step"] % 10 == 0]
        md.append("")
    times = out / "cla_kvsharer_times.txt"
    if times.is_file():
        md += ["## Wall times (2-core CPU shared with other jobs)", "", "```", times.read_text().strip(), "```", ""]
    (out / "cla_kvsharer.md").write_text("\n".join(md))
    print(f"wrote {out / 'cla_kvsharer.md'} and {out / 'cla_kvsharer.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/crosslayer"))
