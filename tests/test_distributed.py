"""Several processes as one run (`kvjax.distributed`): `kvjax eval` split over 2 real processes (4 CPU
devices each, gloo, 127.0.0.1) writes the same rows as one process, each once, and resumes; bad
settings are one-line errors before anything connects."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_checkpoints import GGUF_HF, random_hf_weights, write_gguf

from kvjax import distributed
from kvjax.cli import main
from kvjax.eval import records

KVJAX = Path(sys.executable).parent / "kvjax"
TEXT = ("Alpha beta gamma delta. Epsilon zeta eta theta iota! Kappa lambda mu? Nu xi omicron pi rho sigma. "
        "Tau upsilon phi chi psi omega. ") * 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny GGUF, text file, environment with a cache of its own)."""
    root = tmp_path_factory.mktemp("dist")
    gguf = root / "tiny.gguf"
    write_gguf(gguf, GGUF_HF, random_hf_weights(GGUF_HF, seed=0))
    (root / "text.txt").write_text(TEXT)
    env = {**os.environ, "KVJAX_CACHE": str(root / "cache"), "KVJAX_COMPILE_CACHE": "0", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    return gguf, root / "text.txt", env


def eval_argv(gguf: Path, text: Path, out: Path) -> list[str]:
    return ["eval", "ppl", "--model", str(gguf), "--method", "full", "streaming_llm", "--ratio", "0.5",
            "--text", str(text), "--context-len", "32", "--eval-len", "8", "--n", "5", "--batch", "2",
            "--no-plots", "--out", str(out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(argv: list[str], env: dict, n: int) -> list[subprocess.CompletedProcess]:
    """`kvjax ARGV` as processes 0 .. n-1 of one run, started together."""
    port = free_port()
    procs = [subprocess.Popen([str(KVJAX), *argv, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                               "--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(n)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def results(path: Path) -> list[tuple]:
    """Each row's key and results, in key order (timings aside)."""
    return sorted((records.row_key(r), r["nll"], r["ppl"], r["kept_fraction"], r["cache_bytes"])
                  for r in records.read_rows(path))


def test_eval_over_two_processes_writes_every_row_once_and_resumes(setup, tmp_path):
    gguf, text, env = setup
    single = subprocess.run([str(KVJAX), *eval_argv(gguf, text, tmp_path / "one.csv")], env=env,
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    want = results(tmp_path / "one.csv")
    assert len(want) == 10  # 5 chunks x 2 configurations

    out = tmp_path / "two.csv"
    runs = run_processes(eval_argv(gguf, text, out), env, 2)
    assert all(r.returncode == 0 for r in runs), [r.stderr[-3000:] for r in runs]
    assert results(out) == want  # the same numbers, each row once
    # process 0 computed chunks 0, 2, 4 and wrote them as it went; process 1's 1, 3 arrived at the end
    assert [int(r["sample"]) for r in records.read_rows(out)] == [0, 2, 0, 2, 4, 4, 1, 3, 1, 3]  # batches of 2
    assert "| method" in runs[0].stdout and "| method" not in runs[1].stdout  # process 0 alone summarizes
    assert (tmp_path / "two.md").is_file()

    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]))  # a run stopped after 3 rows
    runs = run_processes(eval_argv(gguf, text, out) + ["--resume"], env, 2)
    assert all(r.returncode == 0 for r in runs), [r.stderr[-3000:] for r in runs]
    assert results(out) == want


def test_bad_settings_are_one_line_errors(setup, tmp_path, capsys):
    gguf, text, _ = setup
    argv = eval_argv(gguf, text, tmp_path / "x.csv")
    cases = [(["--num-processes", "2", "--process-id", "2", "--coordinator", "127.0.0.1:1234"],
              "--process-id must be in [0, 1] for 2 processes, got 2"),
             (["--num-processes", "2", "--coordinator", "127.0.0.1:1234"], "missing --process-id"),
             (["--num-processes", "2", "--process-id", "1", "--coordinator", "nohost"], "must be HOST:PORT"),
             (["--cluster", "--process-id", "1"], "--cluster lets JAX find the hosts"),
             (["--num-processes", "2", "--process-id", "1", "--coordinator", f"127.0.0.1:{free_port()}",
               "--coordinator-timeout", "1"], "cannot reach the coordinator 127.0.0.1:")]
    for extra, message in cases:
        t0 = time.monotonic()
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvjax: error: ") and err.count("\n") == 1 and message in err, err
        assert time.monotonic() - t0 < 30  # no hang
    assert not (tmp_path / "x.csv").exists()


def test_shares_are_disjoint_and_cover_everything():
    items = list(range(11))
    parts = [distributed.Processes(i, 3).share(items) for i in range(3)]
    assert sorted(sum(parts, [])) == items and parts[0] == [0, 3, 6, 9]
    assert distributed.Processes().share(items) == items


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_over_two_processes_equals_one_process_and_resumes(setup, tmp_path):
    """Data-parallel Locret training on 8 devices: one process, or 2 processes x 4 devices (stopped
    after 2 steps, then resumed to 4): the same losses, the same checkpoint."""
    gguf, text, env = setup
    argv = ["train", "locret", "--model", str(gguf), "--data", str(text), "--batch-size", "8", "--seq-len", "16",
            "--hidden", "8", "--warmup", "1", "--save-every", "2", "--log-every", "1"]
    one = subprocess.run([str(KVJAX), *argv, "--steps", "4", "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=900, env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert one.returncode == 0, one.stderr[-3000:]
    for steps, extra in (("2", []), ("4", ["--resume"])):
        runs = run_processes(argv + ["--steps", steps, "--out", str(tmp_path / "two"), *extra], env, 2)
        assert all(r.returncode == 0 for r in runs), [r.stderr[-3000:] for r in runs]
        assert "8 device(s) in 2 process(es)" in runs[0].stdout  # process 0 alone reports and logs
        assert "kvjax train" not in runs[1].stdout and "locret:" not in runs[1].stdout
    want, got = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(want, got):  # the loss of steps 3 and 4 depends on the updates of the steps before
        for k in ("loss", "grad_norm", "fit", "smooth"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=f"step {a['step']} {k}")
