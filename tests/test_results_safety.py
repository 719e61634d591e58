"""Runs that must never lose or mix results (issue 15): `kvjax train --resume` with other settings,
two `kvjax eval` on one CSV, a writer killed in the middle of a row, files that are not results."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import kvjax
from kvjax.cli import main
from kvjax.eval import records
from kvjax.testing import tiny_lm
from kvjax.train import TrainConfig, load_tokens, token_batches, train
from kvjax.train.locret import LocretTask

WORDS = "the king and queen of hello world walk over a bridge to meet their old friend".split()


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("kvjax: error: ") and err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------------------------------ train
@pytest.fixture(scope="module")
def locret_run(tmp_path_factory):
    """(CLI args of a 2-step Locret run of the tiny model, its folder)."""
    tmp = tmp_path_factory.mktemp("train")
    corpus = tmp / "corpus.txt"
    corpus.write_text(" ".join(np.random.default_rng(0).choice(WORDS, 2000)) + "\n")
    args = ["train", "locret", "--model", "tiny", "--data", str(corpus), "--out", str(tmp / "run"),
            "--batch-size", "2", "--seq-len", "16", "--hidden", "8", "--save-every", "1", "--log-every", "1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kvjax, "load", lambda name, dtype=None: tiny_lm(0))
        assert main([*args, "--steps", "2"]) == 0
    return args, tmp / "run"


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(kvjax, "load", lambda name, dtype=None: tiny_lm(0))


def set_flag(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[:i + 1], value, *args[i + 2:]]


@pytest.mark.parametrize("flag, value, named", [
    ("--hidden", "16", "hidden 8 → 16"),
    ("--seq-len", "32", "seq_len 16 → 32"),
    ("--batch-size", "4", "batch_size 2 → 4"),
])
def test_train_resume_with_other_settings_refuses_before_touching_anything(locret_run, tiny, capsys, flag, value,
                                                                           named):
    args, run = locret_run
    before = snapshot(run)
    assert main([*set_flag(args, flag, value), "--steps", "3", "--resume"]) == 2
    err = one_line_error(capsys)
    assert "was trained with other settings (" + named in err and "settings.json" in err
    assert snapshot(run) == before  # checkpoints, metrics.jsonl, settings.json: byte for byte


def test_train_resume_names_every_differing_setting(locret_run, tiny, capsys):
    args, run = locret_run
    before = snapshot(run)
    (run.parent / "other.txt").write_text("a different corpus " * 200)
    other = set_flag(set_flag(set_flag(args, "--hidden", "16"), "--seq-len", "32"), "--data",
                     str(run.parent / "other.txt"))
    assert main([*other, "--steps", "3", "--seed", "1", "--resume"]) == 2
    err = one_line_error(capsys)
    for named in ("hidden 8 → 16", "seq_len 16 → 32", "seed 0 → 1", "task.seed 0 → 1", 'data "'):
        assert named in err, err
    assert "data_source" not in err  # the path may change, its tokens may not
    assert snapshot(run) == before


def test_train_resume_may_change_steps_and_bookkeeping(locret_run, tiny, tmp_path):
    args, run = locret_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    args = set_flag(set_flag(args, "--out", str(copy)), "--log-every", "3")
    assert main([*args, "--steps", "3", "--resume", "--keep", "2"]) == 0
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # continued from step 2, the first two records kept
    settings = json.loads((copy / "settings.json").read_text())
    assert settings["steps"] == 3 and settings["log_every"] == 3 and settings["keep"] == 2
    assert sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]


def test_train_resume_of_a_run_without_settings_is_refused(locret_run, tiny, tmp_path, capsys):
    args, run = locret_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "settings.json").unlink()
    before = snapshot(copy)
    assert main([*set_flag(args, "--out", str(copy)), "--steps", "3", "--resume"]) == 2
    assert "holds checkpoints but no settings.json" in one_line_error(capsys)
    (copy / "settings.json").write_text("{not json")
    assert main([*set_flag(args, "--out", str(copy)), "--steps", "3", "--resume"]) == 2
    assert "settings.json is unreadable" in one_line_error(capsys)
    (copy / "settings.json").unlink()
    assert snapshot(copy) == before


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # orbax's leftovers stay quiet
def test_train_resume_on_unreadable_checkpoints(locret_run, tmp_path):
    """One damaged checkpoint: a one-line warning and the older one; all damaged: an error, never a
    fresh start over them; arrays of other shapes than the run's: an error naming them."""
    _, run = locret_run
    lm = tiny_lm(0)
    corpus = locret_run[0][locret_run[0].index("--data") + 1]
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=16, lr=5e-4, save_every=1, log_every=1)
    batches = token_batches(load_tokens(corpus, lm.tokenizer), cfg.seq_len, cfg.batch_size, cfg.seed)
    task = LocretTask(lm.cfg, "tiny", hidden=8)
    settings = json.loads((run / "settings.json").read_text())
    extra = {k: settings[k] for k in ("data", "data_source", "dtype")}
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for f in (copy / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="checkpoint at step 2 is unreadable") as caught:
        result = train(task, lm.params, batches, cfg, copy, resume=True, progress=False, settings=extra)
    assert all("\n" not in str(w.message) and len(str(w.message)) < 300 for w in caught)
    assert [r["step"] for r in result.log] == [2]
    for f in (copy / "checkpoints").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    log = (copy / "metrics.jsonl").read_bytes()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no checkpoint in .* is readable"):
        train(task, lm.params, batches, cfg, copy, resume=True, progress=False, settings=extra)
    assert (copy / "metrics.jsonl").read_bytes() == log

    copy = tmp_path / "other"  # settings.json edited to agree with the run, the checkpoints not
    shutil.copytree(run, copy)
    (copy / "settings.json").write_text(json.dumps({**settings, "hidden": 16}))
    with pytest.raises(ValueError, match=r"checkpoint at step 2 holds params\['fc1'\]\['kernel'\] of shape "
                                         r"\(2, \d+, 8\), this run's is \(2, \d+, 16\)"):
        train(LocretTask(lm.cfg, "tiny", hidden=16), lm.params, batches, cfg, copy, resume=True, progress=False,
              settings=extra)


