"""The documentation site (mkdocs.yml) builds with warnings as errors, and its method pages list every
registered method, wrapper and quantizer (they are written from the registry at build time)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kvjax import methods
from kvjax.methods.base import WRAPPERS

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_strict_and_lists_every_method(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    pages = {kind: (site / "methods" / page / "index.html").read_text()
             for kind, page in (("score", "eviction"), ("prefill", "prefill"), ("quantizer", "quantizers"))}
    for kind, html in pages.items():
        for name, cls in methods.registry(kind).items():
            if cls.__module__.startswith("kvjax."):  # not a plugin another test registered in this process
                assert f"<code>{name}</code>" in html, (kind, name)
    wrappers = (site / "methods" / "wrappers" / "index.html").read_text()
    assert all(f"<code>{name}</code>" in wrappers for name in WRAPPERS)
    assert "kvjax.lm.LM" in (site / "api" / "lm" / "index.html").read_text()  # the API reference rendered
