"""The `kvjax` command line: generate and info on the real default model, and its error handling."""
from __future__ import annotations

import re

import pytest

from kvjax.cli import main


def test_generate_chat_streams_answer_and_stats(smollm2, capsys):
    rc = main(["generate", "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Paris" in out
    stats = re.search(r"\[prompt (\d+) tokens \| new (\d+) tokens \| prefill ([\d.]+) tok/s \| decode ([\d.]+) "
                      r"tok/s \| compile ([\d.]+) s \| KV cache ([\d,]+) bytes\]", out)
    assert stats, out
    assert int(stats.group(1)) == 37 and 1 <= int(stats.group(2)) <= 12
    # the cache holds a bucket of slots (64 for 37 + 12 tokens) at 46,080 bytes per token plus positions
    kv_bytes = int(stats.group(6).replace(",", ""))
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
])
def test_bad_input_is_one_line_and_exit_2(smollm2, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvjax: error: ") and message in err and err.count("\n") == 1


def test_methods_lists_every_registered_method(capsys):
    import kvjax

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in kvjax.methods.registry():
        assert f"  {name} " in out
    for name in kvjax.quantizers.registry():  # quantizers too, in their own section
        assert f"  {name} " in out[out.index("\nquantizers ("):]
    assert "adakv" in out and "window=64, kernel=5" in out and "compose(" in out


def test_inspect_writes_kept_positions(smollm2, tmp_path, capsys):
    import numpy as np

    import kvjax

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
    prompt = "Remember: the secret word is apple. " * 20 + "What is the secret word?"
    assert main(["generate", "--prompt", prompt, "--method", "snapkv", "--ratio", "0.5",
                 "--max-new-tokens", "8"]) == 0
    assert main(["generate", "--prompt", prompt, "--method", "streaming_llm", "--capacity", "64",
                 "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("KV cache") == 2
    assert main(["generate", "--prompt", prompt, "--method", "snapkv", "--capacity", "64"]) == 2
    assert "no decode-time eviction rule" in capsys.readouterr().err
