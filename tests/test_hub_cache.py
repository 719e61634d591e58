"""The converted-model cache (`kvjax.hub`: content keys, atomic writes, damage detection, permissions,
`kvjax cache list|clean`) and the compile cache's folder rules (`kvjax.compile_cache`), on tiny GGUF
files written here. Read-only file systems are real ones (a read-only bind mount in a user namespace,
where `unshare` allows it)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_checkpoints import GGUF_HF, prompt_ids, random_hf_weights, write_gguf

import kvjax
import kvjax.hub
from kvjax import compile_cache
from kvjax.cli import main

IDS = prompt_ids(20, 3, GGUF_HF["vocab_size"])
KVJAX = Path(sys.executable).parent / "kvjax"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVJAX_COMPILE_CACHE", "0")  # these tests are about the model cache
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, GGUF_HF, random_hf_weights(GGUF_HF, seed=0))
    return path


@pytest.fixture(scope="module")
def expected(gguf, tmp_path_factory) -> np.ndarray:
    """The tiny model's logits on IDS, from a conversion in a cache of its own."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("KVJAX_CACHE", str(tmp_path_factory.mktemp("reference")))
        m.setenv("KVJAX_COMPILE_CACHE", "0")
        return kvjax.load(str(gguf)).logits(IDS)


def entries(cache: Path) -> list[Path]:
    """The converted folder's entries, hidden (temporary) ones included; not the hash index."""
    return sorted(p for p in (cache / "converted").iterdir() if p.name != kvjax.hub.INDEX)


def no_conversion(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(kvjax.hub, "open_gguf", fail)


def test_key_is_the_content_so_touch_and_copy_reuse_it(cache, gguf, expected, tmp_path, monkeypatch):
    kvjax.load(str(gguf))
    (entry,) = entries(cache)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert entry.name == digest[:16]
    manifest = json.loads((entry / kvjax.hub.MANIFEST).read_text())
    assert manifest["sha256"] == digest and manifest["params_bytes"] == (entry / kvjax.hub.PARAMS).stat().st_size

    hashed = []
    real_sha256 = kvjax.hub.file_sha256
    monkeypatch.setattr(kvjax.hub, "file_sha256", lambda p: hashed.append(p) or real_sha256(p))
    with monkeypatch.context() as m:
        no_conversion(m)
        kvjax.load(str(gguf))  # same (path, size, mtime): the index answers
        assert hashed == []
        os.utime(gguf, ns=(time.time_ns() + 10**9,) * 2)  # touched: hashed once more, same key
        copy = tmp_path / "copy.gguf"
        shutil.copy(gguf, copy)
        np.testing.assert_allclose(kvjax.load(str(gguf)).logits(IDS), expected, atol=1e-6)
        np.testing.assert_allclose(kvjax.load(str(copy)).logits(IDS), expected, atol=1e-6)
        kvjax.load(str(copy))
    assert len(hashed) == 2 and entries(cache) == [entry]
    index = json.loads((cache / "converted" / kvjax.hub.INDEX).read_text())
    assert sorted(index.values()) == [digest, digest]  # one stamp per path: the touched file's old one is gone


@pytest.mark.parametrize("failure", ["raises", "writes half, then raises"])
def test_a_failed_conversion_leaves_no_folder(cache, gguf, expected, monkeypatch, failure):
    def broken_save(path, flat, cfg):
        if failure != "raises":
            Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(kvjax.hub, "save_flat", broken_save)
        with pytest.raises(OSError, match="No space left"):
            kvjax.load(str(gguf))
    assert entries(cache) == []
    np.testing.assert_allclose(kvjax.load(str(gguf)).logits(IDS), expected, atol=1e-6)
    assert len(entries(cache)) == 1


def _truncate(entry: Path) -> None:
    params = entry / kvjax.hub.PARAMS
    params.write_bytes(params.read_bytes()[: params.stat().st_size // 2])


def _bad_header(entry: Path) -> None:  # same size, so only reading it finds the damage
    params = entry / kvjax.hub.PARAMS
    data = bytearray(params.read_bytes())
    data[8:40] = b"x" * 32
    params.write_bytes(bytes(data))


def _bad_tokenizer_json(entry: Path) -> None:
    meta = entry / kvjax.hub.TOKENIZER_META
    meta.write_bytes(b"x" * meta.stat().st_size)


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "params.safetensors holds"),
    (_bad_header, "cannot read the converted copy"),
    (_bad_tokenizer_json, "cannot read the converted copy"),
    (lambda e: (e / kvjax.hub.MANIFEST).unlink(), "no readable manifest.json"),
    (lambda e: (e / kvjax.hub.TOKENIZER_META).unlink(), "tokenizer_meta.json is missing"),
])
def test_a_damaged_conversion_is_converted_again_with_one_warning(cache, gguf, expected, capsys, damage, reason):
    kvjax.load(str(gguf))
    (entry,) = entries(cache)
    damage(entry)
    capsys.readouterr()
    np.testing.assert_allclose(kvjax.load(str(gguf)).logits(IDS), expected, atol=1e-6)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("kvjax: warning:")]
    assert len(warnings) == 1 and reason in warnings[0] and "converting it again" in warnings[0], err
    assert "Traceback" not in err and entries(cache) == [entry] and kvjax.hub._damage(entry) is None


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_get_the_modes_the_umask_gives(cache, gguf, umask):
    old = os.umask(umask)
    try:
        kvjax.load(str(gguf))
    finally:
        os.umask(old)
    (entry,) = entries(cache)
    assert entry.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in entry.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert (cache / "converted" / kvjax.hub.INDEX).stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_conversion_in_the_old_layout_is_adopted(cache, gguf, expected, monkeypatch):
    kvjax.load(str(gguf))
    (entry,) = entries(cache)
    st = gguf.stat()
    old_key = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    (entry / kvjax.hub.MANIFEST).unlink()
    entry.rename(cache / "converted" / old_key)  # what the path+size+mtime cache left
    no_conversion(monkeypatch)
    np.testing.assert_allclose(kvjax.load(str(gguf)).logits(IDS), expected, atol=1e-6)
    assert entries(cache) == [entry] and kvjax.hub._damage(entry) is None