# ------------------------------------------------------------------------------------------- eval
TEXT = ("Alpha beta gamma delta. Epsilon zeta eta theta iota! Kappa lambda mu? Nu xi omicron pi rho sigma. "
        "Tau upsilon phi chi psi omega. ") * 4

HOLD = textwrap.dedent("""
    import sys, time
    from kvjax.eval import records
    path, half = sys.argv[1], sys.argv[2]
    meta = {k: records.read_rows(path)[0][k] for k in records.META_FIELDS}
    out = records.ResultsFile(path, meta, resume=True)  # holds the lock, as a running eval does
    with open(path, "a", newline="") as f:  # then dies in the middle of writing a row
        f.write(half)
    print("holding", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def ppl_run(tiny, tmp_path, capsys):
    """(argv of a 4-row `kvjax eval ppl` of the tiny model, its CSV, its rows)."""
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "ppl.csv"
    argv = ["eval", "ppl", "--method", "full", "streaming_llm", "--ratio", "0.5", "--text", str(tmp_path / "text.txt"),
            "--context-len", "32", "--eval-len", "8", "--n", "2", "--batch", "2", "--no-plots", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    rows = records.read_rows(out)
    assert len(rows) == 4
    return argv, out, rows


def same_rows(a: list[dict], b: list[dict]) -> bool:
    """Rows equal in key and result (timings differ between runs)."""
    return [(records.row_key(r), r["nll"]) for r in a] == [(records.row_key(r), r["nll"]) for r in b]


def test_eval_killed_writer_blocks_a_second_run_until_it_dies_then_resume_keeps_every_row(ppl_run, capsys):
    argv, out, rows = ppl_run
    data = out.read_bytes()
    last = data.rindex(b"\r\n", 0, len(data) - 2) + 2  # where the last row starts
    out.write_bytes(data[:last])  # as if the run had stopped before the last row ...
    half = data[last:last + (len(data) - last) // 2].decode()  # ... and a second one dies half-way through it
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), half], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert holder.stdout.readline().strip() == "holding", holder.stderr.read()[-3000:]
        before = out.read_bytes()
        assert main(argv + ["--resume"]) == 2  # another run holds the file: refused at once, nothing written
        err = one_line_error(capsys)
        assert f"another kvjax eval is writing '{out}' (pid {holder.pid})" in err
        assert out.read_bytes() == before and before.endswith(half.encode())
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert out.with_name("ppl.csv.lock").exists()  # the dead run's sidecar is left behind, and blocks nothing
    with pytest.warns(UserWarning, match="last row is incomplete"):
        assert len(records.read_rows(out)) == 3
    with pytest.warns(UserWarning, match="last row was incomplete .* dropped it; it is computed again"):
        assert main(argv + ["--resume"]) == 0
    again = records.read_rows(out)
    assert same_rows(again, rows) and again[:3] == rows[:3]  # every complete row kept as it was
    assert not out.with_name("ppl.csv.lock").exists()


def test_eval_refuses_while_a_lock_is_held_and_never_writes_a_row_twice(ppl_run, capsys):
    """Held lock in-process (an flock on the sidecar, as another process would hold it), then rows that
    an older kvjax wrote twice: --resume keeps the first of each key and appends none again."""
    argv, out, rows = ppl_run
    with open(out.with_name("ppl.csv.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242\n")
        lock.flush()
        before = out.read_bytes()
        assert main(argv + ["--resume"]) == 2
        assert "another kvjax eval is writing" in one_line_error(capsys) and out.read_bytes() == before
    data = out.read_bytes()
    header = data.index(b"\r\n") + 2
    out.write_bytes(data + data[header:])  # every row twice
    with pytest.warns(UserWarning, match="held 4 rows repeating another row's configuration: kept the first"):
        assert main(argv + ["--resume"]) == 0
    assert records.read_rows(out) == rows
    meta = {k: rows[0][k] for k in records.META_FIELDS}
    results = records.ResultsFile(out, meta, resume=True)
    results.append([{k: rows[0][k] for k in (*records.KEY_FIELDS, "nll")}])  # already there: not written again
    results.close()
    assert records.read_rows(out) == rows


def test_results_file_cut_at_every_byte_keeps_exactly_the_complete_rows(tmp_path):
    """A writer killed at any byte: read_rows gives the rows written whole (warning about the rest);
    --resume cuts the file back to them and nothing else. Answers hold newlines, quotes, commas and
    multi-byte characters."""
    meta = dict(seed=0, model="tiny", model_hash="abc", dtype="float32", options=json.dumps(dict(task="passkey")),
                kvjax_version="0", jax_version="0", device="cpu")
    rows = [dict(task="passkey", sample=i, method="full", answer=a, score=1.0)
            for i, a in enumerate(["plain", 'two\nlines, "quoted"', "ünïcødé ✓ 日本"])]
    ends = []  # the file's length after the header and after each row
    for k in range(len(rows) + 1):
        results = records.ResultsFile(tmp_path / "r.csv", meta, overwrite=True)
        results.append(rows[:k])
        results.close()
        ends.append(len((tmp_path / "r.csv").read_bytes()))
    data = (tmp_path / "r.csv").read_bytes()
    full = records.read_rows(tmp_path / "r.csv")
    cut_file = tmp_path / "cut.csv"
    for t in range(ends[0], len(data) + 1):
        n = sum(t >= end - 1 for end in ends[1:])  # rows whose bytes are all there (the final \n aside)
        whole = t in (ends[n], ends[n] - 1)  # nothing after them
        cut_file.write_bytes(data[:t])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert records.read_rows(cut_file) == full[:n], t
            records.ResultsFile(cut_file, meta, resume=True).close()
        assert len(caught) == (0 if whole else 2), (t, [str(w.message) for w in caught])
        assert data.startswith(cut_file.read_bytes()) and records.read_rows(cut_file) == full[:n], t


def test_plot_and_read_of_files_that_are_not_results(tmp_path, capsys):
    binary = tmp_path / "image.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main(["plot", str(binary)]) == 2
    assert f"'{binary}' is not a kvjax results CSV: not UTF-8 text" in one_line_error(capsys)
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    assert main(["plot", str(other)]) == 2
    assert f"'{other}' is not a kvjax results CSV (no column task" in one_line_error(capsys)
    assert main(["plot", str(tmp_path / "missing.csv")]) == 2
    assert "no results file" in one_line_error(capsys)
