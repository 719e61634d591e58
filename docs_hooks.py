"""mkdocs hook: the method pages (docs/methods/*.md) written at build time from kvjax's registry, so they
list exactly what `kvjax methods` lists, each with its reference (the module docstring names the paper
and the kvpress class) and its parameters with their defaults."""
from __future__ import annotations

import dataclasses
import inspect
import sys

from mkdocs.structure.files import File

import kvjax  # noqa: F401 (registers every built-in method)
from kvjax import methods
from kvjax.methods.base import WRAPPERS

PAGES = {
    "methods/eviction.md": ("Eviction: score methods", "score",
                            "A score method scores every slot of a finished prefill; each layer keeps its top "
                            "tokens per KV head (kvpress's `ScorerPress` semantics). `method=NAME` with "
                            "`ratio=` (fraction removed) or `budget=` (tokens kept)."),
    "methods/prefill.md": ("Learned and structural: prefill methods", "prefill",
                           "A prefill method builds its own states before the prefill and finishes them after "
                           "it (trained compressors, latent and cross-layer states)."),
    "methods/quantizers.md": ("Quantizers", "quantizer",
                              "A quantizer says how the kept K and V are stored; every state layout stores it "
                              "(`QuantStore`). `quant=NAME-BITS`, or `compose(METHOD, NAME-BITS)`."),
}


def _fields(cls) -> str:
    if not dataclasses.is_dataclass(cls):
        return ""
    rows = [f"| `{f.name}` | `{f.default!r}` |" for f in dataclasses.fields(cls)
            if f.init and f.default is not dataclasses.MISSING]
    return "\n".join(["| parameter | default |", "|---|---|", *rows]) if rows else "No parameters."


def _entry(name: str, cls) -> str:
    module = sys.modules[cls.__module__]
    doc = inspect.cleandoc(module.__doc__ or "") if module.__name__ != "kvjax.quantizers" else ""
    return "\n\n".join(part for part in (f"## `{name}`", f"`{cls.__module__}.{cls.__qualname__}`",
                                          _fields(cls), doc) if part)


def _page(title: str, intro: str, entries: dict) -> str:
    body = [f"# {title}", intro, f"{len(entries)} registered:"]
    body += [_entry(name, cls) for name, cls in sorted(entries.items())]
    return "\n\n".join(body) + "\n"


def on_files(files, config):
    for path, (title, kind, intro) in PAGES.items():
        entries = methods.registry(kind)
        if kind == "quantizer":
            intro += "\n\n" + inspect.cleandoc(sys.modules["kvjax.quantizers"].__doc__)
        files.append(File.generated(config, path, content=_page(title, intro, entries)))
    wrappers = _page("Wrappers", "A wrapper changes how another method's scores become a kept set: "
                     "`WRAPPER:METHOD`, e.g. `adakv:snapkv`; parameters in brackets, `WRAPPER(k=v):METHOD`.",
                     dict(WRAPPERS))
    files.append(File.generated(config, "methods/wrappers.md", content=wrappers))
    return files