def test_cache_list_and_clean(cache, gguf, capsys):
    assert main(["cache", "list"]) == 0
    assert "empty" in capsys.readouterr().out
    kvjax.load(str(gguf))
    (entry,) = entries(cache)
    (cache / "converted" / ".0123456789abcdef-x1").mkdir()  # a conversion killed before its rename
    (cache / "smollm2-135m").mkdir()
    (cache / "smollm2-135m" / "model.gguf").write_bytes(b"\0" * 5000)
    size = sum(f.stat().st_size for f in entry.iterdir())

    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if f"converted/{entry.name}" in ln)
    assert "converted tiny.gguf" in line and f"{size / 1e3:.1f} KB" in line and "last used 20" in line
    assert "unfinished conversion" in out and "downloaded smollm2-135m" in out

    assert main(["cache", "clean", "--older-than", "1"]) == 0  # all used just now
    assert "removed 0 entries" in capsys.readouterr().out and entry.is_dir()
    old = time.time() - 3 * 86400
    for p in [entry, *entry.iterdir()]:
        os.utime(p, (old, old))
    assert main(["cache", "clean", "--older-than", "2"]) == 0
    assert f"removed 1 entry from {cache}, freed {size:,} bytes" in capsys.readouterr().out
    assert not entry.exists()

    assert main(["cache", "clean", "converted/0000000000000000"]) == 2
    assert "no cache entry 'converted/0000000000000000'" in capsys.readouterr().err
    assert main(["cache", "clean", "smollm2-135m"]) == 0
    assert "freed 5,000 bytes" in capsys.readouterr().out
    assert main(["cache", "clean"]) == 0
    assert main(["cache", "list"]) == 0
    assert "empty" in capsys.readouterr().out


