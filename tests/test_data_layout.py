"""The data package's module layout: one owner per concern, no import circles.

Imports are read from the source with ``ast`` (function-level imports included, since a
lazy import inside a function closes a circle as surely as a top-level one).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "scalejepa" / "data"
MODULES = sorted(f"scalejepa.data.{p.stem}" for p in DATA.glob("*.py") if p.stem != "__init__")


def _module_path(name: str) -> Path:
    return ROOT / Path(*name.split(".")).with_suffix(".py")


def _imports(name: str) -> set[str]:
    """scalejepa modules that module ``name`` imports, anywhere in its body."""
    package = name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(_module_path(name).read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from . import x
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # "from pkg import module"
    return {m for m in found if m.startswith("scalejepa.") and _module_path(m).is_file()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_data_modules_import_without_circles():
    names = MODULES + ["scalejepa.io", "scalejepa.eval.features"]
    graph = {n: _imports(n) for n in names}
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"
    assert _cycle({"a": {"b"}, "b": {"a"}}) is not None  # the check itself finds circles


def test_the_index_is_a_pure_reader():
    # No writer, cache, PIL or webdataset behind shard_index: it only reads index.json.
    assert _imports("scalejepa.data.shard_index") == set()
    code = ("import sys, scalejepa.data.shard_index; "
            "print(sorted(m for m in ('PIL', 'webdataset', 'scalejepa.data.writer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_training_and_evaluation_share_one_sample_decoder():
    for user in ("scalejepa.data.pipeline", "scalejepa.eval.features"):
        assert "scalejepa.data.samples" in _imports(user), user
        assert "tarfile_to_samples" not in _module_path(user).read_text(), user
