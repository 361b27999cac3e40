"""The package's layout has no import circles: every ``import scalejepa...`` statement,
at module level or inside a function, is an edge of the graph checked here."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"scalejepa": REPO / "scalejepa", "scalejepa.kernels": REPO / "kernels"}


def modules() -> dict[str, Path]:
    found = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or a module.attribute) names."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def edges(known: dict[str, Path]) -> dict[str, set[str]]:
    graph = {m: set() for m in known}
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base]) if base else ".".join(anchor)
                targets = [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                dest = resolve(target, known)
                if dest and dest != module and not module.startswith(dest + "."):  # a package's own children
                    graph[module].add(dest)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    graph = edges(modules())
    assert len(graph) > 30
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path):
    graph = edges(modules())
    assert "scalejepa.parallel.fsdp" in graph["scalejepa.parallel.build"]
    (tmp_path / "a.py").write_text("import os\n\n\ndef f():\n    from pkg.b import g\n    return g\n")
    (tmp_path / "b.py").write_text("def g():\n    pass\n")
    assert edges({"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"})["pkg.a"] == {"pkg.b"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_shard_index_is_a_pure_reader():
    # No writer, cache, PIL or webdataset behind shard_index: it only reads index.json.
    assert edges(modules())["scalejepa.data.shard_index"] == set()
    code = ("import sys, scalejepa.data.shard_index; "
            "print(sorted(m for m in ('PIL', 'webdataset', 'scalejepa.data.writer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_training_and_evaluation_share_one_sample_decoder():
    graph = edges(modules())
    for user in ("scalejepa.data.pipeline", "scalejepa.eval.features"):
        assert "scalejepa.data.samples" in graph[user], user
        assert "tarfile_to_samples" not in modules()[user].read_text(), user


def test_configs_and_the_shard_writer_import_without_torch():
    # scalejepa.io imports torch only where it saves a tensor: ~2 s saved for every config
    # read and for scalejepa-make-shards.
    code = "import sys, scalejepa.config, scalejepa.data.make_shards; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
