"""Ctrl-C (SIGINT) at several points of the `kvjax` program: exit status 130, one line naming what to do,
no traceback, no crash. Each run is a subprocess of the installed `kvjax` command; the tiny GGUF model
(written here) keeps them short, the real model is used only where decoding must take a while."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_checkpoints import GGUF_HF, random_hf_weights, write_gguf

from kvjax import interrupt

KVJAX = str(Path(sys.executable).parent / "kvjax")
LONG_PROMPT = str(Path(__file__).resolve().parents[1] / "examples" / "long_prompt.txt")
INTERRUPTED = "kvjax: interrupted"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    """(tiny GGUF, environment): its own cache, converted once; compiles are not cached, so they happen."""
    root = tmp_path_factory.mktemp("interrupt")
    hf = {**GGUF_HF, "num_hidden_layers": 4, "max_position_embeddings": 2048}
    write_gguf(root / "tiny.gguf", hf, random_hf_weights(hf, seed=0))
    env = {**os.environ, "KVJAX_CACHE": str(root / "cache"), "KVJAX_COMPILE_CACHE": "0"}
    subprocess.run([KVJAX, "info", "--model", str(root / "tiny.gguf")], env=env, check=True, capture_output=True)
    return root / "tiny.gguf", env


def interrupt_when(argv: list[str], marker: str, env: dict, where: str = "stderr", timeout: float = 600):
    """Run `argv`, send SIGINT once `marker` appears on `where`; (exit status, stdout, stderr, seconds
    from the signal to the exit)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    got = {"stdout": bytearray(), "stderr": bytearray()}

    def drain(name):
        while chunk := os.read(getattr(proc, name).fileno(), 4096):
            got[name] += chunk

    readers = [threading.Thread(target=drain, args=(name,), daemon=True) for name in got]
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout
    while marker.encode() not in got[where]:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{marker!r} never appeared; stdout {bytes(got['stdout'][-500:])!r}, "
                        f"stderr {bytes(got['stderr'][-2000:])!r}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    status = proc.wait(timeout=120)
    took = time.monotonic() - sent
    for r in readers:
        r.join()
    return status, got["stdout"].decode(), got["stderr"].decode(), took


def check_interrupted(status: int, err: str, took: float, message: str = INTERRUPTED) -> None:
    assert status == interrupt.EXIT_STATUS, (status, err[-2000:])  # not -11 (segfault) nor -2 (killed by SIGINT)
    assert err.rstrip("\n").splitlines()[-1] == message, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert took < interrupt.GRACE_SECONDS + 10, took


@pytest.mark.parametrize("command", ["generate", "inspect", "info", "eval", "train"])
def test_during_start_up_imports(tiny, command, tmp_path):
    model, env = tiny
    argv = {"generate": ["generate", "--prompt", "hello"],
            "inspect": ["inspect", "--input-ids", "ids.npy", "--method", "snapkv", "--ratio", "0.5", "--out", "k.npz"],
            "info": ["info"], "eval": ["eval", "passkey", "--lengths", "512"],
            "train": ["train", "locret", "--data", LONG_PROMPT, "--steps", "5", "--out", str(tmp_path / "run")],
            }[command]
    # -X importtime writes a line as each module is imported: interrupt while JAX is being imported
    status, _, err, took = interrupt_when([KVJAX, *argv, "--model", str(model)], " jax._src.",
                                          {**env, "PYTHONPROFILEIMPORTTIME": "1"})
    check_interrupted(status, err, took)


@pytest.mark.parametrize("command", ["generate", "inspect"])
def test_during_a_compile(tiny, command, tmp_path):
    model, env = tiny
    if command == "generate":
        argv = ["generate", "--prompt", "hello world", "--max-new-tokens", "8"]
    else:
        np.save(tmp_path / "ids.npy", np.arange(100, 400, dtype=np.int32) % 200)
        argv = ["inspect", "--input-ids", str(tmp_path / "ids.npy"), "--method", "snapkv", "--ratio", "0.5",
                "--out", str(tmp_path / "kept.npz")]
    status, _, err, took = interrupt_when([KVJAX, *argv, "--model", str(model)], "kvjax: compiling", env)
    check_interrupted(status, err, took)
    assert "kvjax: compiling" in err.splitlines()[-2]  # the status line was ended before the message


def test_during_decoding(smollm2_gguf_path):
    """The real model decodes ~10 tokens/s on a CPU: interrupt once the first words are out."""
    env = {k: v for k, v in os.environ.items() if k != "KVJAX_COMPILE_CACHE"}
    argv = [KVJAX, "generate", "--model", str(smollm2_gguf_path), "--chat", "--max-new-tokens", "400",
            "--prompt", "Write a long story about a lighthouse keeper and a storm."]
    status, out, err, took = interrupt_when(argv, " ", env, where="stdout")
    check_interrupted(status, err, took)
    assert "[compile" not in out  # it stopped before the end


def test_eval_says_how_to_resume(tiny, tmp_path):
    model, env = tiny
    out = tmp_path / "passkey.csv"
    argv = [KVJAX, "eval", "passkey", "--model", str(model), "--lengths", "512", "--n", "40", "--batch", "1",
            "--no-plots", "--out", str(out)]
    status, _, err, took = interrupt_when(argv, "eval passkey", env)
    check_interrupted(status, err, took, f"{INTERRUPTED}; rows so far are in {out}: rerun the same command "
                                         "with --resume to continue")
    status, _, err, took = interrupt_when(argv + ["--resume"], "eval passkey", env)
    check_interrupted(status, err, took, f"{INTERRUPTED}; rows so far are in {out}: rerun the same command to continue")


def test_train_says_how_to_resume(tiny, tmp_path):
    model, env = tiny
    run = tmp_path / "run"
    argv = [KVJAX, "train", "locret", "--model", str(model), "--data", LONG_PROMPT, "--steps", "100000",
            "--seq-len", "64", "--batch-size", "2", "--out", str(run)]
    status, _, err, took = interrupt_when(argv, "kvjax train locret:", env, where="stdout")
    check_interrupted(status, err, took, f"{INTERRUPTED}; checkpoints so far are in {run}: rerun the same "
                                         "command with --resume to continue")


WATCHDOG = """
import sys, time
from kvjax import interrupt
interrupt.install()
with interrupt.running("kvjax: interrupted; slow clean-up"):
    try:
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        time.sleep(60)  # a clean-up that does not end (as the main thread inside XLA does not return)
"""


@pytest.mark.parametrize("second_ctrl_c", [False, True])
def test_watchdog_ends_a_process_stuck_after_ctrl_c(second_ctrl_c):
    proc = subprocess.Popen([sys.executable, "-c", WATCHDOG], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    if second_ctrl_c:
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
    status = proc.wait(timeout=60)
    took = time.monotonic() - sent
    assert status == interrupt.EXIT_STATUS and proc.stderr.read() == "kvjax: interrupted; slow clean-up\n"
    if second_ctrl_c:
        assert took < interrupt.GRACE_SECONDS
    else:
        assert interrupt.GRACE_SECONDS <= took < interrupt.GRACE_SECONDS + 10
