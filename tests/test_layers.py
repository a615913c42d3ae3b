"""The package's floor plan, checked on every run: each layer imports only the layers below it,
surfaces do not import each other, and no module imports its way back to itself.

Every import counts, the ones inside functions too: a function-local import that closes a
circle is still a circle. The graph is read from the source (no module is imported), so the
check takes a second and needs no backend.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"

LAYERS = ("core", "sources", "metrics", "methods", "run", "report", "finetune", "teach", "surfaces")
"""Lowest first. `surfaces` are the command line and the panels."""
SURFACES = ("cli", "panels")
"""Surfaces are independent: neither imports the other."""
ALIASES = ("__init__", "__main__", "_moved")
"""The package's own entry points sit above every layer; the old flat module names (kept as
deprecated aliases of their new homes) too: nothing inside the package may import them."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    name = module_name(path)
    return imports_in(path.read_text(encoding="utf-8"), name if path.name == "__init__.py" else name.rsplit(".", 1)[0])


def imports_in(source: str, package: str) -> set[str]:
    """Every `workbench...` module `source` (a module of `package`) imports, at module level or
    inside functions. `from workbench.x import y` counts as importing `workbench.x.y` when that
    is a module."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "workbench")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "workbench":
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """Index in LAYERS, or None for the package root, its entry points and the old aliases."""
    top = module.split(".")[1] if "." in module else ""
    return LAYERS.index("surfaces") if top in SURFACES else LAYERS.index(top) if top in LAYERS else None


def graph() -> dict[str, set[str]]:
    return {name: {t for t in imports_of(path) if t in MODULES and t != name} for name, path in MODULES.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    found = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            low, high = layer_of(target), layer_of(source)
            if high is None:
                continue
            if low is None:
                found.append(f"{source} imports {target}, which is not in a layer (an old alias or the package root)")
            elif low > high:
                found.append(f"{source} ({LAYERS[high]}) imports {target} ({LAYERS[low]}): up a layer")
            elif low == high == LAYERS.index("surfaces") and source.split(".")[1] != target.split(".")[1]:
                found.append(f"{source} imports {target}: the surfaces {', '.join(SURFACES)} are independent")
    return found


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_belongs_to_a_layer_or_is_an_alias():
    """A module at the top of the package is an entry point or an old name kept as an alias."""
    lost = [
        m
        for m, p in MODULES.items()
        if layer_of(m) is None
        and m != "workbench"
        and m.split(".")[1] not in ALIASES
        and "moved_to(" not in p.read_text(encoding="utf-8")
    ]
    assert lost == []


def test_no_import_runs_up_a_layer_or_across_surfaces():
    assert violations(graph()) == []


def test_no_import_circles():
    assert circles(graph()) == []


@pytest.mark.parametrize(
    "source, target",
    [
        ("workbench.core.quiet", "workbench.run.workers"),
        ("workbench.metrics.sensitivity", "workbench.methods.registry"),
        ("workbench.cli", "workbench.panels"),
    ],
)
def test_the_check_fails_on_an_import_that_runs_up(source, target):
    edges = graph()
    edges[source] = edges[source] | {target}
    assert any(line.startswith(source) for line in violations(edges))


def test_the_check_finds_a_circle_closed_by_a_function_local_import():
    workers = MODULES["workbench.run.workers"].read_text(encoding="utf-8")
    dodge = "\n\ndef default_executor():\n    from .compare import compare\n    return compare\n"
    edges = graph()
    edges["workbench.run.workers"] = imports_in(workers + dodge, "workbench.run") & set(MODULES)
    assert any({"workbench.run.workers", "workbench.run.compare"} <= set(c) for c in circles(edges))


def test_no_module_is_over_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert long == {}
