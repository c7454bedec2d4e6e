"""Every Python block of README.md and docs/*.md runs as written: top to bottom per file, in one namespace, on the
newest transformers, with kvpipe's and transformers' deprecation warnings as errors. A block that cannot run in
one process says why in a ``<!-- docs-test: not run (...) -->`` line above it. (``docs/write-a-stage.md`` runs in
``tests/test_tutorial.py``, which also checks what it builds.)"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

import kvpipe.models

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "write-a-stage.md")]
BLOCK = re.compile(r"(<!-- docs-test: not run \((?P<why>[^)]+)\) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(page: Path) -> list[tuple[str | None, str]]:
    return [(m["why"], m["code"]) for m in BLOCK.finditer(page.read_text())]


@pytest.mark.real_model
@pytest.mark.parametrize("page", [p for p in PAGES if any(why is None for why, _ in blocks(p))],
                         ids=lambda p: p.name)
def test_the_python_blocks_of_a_page_run_as_written(page, smollm, tmp_path, monkeypatch):
    monkeypatch.setattr(kvpipe.models, "load", lambda *args, **kwargs: smollm)    # loaded once per session
    monkeypatch.chdir(tmp_path)                                                   # files they write land here
    monkeypatch.syspath_prepend(str(ROOT))
    (tmp_path / "pipelines").symlink_to(ROOT / "pipelines")                       # paths as from the project root
    namespace: dict = {}
    ran = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=FutureWarning)
        warnings.filterwarnings("error", category=DeprecationWarning, module=r"(transformers|kvpipe)(\.|$)")
        for why, code in blocks(page):
            if why is not None:
                continue
            exec(compile(code, str(page), "exec"), namespace)
            ran += 1
    assert ran, f"{page.name}: no block ran"


def test_every_page_with_python_is_run_or_says_why_not():
    pages = {page.name: blocks(page) for page in PAGES}
    assert sum(why is None for found in pages.values() for why, _ in found) >= 3
    # a block of another language tagged as Python, or a skip without its reason, would slip past the test above
    for name, found in pages.items():
        for why, code in found:
            assert why is None or len(why) > 20, (name, code[:60])
