"""From the project root (where ``python -m``, ``python -c`` and notebooks put the current directory first on
``sys.path``) the top-level ``kernels/`` folder must never stand in for Hugging Face's ``kernels`` package, which
transformers >= 5.25 imports while ``transformers.modeling_utils`` loads. Checked in subprocesses, with Hugging
Face's ``kernels`` installed and with it hidden."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Hides the installed ``kernels`` distribution, its module and its metadata, as if it were not installed (only
# the current directory's folder could then answer ``import kernels``).
HIDE_HF_KERNELS = """
import importlib.metadata, sys, sysconfig
from importlib.machinery import PathFinder
_version = importlib.metadata.version
def _no_kernels(name):
    if name == "kernels":
        raise importlib.metadata.PackageNotFoundError(name)
    return _version(name)
importlib.metadata.version = _no_kernels
class _Hide:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "kernels":
            return None
        site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        return PathFinder.find_spec(name, [p for p in sys.path if p not in site])
sys.meta_path.insert(0, _Hide)
"""

CASES = {
    "python -m kvpipe --help": ["-m", "kvpipe", "--help"],
    "import kvpipe, transformers.modeling_utils": ["-c", "import kvpipe, transformers.modeling_utils, kvpipe.cli"],
}


def run_from_root(args: list[str], hide: bool) -> subprocess.CompletedProcess:
    if hide:  # run the hiding code first, then the command as python would
        args = ["-c", HIDE_HF_KERNELS + ("import runpy; runpy.run_module('kvpipe', run_name='__main__')"
                                         if args[0] == "-m" else args[1])] + (["--help"] if args[0] == "-m" else [])
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("hf_kernels", ["installed", "hidden"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_project_root_does_not_shadow_hugging_face_kernels(case, hf_kernels):
    if hf_kernels == "installed":
        pytest.importorskip("kernels", reason="Hugging Face's kernels package is not installed here")
    done = run_from_root(CASES[case], hide=hf_kernels == "hidden")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_top_level_folders_are_not_packages():
    """The construction itself: no ``__init__.py`` in the top-level folders, so none of them can be a regular
    package named ``kernels``/``stages``/``pipelines``; the package reaches them as ``kvpipe.<name>`` (an install's
    package-dir mapping, or ``kvpipe/__init__.py`` in a checkout)."""
    import kvpipe

    for name in ("kernels", "stages", "pipelines"):
        assert not (ROOT / name / "__init__.py").exists(), name
        module = importlib.import_module(f"kvpipe.{name}")
        assert [Path(p).resolve() for p in module.__path__] == [(ROOT / name).resolve()], name
    assert Path(kvpipe.__file__).resolve().parent == ROOT / "kvpipe"


def test_hugging_face_kernels_wins_from_the_root():
    hf = pytest.importorskip("kernels", reason="Hugging Face's kernels package is not installed here")
    done = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == hf.__file__


def test_help_loads_no_torch():
    """``kvpipe --help`` answers at once: neither torch nor transformers is imported for it."""
    code = ("import sys, contextlib, io\nimport kvpipe.cli\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        kvpipe.cli.main(['--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
