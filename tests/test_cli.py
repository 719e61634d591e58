"""The `kvjax` command line: generate and info on the real default model, and its error handling."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest

import kvjax
from kvjax.cli import main

LONG_PROMPT = Path(__file__).resolve().parents[1] / "examples" / "long_prompt.txt"
STATS = re.compile(r"\[compile ([\d.]+) s, not in the times below \| prompt (\d+) tokens: prefill ([\d.]+) s, "
                   r"([\d.]+) tok/s \| new (\d+) tokens: decode ([\d.]+) s, ([\d.]+) tok/s "
                   r"\| KV cache ([\d,]+) bytes\]")


def test_generate_chat_streams_answer_and_stats(smollm2, capsys):
    rc = main(["generate", "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Paris" in out
    stats = STATS.search(out)
    assert stats, out
    assert int(stats.group(2)) == 37 and 1 <= int(stats.group(5)) <= 12
    prefill_s, tok_s = float(stats.group(3)), float(stats.group(4))
    assert prefill_s > 0 and abs(37 / prefill_s - tok_s) <= 0.01 * tok_s + 0.1
    # the cache holds a bucket of slots (64 for 37 + 12 tokens) at 46,080 bytes per token plus positions
    kv_bytes = int(stats.group(8).replace(",", ""))
    assert kv_bytes == 64 * (46_080 + 30 * 3 * 4) + 30 * 4 + 4


def test_info_prints_config_and_kv_bytes(smollm2, capsys):
    assert main(["info", "--model", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "n_layers: 30" in out and "n_kv_heads: 3" in out
    assert "KV bytes per token (full cache, all layers): 46,080" in out


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "no-such-model", "--prompt", "hi"], "unknown model 'no-such-model'"),
    (["generate", "--prompt", ""], "empty prompt"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "-1"], "max_new_tokens must be an integer >= 0"),
    (["generate", "--prompt", "hi", "--temperature", "-0.5"], "temperature must be >= 0"),
    (["generate", "--prompt", "hi", "--system", "be brief"], "--system needs --chat"),
    (["generate", "--prompt", " \n\t "], "empty prompt: the prompt is empty or only whitespace"),
    # a non-UTF-8 argument reaches Python as lone surrogates (os.fsdecode)
    (["generate", "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")], "text is not valid UTF-8"),
    (["generate", "--prompt", "What is the capital of France?", "--method", "snapkv", "--ratio", "0.5"],
     "snapkv always keeps 64 tokens (window/sinks) but the budget keeps only 3 of 7 in some layer: the prompt "
     "must have at least 128 tokens for ratio 0.5 (it has 7)"),
    (["generate", "--prompt-file", "no/such/file.txt"], "--prompt-file: no such file no/such/file.txt"),
    (["generate", "--prompt", "hi", "--method", "knorm", "--budget", "8", "--chunked-compression", "0"],
     "chunked compression: the chunk size must be a positive integer, got 0"),
    (["generate", "--prompt", "hi", "--method", "snapkv", "--compression-interval", "512", "--target-size", "32"],
     "decode-time compression keeps 32 tokens but snapkv always keeps 64 (window/sinks): give target_size >= 64"),
    (["generate", "--prompt", "hi", "--layout", "paged", "--page-size", "24"],
     "page size 24 does not tile the kernel's block"),
])
def test_bad_input_is_one_line_and_exit_2(smollm2, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvjax: error: ") and message in err and err.count("\n") == 1


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in kvjax.methods.registry():
        assert f"  {name} " in out
    for name in kvjax.quantizers.registry():  # quantizers too, in their own section
        assert f"  {name} " in out[out.index("\nquantizers ("):]
    assert "adakv" in out and "window=64, kernel=5" in out and "compose(" in out


def test_inspect_writes_kept_positions(smollm2, tmp_path, capsys):
    ids = np.asarray(smollm2.encode("The grass is green. The sky is blue. " * 12), np.int32)
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "kept.npz"
    assert main(["inspect", "--input-ids", str(tmp_path / "ids.npy"), "--method", "snapkv", "--budget", "80",
                 "--out", str(out)]) == 0
    kept = np.load(out)
    expected = kvjax.kept_positions(smollm2.prefill(ids, method="snapkv", budget=80))
    assert sorted(kept) == sorted(f"layer{i}" for i in range(30))
    for i, layer in enumerate(expected):
        np.testing.assert_array_equal(kept[f"layer{i}"], layer[0])
    assert main(["inspect", "--input-ids", str(tmp_path / "missing.npy"), "--method", "snapkv", "--ratio", "0.5",
                 "--out", str(out)]) == 2


def test_generate_with_compression_flags(smollm2, capsys):
    # --method with --ratio: test_readme_snapkv_example_with_a_prompt_file_and_stdin
    prompt = "Remember: the secret word is apple. " * 20 + "What is the secret word?"
    assert main(["generate", "--prompt", prompt, "--method", "streaming_llm", "--capacity", "64",
                 "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("KV cache") == 1
    assert main(["generate", "--prompt", prompt, "--method", "snapkv", "--capacity", "64"]) == 2
    assert "no decode-time eviction rule" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"caf\xe9 au lait", "is not UTF-8 text (byte 0xe9 at offset 3)"),
    (b"\x89PNG\r\n\x1a\n\0\0", "holds NUL bytes: not a text file"),
    (b"  \n\n", "empty prompt"),
])
def test_prompt_file_faults(tmp_path, capsys, content, message):
    (tmp_path / "prompt.txt").write_bytes(content)
    assert main(["generate", "--prompt-file", str(tmp_path / "prompt.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvjax: error: ") and message in err and err.count("\n") == 1, err


def test_readme_snapkv_example_with_a_prompt_file_and_stdin(smollm2, capsys, monkeypatch):
    """The README's compressed generation: the example file is long enough for SnapKV's 64-token window."""
    n_tokens = len(smollm2.encode(LONG_PROMPT.read_text()))
    assert 300 <= n_tokens <= 1024
    assert main(["generate", "--prompt-file", str(LONG_PROMPT), "--method", "snapkv", "--ratio", "0.5",
                 "--max-new-tokens", "8"]) == 0
    from_file = capsys.readouterr().out
    stats = STATS.search(from_file)
    assert stats and int(stats.group(2)) == n_tokens
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(LONG_PROMPT.read_bytes())))
    assert main(["generate", "--prompt-file", "-", "--method", "snapkv", "--ratio", "0.5",
                 "--max-new-tokens", "8"]) == 0
    from_stdin = capsys.readouterr().out
    assert from_stdin.split("[compile")[0] == from_file.split("[compile")[0]  # the same text


def test_inspect_of_a_file_that_is_not_npy(tmp_path, capsys):
    (tmp_path / "ids.npy").write_text("1 2 3 4\n")
    assert main(["inspect", "--input-ids", str(tmp_path / "ids.npy"), "--method", "snapkv", "--ratio", "0.5",
                 "--out", str(tmp_path / "kept.npz")]) == 2
    err = capsys.readouterr().err
    assert err == (f"kvjax: error: --input-ids {tmp_path / 'ids.npy'} is not a .npy file (no NumPy header); "
                   "write the ids with numpy.save(path, ids)\n")
    np.save(tmp_path / "ids.npy", np.array([0.5, 1.5]))
    assert main(["inspect", "--input-ids", str(tmp_path / "ids.npy"), "--method", "snapkv", "--ratio", "0.5",
                 "--out", str(tmp_path / "kept.npz")]) == 2
    assert "must hold integer token ids, got float64" in capsys.readouterr().err


def test_inspect_from_a_prompt_file(smollm2, tmp_path, capsys):
    assert main(["inspect", "--prompt-file", str(LONG_PROMPT), "--method", "snapkv", "--ratio", "0.5",
                 "--out", str(tmp_path / "kept.npz")]) == 0
    ids = smollm2.encode(LONG_PROMPT.read_text())
    assert f"for {len(ids)} tokens" in capsys.readouterr().out
    kept = np.load(tmp_path / "kept.npz")
    for i, layer in enumerate(kvjax.kept_positions(smollm2.prefill(ids, method="snapkv", ratio=0.5))):
        np.testing.assert_array_equal(kept[f"layer{i}"], layer[0])
