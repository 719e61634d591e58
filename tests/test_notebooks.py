"""The notebooks in experiments/notebooks run top to bottom (small settings: KVJAX_NOTEBOOK_SMALL=1),
in a fresh kernel, as a Colab user would run them, so they never rot."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "experiments" / "notebooks").glob("*.ipynb"))
# minutes on the real model each, through what tests/test_leaderboard.py and tests/test_train.py already test
SLOW = {"method_comparison", "train_locret"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW else p for p in NOTEBOOKS],
                         ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("KVJAX_NOTEBOOK_SMALL", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert any(o.get("data", {}).get("image/png") for c in nb.cells for o in c.get("outputs", []))  # the plot


def test_there_are_notebooks():
    assert NOTEBOOKS and all(os.path.getsize(p) > 0 for p in NOTEBOOKS)
