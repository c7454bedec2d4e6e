"""The package's layers, checked from the source: imports point one way (cli → learned → eval → runtime → core →
kernels), with no cycle between modules, counting every import (inside functions and under ``TYPE_CHECKING``)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvpipe"
# lower numbers are lower layers; a module may import its own layer and the ones below
LAYERS = {"kvpipe.kernels": 0, "kvpipe.errors": 0, "kvpipe.version": 0, "kvpipe.core": 1, "kvpipe.runtime": 2,
          "kvpipe.models": 2, "kvpipe.eval": 3, "kvpipe.learned": 4, "kvpipe.cli": 5, "kvpipe": 6}


def layer(module: str) -> int:
    return next(LAYERS[prefix] for prefix in sorted(LAYERS, key=len, reverse=True)
                if module == prefix or module.startswith(prefix + "."))


def modules() -> dict[str, Path]:
    """Every module of the package proper (the stages are plugins and the kernels a layer of their own)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[1] in ("stages", "pipelines", "kernels"):
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The kvpipe modules ``path`` imports, anywhere in it."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names if alias.name.startswith("kvpipe")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvpipe"):
            for alias in node.names:                          # `from kvpipe.runtime import compressor`
                sub = f"{node.module}.{alias.name}"
                targets.add(sub if sub in known else node.module)
    return targets


def test_imports_point_down_and_never_in_a_cycle():
    found = modules()
    graph = nx.DiGraph()
    upward = []
    for name, path in found.items():
        for target in imports(path, set(found)):
            graph.add_edge(name, target)
            if layer(target) > layer(name):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports pointing up a layer:\n" + "\n".join(sorted(upward))
    cycles = list(nx.simple_cycles(graph.subgraph(found)))
    assert not cycles, f"import cycles: {cycles}"


def test_the_runtime_loads_without_the_evaluation():
    code = "import sys, kvpipe.runtime.attach; print(sorted(m for m in sys.modules if m.startswith('kvpipe.eval')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_stages_read_configurations_not_the_runtime():
    """A stage says *what* to do (``kvpipe.core``: its parameters, a storage configuration); the runtime does it.
    Stages that reach into the runtime (caches, stores, attach) would tie a plugin to its internals."""
    reaching = [f"{path.relative_to(ROOT)} -> {target}" for path in sorted((ROOT / "stages").glob("*.py"))
                for target in imports(path, set(modules())) if target.startswith("kvpipe.runtime")]
    assert not reaching, "stages importing the runtime:\n" + "\n".join(reaching)
