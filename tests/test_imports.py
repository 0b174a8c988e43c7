"""The import graph of hf_kd: no cycles, the loss library on its own floor, every module importable alone.

The graph is read from the source (every ``import`` statement, function-level ones included, since a lazy import
still closes a loop): importing ``a.b.c`` first imports the packages ``a.b`` above it, and ``hf_kd.losses``
imports every module in its folder (``pkgutil``), so both count as edges.
"""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import hf_kd

PACKAGE = Path(hf_kd.__file__).parent
# What the loss library may import from the rest of hf_kd: the leaves that describe a term (no logic of a run).
LOSS_FLOOR = {"hf_kd.knobs", "hf_kd.papers", "hf_kd.registry"}


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imported(name: str, path: Path, node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The hf_kd modules one import statement of module ``name`` loads (with their packages)."""
    if isinstance(node, ast.Import):
        targets = {alias.name for alias in node.names}
    else:
        base = node.module or ""
        if node.level:
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        targets = {base} | {f"{base}.{alias.name}" for alias in node.names}
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    loaded = set()
    for target in targets & modules:
        parts = target.split(".")
        loaded |= {target} | ({".".join(parts[:i]) for i in range(2, len(parts))} - own_packages)
    return loaded


def import_graph() -> dict[str, set[str]]:
    """hf_kd module -> the hf_kd modules it imports (anywhere in its file)."""
    files = _module_files()
    graph = {}
    for name, path in files.items():
        source = path.read_text(encoding="utf-8")
        edges = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _imported(name, path, node, set(files))
        if path.name == "__init__.py" and "pkgutil.iter_modules(__path__)" in source:
            edges |= {m for m in files if m.rpartition(".")[0] == name}
        graph[name] = edges - {name}
    return graph


def _cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """One import path from ``start`` back to itself, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_graph_sees_the_package():
    graph = import_graph()
    assert {"hf_kd", "hf_kd.losses", "hf_kd.losses.core", "hf_kd.trainer"} <= set(graph)
    assert "hf_kd.losses.core" in graph["hf_kd.losses.span"]
    assert "hf_kd.losses.span" in graph["hf_kd.losses"]  # the package's pkgutil import of its modules


def test_no_import_cycles():
    graph = import_graph()
    cycles = [cycle for name in graph if (cycle := _cycle_through(name, graph))]
    # e.g. a module under hf_kd/__init__.py importing ``hf_kd`` itself (for ``__version__``) is one
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_loss_library_imports_only_its_floor():
    graph = import_graph()
    for name, edges in graph.items():
        if name == "hf_kd.losses" or name.startswith("hf_kd.losses."):
            outside = {e for e in edges if not e.startswith("hf_kd.losses")} - LOSS_FLOOR
            assert not outside, f"{name} imports {sorted(outside)}, above the loss library"
    for name in LOSS_FLOOR:
        assert graph[name] <= LOSS_FLOOR, f"{name} imports {sorted(graph[name] - LOSS_FLOOR)}"


def test_every_module_imports_in_a_fresh_interpreter():
    """Importing any ``hf_kd.x`` runs ``hf_kd/__init__.py`` first, so a module that ``import hf_kd`` loads is imported
    exactly as ``import hf_kd`` is; the others are each imported alone after ``hf_kd``'s modules are dropped (the
    third-party libraries stay loaded, which only saves time)."""
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import hf_kd
        names = [m.name for m in pkgutil.walk_packages(hf_kd.__path__, "hf_kd.")]
        rest = [name for name in names if name not in sys.modules]
        failed = []
        for name in rest:
            for loaded in [m for m in sys.modules if m == "hf_kd" or m.startswith("hf_kd.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception as err:
                failed.append(f"{name}: {err!r}")
        print(len(names), len(rest))
        print("\\n".join(failed))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    counts, *failed = out.stdout.strip().split("\n")
    total, alone = map(int, counts.split())
    assert total >= 50 and alone >= 1  # the walk found the package's modules and some that hf_kd does not import
    assert [f for f in failed if f] == []
