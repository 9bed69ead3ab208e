"""The layer table of docs/ARCHITECTURE.md, enforced: each top-level package imports only the
layers the table allows, and no module of ours imports itself back through others.

Read from the source with `ast`, so it checks every import (inside functions too) without
running any module."""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("domain", "workflows", "activities", "adapters", "workers", "starters")

# What each layer may import of ours (besides itself), as the architecture notes state it.
ALLOWED: dict[str, set[str]] = {
    "domain": set(),
    "workflows": {"domain"},
    "adapters": {"domain"},
    "activities": {"domain", "adapters"},
    "workers": {"domain", "adapters", "activities", "workflows"},
    "starters": {"domain", "adapters", "workflows", "workers", "activities"},
}
# Narrower rules inside starters: the in-process dev stack may import workers and activities;
# besides it only the CLI's servers import workers (`refunds worker` runs one).
STARTERS_MAY_IMPORT = {"activities": ("starters/dev/",),
                       "workers": ("starters/dev/", "starters/cli/servers.py")}


def modules() -> Iterator[tuple[str, Path]]:
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            rel = path.relative_to(ROOT)
            name = ".".join(rel.with_suffix("").parts)
            yield name.removesuffix(".__init__"), path


def imports_of(path: Path) -> set[str]:
    """Every absolute module name the file imports (relative imports resolve in-package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in LAYERS}


GRAPH = {name: imports_of(path) for name, path in modules()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_module_imports_only_allowed_layers(module: str) -> None:
    layer = module.split(".")[0]
    path = Path(*module.split(".")).with_suffix(".py").as_posix()
    wrong = sorted(name for name in GRAPH[module]
                   if name.split(".")[0] not in ALLOWED[layer] | {layer}
                   or (layer == "starters" and name.split(".")[0] in STARTERS_MAY_IMPORT
                       and not path.startswith(STARTERS_MAY_IMPORT[name.split(".")[0]])))
    assert wrong == [], f"{module} imports {wrong}, outside what the layer table allows"


def test_no_import_cycles() -> None:
    """A cycle (e.g. cli -> relay -> console -> cli) makes import order matter and hides a
    module that should be split; every module edge counts, including imports in functions."""
    edges = {name: {dep for dep in deps if dep in GRAPH and dep != name} for name, deps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(edges[name]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_a_forbidden_import(tmp_path: Path) -> None:
    """The reader must see imports nested in functions, or the rules above could not fail."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from starters.cli import main\n    import activities.refund\n")
    assert imports_of(source) == {"starters.cli", "starters.cli.main", "activities.refund"}

