"""The package's imports run one way, down the floors of the architecture (docs/explanation/architecture.md):
no circle between modules, and no module importing from a floor at or above its own, except within its own
package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "actstore"

# Lowest first. A module may import from a lower floor, and from its own package.
FLOORS = [
    {"v1", "__init__"},
    {"protocol", "wire", "address", "pools"},
    {"store"},
    {"arguments", "adapter", "testing"},
    {"analysis", "ingest", "exchange"},
    {"finetune", "server", "client"},
    {"study", "torch"},
    {"cli"},
    {"__main__"},
]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """Its floor's unit: the subpackage or top-level module under actstore."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _floor(unit: str) -> int:
    for level, units in enumerate(FLOORS):
        if unit in units:
            return level
    raise AssertionError(f"actstore.{unit} is on no floor: add it to FLOORS and to the architecture page")


def _imports() -> dict[str, set[str]]:
    """Every actstore module and the actstore modules it imports (at any depth: a function's lazy import counts)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_no_import_runs_up_or_sideways():
    bad = []
    for module, targets in _imports().items():
        for target in targets:
            source, dest = _unit(module), _unit(target)
            if source != dest and _floor(dest) >= _floor(source) and dest != "__init__":
                bad.append(f"{module} -> {target}")
    assert not bad, "imports that run up or sideways a floor:\n" + "\n".join(sorted(bad))


def test_command_modules_are_leaves():
    """A subcommand's CLI module parses arguments and calls the library: nothing but ``actstore.cli`` builds on
    it, and the study starts a server as a process rather than reaching into the server's internals."""
    bad = []
    for module, targets in _imports().items():
        for target in targets:
            if target.endswith(".cli") and target != "actstore.cli" and module != "actstore.cli":
                bad.append(f"{module} -> {target}")
            if _unit(module) == "study" and _unit(target) == "server" and target != "actstore.server.process":
                bad.append(f"{module} -> {target}")
    assert not bad, "imports into command modules or server internals:\n" + "\n".join(sorted(bad))


def test_no_circle_between_modules():
    graph = _imports()
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        seen[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in seen and (circle := visit(nxt)):
                return circle
        stack.pop()
        seen[node] = 2
        return None

    for start in sorted(graph):
        if start not in seen and (circle := visit(start)):
            pytest.fail("import circle: " + " -> ".join(circle))
