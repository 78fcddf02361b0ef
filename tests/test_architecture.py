"""The structure of ``src/cnnlens``: its import graph is acyclic and follows the layers; ``import cnnlens`` is light.

The walk reads every module with :mod:`ast`, so it sees imports inside functions (lazy imports are still
dependencies) and relative imports; only imports under ``if TYPE_CHECKING:`` are left out (they never run).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "cnnlens"

# The layers of docs/architecture.md, top (highest number) to bottom. A module may import modules of its own
# layer or of lower layers, never of a higher one; the first matching prefix (longest first) decides a module's
# layer. ``__main__`` modules are entry points and belong to the top layer wherever they live.
LAYERS: dict[str, int] = {
    # 8  the facade: ``cnnlens/__init__`` loads public names lazily from every layer below
    "cnnlens": 8,
    # 7  what a person runs: commands and their argument helpers
    "cnnlens.cli": 7,
    "cnnlens.__main__": 7,  # ``python -m cnnlens``: the command
    "cnnlens.serve": 7,
    # 6  HTML reports (jinja2): the one jinja environment, explain index, demo, study and run reports
    "cnnlens.report": 6,
    # 5  figures (matplotlib): grids, colour bars, the forward views' renderers
    "cnnlens.viz": 5,
    # 4  studies, dataset runs, forward views (filters, feature maps, activation maximisation)
    "cnnlens.studies": 4,
    "cnnlens.runs": 4,
    "cnnlens.views": 4,
    # 3  metrics: faithfulness, localisation, sanity
    "cnnlens.metrics": 3,
    # 2  methods and the explain() entry point, the Explanation result, method traits for display
    "cnnlens.methods": 2,
    "cnnlens.explain": 2,
    "cnnlens.explanation": 2,
    "cnnlens.explain_folder": 2,
    "cnnlens.display": 2,
    "cnnlens.notebook": 2,
    # 1  capture: the only place hooks touch a model; layer discovery built on it
    "cnnlens.capture": 1,
    "cnnlens.candidates": 1,
    # 0  models and data: zoo, loaders, preprocessing, image I/O, labels
    "cnnlens.models": 0,
    "cnnlens.data": 0,
    # -1 basics every layer may use: they import only other basics
    "cnnlens.errors": -1,
    "cnnlens.execution": -1,
    "cnnlens.batching": -1,
    "cnnlens.targets": -1,
    "cnnlens.inputs": -1,
    "cnnlens.outputs": -1,
    "cnnlens.maps": -1,
    "cnnlens.imaging": -1,
    "cnnlens.jsonfile": -1,
    "cnnlens.outputs_dir": -1,
    "cnnlens.index_hook": -1,
    "cnnlens.allocator": -1,
    "cnnlens._names": -1,
}
TOP = max(LAYERS.values())


def _modules() -> dict[str, tuple[Path, bool]]:
    found: dict[str, tuple[Path, bool]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _known(name: str) -> str | None:
    """The cnnlens module ``name`` refers to (an attribute import resolves to its module), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> list[tuple[str, int]]:
    """``(imported cnnlens module, line)`` for every import statement of ``module`` that can run."""
    path, is_package = MODULES[module]
    found: list[tuple[str, int]] = []

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if _is_type_checking(node.test):
                for stmt in node.orelse:
                    self.visit(stmt)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.extend((alias.name, node.lineno) for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub if sub in MODULES else source, node.lineno))

    Visitor().visit(ast.parse(path.read_text("utf-8"), str(path)))
    edges = []
    for name, line in found:
        target = _known(name) if name.startswith("cnnlens") else None
        if target is not None and target != module:
            edges.append((target, line))
    return edges


def layer_of(module: str) -> int:
    if module.rpartition(".")[2] == "__main__":
        return TOP - 1
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def _where(module: str, line: int) -> str:
    return f"{MODULES[module][0].relative_to(SRC.parent)}:{line}"


def test_every_module_has_a_layer() -> None:
    missing = [
        m
        for m in MODULES
        if m != "cnnlens" and max((p for p in LAYERS if m == p or m.startswith(p + ".")), key=len) == "cnnlens"
    ]
    assert not missing, f"add these modules to LAYERS (and to docs/architecture.md): {missing}"


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    bad = [
        f"{_where(m, line)}: {m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m in MODULES
        for t, line in imports_of(m)
        if layer_of(t) > layer_of(m)
    ]
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: each strongly connected component of two or more nodes, sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _edges_within(graph: dict[str, set[str]], cycle: list[str]) -> str:
    return "; ".join(f"{a} -> {b}" for a in cycle for b in sorted(graph.get(a, ())) if b in cycle)


def test_no_cycle_between_modules() -> None:
    graph = {m: {t for t, _ in imports_of(m)} for m in MODULES}
    # A package's __init__ re-exporting its submodules is not a dependency of those submodules on it.
    for m in MODULES:
        if MODULES[m][1]:
            graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    cycles = _cycles(graph)
    assert not cycles, "import cycles between modules:\n" + "\n".join(_edges_within(graph, c) for c in cycles)


def _unit(module: str) -> str:
    """The unit of the package-level graph: ``cnnlens.X`` for a subpackage or top-level module."""
    return ".".join(module.split(".")[:2])


def test_no_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for m in MODULES:
        if m == "cnnlens" or m.rpartition(".")[2] == "__main__":
            continue  # the facade and the entry points sit above everything
        graph.setdefault(_unit(m), set()).update(
            _unit(t) for t, _ in imports_of(m) if _unit(t) != _unit(m) and t != "cnnlens"
        )
    cycles = _cycles(graph)
    assert not cycles, "import cycles between packages:\n" + "\n".join(_edges_within(graph, c) for c in cycles)


def test_the_walk_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    edges = {t for t, _ in imports_of("cnnlens")}  # the facade: TYPE_CHECKING imports are left out
    assert edges == {"cnnlens._names", "cnnlens.index_hook", "cnnlens.report"}  # report: inside a function
    assert any(t == "cnnlens.errors" for t, _ in imports_of("cnnlens.execution"))
    # a lower module importing a higher one inside a function is caught
    assert layer_of("cnnlens.report") > layer_of("cnnlens.explanation") > layer_of("cnnlens.errors")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}) == [["a", "b", "c"]]


# ------------------------------------------------------------------------------------------------ lazy imports
HEAVY = ("torchvision", "matplotlib", "jinja2", "pyarrow", "scipy", "skimage", "keras", "tensorflow")


def _imported_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nimport json\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    return {name.partition(".")[0] for name in json.loads(done.stdout.strip().splitlines()[-1])}


def test_import_cnnlens_imports_nothing_heavy() -> None:
    loaded = _imported_after("import cnnlens")
    assert not loaded & {*HEAVY, "torch", "rich"}, sorted(loaded & {*HEAVY, "torch", "rich"})


@pytest.mark.parametrize("name", ["explain", "Explanation", "capture"])
def test_first_use_imports_only_what_it_needs(name: str) -> None:
    loaded = _imported_after(f"import cnnlens\ncnnlens.{name}")
    assert "torch" in loaded  # the name was really loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
