"""The README's Python snippets run as written, in order, as one session (later snippets use the `lm`,
`ids` and `ctx` of earlier ones), from the repository root, on the real default model. A snippet whose
first line is `# NAME.py` is that file: it is written to a folder on sys.path, as the README says.
Snippets of the sections in `SKETCHES` show code the reader writes elsewhere; they are not run."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKETCHES = {"Adding a model": "a line of models/__init__.py registering a family the reader writes (Gemma3)"}


def _snippets() -> list[tuple[str, str]]:
    """(section heading, code) of each ```python block, in order."""
    out, section = [], ""
    text = (ROOT / "README.md").read_text()
    for part in re.split(r"^(#+ [^\n]*|```python\n(?:.*?\n)?```)$", text, flags=re.M | re.S):
        if part.startswith("#"):
            section = part.lstrip("# ").strip()
        elif part.startswith("```python\n"):
            out.append((section, part[len("```python\n"):-len("```")]))
    return out


SNIPPETS = [(section, code) for section, code in _snippets() if section not in SKETCHES]


def test_readme_snippets_found():
    sections = [s for s, _ in _snippets()]
    assert set(SKETCHES) <= set(sections), "a section in SKETCHES is gone: update the list"
    assert len(SNIPPETS) >= 4 and "init_cache" in "".join(code for _, code in SNIPPETS)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The namespace the snippets share, with a folder on sys.path for the files they define."""
    files = tmp_path_factory.mktemp("readme_files")
    sys.path.insert(0, str(files))
    yield {"__name__": "__readme__"}, files
    sys.path.remove(str(files))


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=[f"{i}-{s}" for i, (s, _) in enumerate(SNIPPETS)])
def test_readme_snippet_runs(session, index, monkeypatch):
    namespace, files = session
    _, code = SNIPPETS[index]
    first = code.splitlines()[0].strip()
    if re.fullmatch(r"#\s*\w+\.py", first):
        (files / first.lstrip("# ").strip()).write_text(code)
        return
    monkeypatch.chdir(ROOT)
    exec(compile(code, f"README.md python snippet {index}", "exec"), namespace)
