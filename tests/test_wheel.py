"""The wheel holds every module, stage, kernel, shipped pipeline and gate file of the source tree, and the tree
holds no links, so every clone (Windows' ``core.symlinks=false`` included) builds the same wheel.

``kernels/``, ``stages/`` and ``pipelines/`` are top-level folders (DESIGN §1) that install as ``kvpipe.kernels``,
``kvpipe.stages`` and ``kvpipe.pipelines`` (pyproject's ``package-dir``); a checkout used without installing finds
them through ``kvpipe/__init__.py``."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("kernels", "stages", "pipelines")


def source_files() -> set[str]:
    """What the wheel must hold, named as installed."""
    expected = {f"kvpipe/{path.relative_to(ROOT / 'kvpipe').as_posix()}"
                for path in (ROOT / "kvpipe").rglob("*") if path.suffix in (".py", ".safetensors")
                and "__pycache__" not in path.parts}
    return expected | {f"kvpipe/{name}/{path.relative_to(ROOT / name).as_posix()}" for name in MAPPED
                       for path in (ROOT / name).rglob("*") if path.suffix in (".py", ".yaml")
                       and "__pycache__" not in path.parts}


def test_the_tree_holds_no_links():
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    links = [line.split("\t")[-1] for line in listed.splitlines() if line.startswith("120000")]
    assert not links, f"links in the tree (a core.symlinks=false clone would build another wheel): {links}"


def test_the_wheel_holds_every_file_of_the_source_tree(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path),
                           str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("kvpipe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = source_files()
    assert not expected - names, sorted(expected - names)[:10]
    assert any(n.startswith("kvpipe/core/gates_data/") for n in names)
    assert not {n for n in names if n.startswith(("kernels/", "stages/", "pipelines/"))}   # only under kvpipe/


def test_a_checkout_used_without_installing_finds_kernels_stages_and_pipelines(tmp_path):
    """``PYTHONPATH=.`` in a copy of the tree (the GPU scripts run so): its own folders, not an install's."""
    for name in ("kvpipe", *MAPPED):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import kvpipe.kernels.pages, kvpipe.stages.topk, kvpipe.core.shipped as shipped; "
             "print(kvpipe.kernels.pages.__file__, kvpipe.stages.topk.__file__, shipped.DIR, len(shipped.names()))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    pages, topk, pipelines, count = done.stdout.split()
    assert Path(pages).parent == tmp_path / "kernels" and Path(topk).parent == tmp_path / "stages"
    assert Path(pipelines) == tmp_path / "pipelines" and int(count) == len(list((ROOT / "pipelines").glob("*.yaml")))
