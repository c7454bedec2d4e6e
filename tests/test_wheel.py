"""The wheel holds every module, stage, kernel, shipped pipeline and gate file of the source tree.

``kvpipe/kernels``, ``kvpipe/stages`` and ``kvpipe/pipelines`` are links to the top-level folders (DESIGN §1, and
``tests/test_no_shadowing.py`` for why the top-level folders are not packages). A clone made with
``core.symlinks=false`` (Windows' default) turns each link into a small text file, and a wheel built there would
silently lack the kernels, stages and pipelines: both tests below fail on such a clone, saying so."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINKED = ("kernels", "stages", "pipelines")


def test_the_linked_folders_are_links_in_this_clone():
    for name in LINKED:
        link = ROOT / "kvpipe" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), (
            f"kvpipe/{name} is not a link to ../{name}: this clone was made with core.symlinks=false; clone again "
            "with `git clone -c core.symlinks=true` (on Windows: enable developer mode first)")


def test_the_wheel_holds_every_file_of_the_source_tree(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path),
                           str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("kvpipe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"kvpipe/{path.relative_to(ROOT / 'kvpipe').as_posix()}"
                for path in (ROOT / "kvpipe").rglob("*") if path.suffix in (".py", ".safetensors")
                and "__pycache__" not in path.parts}
    expected |= {f"kvpipe/{name}/{path.relative_to(ROOT / name).as_posix()}" for name in LINKED
                 for path in (ROOT / name).rglob("*") if path.suffix in (".py", ".yaml")
                 and "__pycache__" not in path.parts}
    assert not expected - names, sorted(expected - names)[:10]
    assert any(n.startswith("kvpipe/core/gates_data/") for n in names)
