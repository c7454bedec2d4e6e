"""mypy over kvpipe as it installs: ``kernels/``, ``stages/`` and ``pipelines/`` are the packages
``kvpipe.kernels``, ``kvpipe.stages`` and ``kvpipe.pipelines`` (pyproject's package-dir), a mapping mypy's command
line cannot express, so each file is handed to mypy under its installed module name. Settings: [tool.mypy] in
pyproject.toml. Exits 1 on any finding, printing them.

    python .ci/typecheck.py
"""
from __future__ import annotations

import sys
from pathlib import Path

from mypy import build
from mypy.errors import CompileError
from mypy.fscache import FileSystemCache
from mypy.main import process_options
from mypy.modulefinder import BuildSource

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it installs as
PACKAGES = {"kvpipe": "kvpipe", "kernels": "kvpipe.kernels", "stages": "kvpipe.stages"}


def sources() -> list[BuildSource]:
    found = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found.append(BuildSource(str(path), ".".join((package, *parts))))
    return found


def main() -> int:
    _, options = process_options(["--config-file", str(ROOT / "pyproject.toml"), "-c", "pass"])
    try:
        result = build.build(sources(), options, fscache=FileSystemCache())
    except CompileError as err:
        print("\n".join(err.messages))
        return 1
    for message in result.errors:
        print(message)
    print(f"mypy: {len(result.errors)} finding(s) in {len(sources())} files")
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