def test_cache_that_is_a_regular_file_is_a_one_line_error(tmp_path, gguf, monkeypatch, capsys):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "file"))
    for argv in (["generate", "--model", str(gguf), "--prompt", "hello"], ["cache", "list"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvjax: error: ") and err.count("\n") == 1 and "KVJAX_CACHE" in err, err


def test_compile_cache_folder_rules(tmp_path, monkeypatch, capsys):
    """On in a writable folder (a second process reads what the first wrote), off with one warning in an
    unwritable one, off with KVJAX_COMPILE_CACHE=0, and a folder the user set is left alone."""
    saved = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.delenv("KVJAX_COMPILE_CACHE", raising=False)
        folder = tmp_path / "xla"
        assert compile_cache.enable(folder) == folder and jax.config.jax_compilation_cache_dir == str(folder)
        (tmp_path / "file").write_text("")
        for _ in range(2):
            assert compile_cache.enable(tmp_path / "file" / "xla") is None
        assert capsys.readouterr().err.count("kvjax: warning: compile cache off") == 1
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("KVJAX_COMPILE_CACHE", "0")
        assert compile_cache.enable(folder) is None and jax.config.jax_compilation_cache_dir is None
        monkeypatch.delenv("KVJAX_COMPILE_CACHE")
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
        assert compile_cache.enable(folder) == tmp_path / "theirs"
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        compile_cache._ours[0] = None
        if saved:
            compile_cache.enable(saved)

    # across processes: the second compile of the same program is read from the folder
    script = ("import sys, jax, jax.numpy as jnp; from kvjax import compile_cache, timing; "
              "compile_cache.enable(sys.argv[1]); hits = []; "
              "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0); "
              "jax.monitoring.register_event_listener("
              "    lambda e, **k: hits.append(e) if e.endswith('cache_hits') else 0); "
              "f = jax.jit(lambda x: jnp.linalg.qr(x @ x.T + jnp.sin(x))[0].sum()); "
              "print(float(f(jnp.ones((256, 256)))), len(hits))")
    env = {k: v for k, v in os.environ.items() if k != "KVJAX_COMPILE_CACHE"}
    runs = [subprocess.run([sys.executable, "-c", script, str(tmp_path / "shared")], capture_output=True,
                           text=True, env=env, check=True).stdout.split() for _ in range(2)]
    assert runs[0][0] == runs[1][0] and runs[0][1] == "0" and int(runs[1][1]) >= 1, runs


def _read_only_shell(folder: Path, command: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run `command` with `folder` mounted read-only (a bind mount in a new user + mount namespace)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, str(folder), *command], capture_output=True,
                          text=True, env=env, timeout=600)


def test_read_only_cache(tmp_path, gguf):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user namespaces here to mount a read-only folder")
    env = {**os.environ, "KVJAX_CACHE": str(tmp_path / "cache"), "KVJAX_COMPILE_CACHE": "1"}
    argv = [str(KVJAX), "generate", "--model", str(gguf), "--prompt", "hello", "--max-new-tokens", "2"]
    (tmp_path / "cache").mkdir()
    empty = _read_only_shell(tmp_path / "cache", argv, env)  # nothing converted yet: a clean error
    assert empty.returncode == 2, empty.stderr
    assert empty.stderr.strip().splitlines() == [
        f"kvjax: error: cannot write the kvjax cache folder {tmp_path / 'cache' / 'converted'} (Read-only file "
        f"system; KVJAX_CACHE={tmp_path / 'cache'}): set KVJAX_CACHE to a writable folder"]
    assert subprocess.run(argv, capture_output=True, env=env).returncode == 0  # converts
    ready = _read_only_shell(tmp_path / "cache", argv, env)  # converted: it runs, without a compile cache
    assert ready.returncode == 0, ready.stderr
    assert "[compile" in ready.stdout and "Traceback" not in ready.stderr
    assert ready.stderr.count("kvjax: warning: compile cache off") == 1
