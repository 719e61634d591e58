"""`kvjax eval leaderboard` on a tiny random model: the grid runs into per-task CSVs, the table ranks
configurations by score within bands of real bytes with the Pareto front starred and a command per row,
and the plots are drawn; the Pareto rule on a hand-made case."""
from __future__ import annotations

import pytest

from kvjax import cli
from kvjax.eval import leaderboard
from kvjax.eval.leaderboard import Point, pareto
from kvjax.eval.records import read_rows
from test_checkpoints import LLAMA, random_hf_weights, write_hf_dir

TINY = {**LLAMA, "rope_scaling": None, "max_position_embeddings": 512}


def _pt(name, size, score):
    return Point("eviction", name, "", "", size, size / 100, score, 1, "")


def test_pareto_front_by_hand():
    a, b, c, d = _pt("a", 10, 50), _pt("b", 20, 40), _pt("c", 30, 80), _pt("d", 30, 90)
    assert pareto([a, b, c, d], lower_better=False) == {a, d}  # b: fewer bytes exist with a better score
    assert pareto([a, b, c, d], lower_better=True) == {a, b}  # perplexity: lower is better


def test_leaderboard_runs_the_grid_and_ranks_by_real_bytes(tmp_path, capsys):
    model = str(write_hf_dir(tmp_path / "tiny", TINY, random_hf_weights(TINY, seed=5)))
    out = tmp_path / "board"
    argv = ["eval", "leaderboard", "--models", model, "--tasks", "niah", "ppl", "--lengths", "320", "--depths", "0.5",
            "--n", "1", "--method", "knorm", "compose(knorm, int8)", "--ratio", "0.5", "--quant", "int8",
            "--out-dir", str(out), "--context-len", "128", "--eval-len", "16", "--batch", "1"]
    assert cli.main(argv) == 0
    rows = read_rows(out / "tiny" / "niah.csv")
    assert {(r["method"], r["ratio"], r["quant"]) for r in rows} == {
        ("knorm", "0.5", ""), ("compose(knorm, int8)", "0.5", ""), ("full", "", ""), ("full", "", "int8")}
    table = (out / "leaderboard.md").read_text()
    for task in ("niah", "ppl"):
        assert f"## tiny: {task}" in table and (out / f"pareto_tiny_{task}.png").stat().st_size > 10_000
    knorm = [r for r in rows if r["method"] == "knorm"][0]
    frac = float(knorm["cache_bytes"]) / float(knorm["full_cache_bytes"])
    assert frac < 0.6 and f"| {frac:.3f} |" in table  # the real bytes, not the nominal ratio
    line = [x for x in table.splitlines() if "| knorm | 0.5 |" in x and "niah" in x][0]
    assert "--method 'knorm' --ratio 0.5" in line and "--n 1 --lengths 320 --depths 0.5" in line
    assert table.count("★") >= 2  # the cheapest configuration of each task is always on the front
    # the tables and plots again from the CSVs alone
    (out / "leaderboard.md").unlink()
    assert cli.main(["eval", "leaderboard", "--report-only", "--out-dir", str(out)]) == 0
    assert (out / "leaderboard.md").read_text() == table


def test_leaderboard_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no results under"):
        leaderboard.write_report(tmp_path)
    assert cli.main(["eval", "leaderboard", "--tasks", "bench", "--report-only", "--out-dir", str(tmp_path)]) != 0
