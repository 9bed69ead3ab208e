"""What workflow code may reach, checked from the source: the modules a workflow runs
(`workflows/`, and `domain/`, which workflows import) import only what is deterministic and
free of I/O, and call no clock but `workflow.now()`.

Temporal's sandbox checks this at run time only for modules it re-imports for each new
execution; the workers pass `domain` and `workflows` through it (a new instance would
otherwise re-run every workflow module, a tenth of the worker's time after an approval), so
this check is what holds the rule, for every module and every branch, tested or not. Read
with `ast`, so nothing is run."""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"domain", "workflows"}
DETERMINISTIC_STDLIB = {"asyncio", "collections", "contextlib", "dataclasses", "datetime", "decimal",
                        "enum", "functools", "hashlib", "itertools", "json", "re", "types", "typing"}
MAY_IMPORT: dict[str, set[str]] = {
    # workflow code: Temporal's workflow API and its errors and retry policy, nothing of the client
    "workflows": DETERMINISTIC_STDLIB | OURS | {"temporalio.workflow", "temporalio.exceptions",
                                                "temporalio.common"},
    # the pure domain: its models (pydantic), currencies, and the contracts' workflow API
    "domain": DETERMINISTIC_STDLIB | OURS | {"pydantic", "iso4217", "temporalio.workflow",
                                             "temporalio.common", "temporalio.exceptions"},
}
CLOCKS = {"now", "utcnow", "today", "time", "monotonic", "perf_counter"}
"""Calls that read the machine's clock; only `workflow.now()` (history's clock) is allowed."""
BUILTINS_WITH_IO = {"open", "input", "print", "exec", "eval", "breakpoint", "id", "hash"}
"""`id` and `hash` differ between processes: a replay on another worker would branch differently."""


def module_paths() -> Iterator[Path]:
    for package in sorted(MAY_IMPORT):
        yield from sorted((ROOT / package).rglob("*.py"))


def allowed(name: str, package: str) -> bool:
    return any(name == rule or name.startswith(f"{rule}.") for rule in MAY_IMPORT[package])


def violations(path: Path, package: str) -> list[str]:
    """Each import outside `package`'s allowance and each clock or I/O call, with its line."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: imports {alias.name}" for alias in node.names
                      if not allowed(alias.name, package)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "temporalio" else [
                f"temporalio.{alias.name}" for alias in node.names]
            found += [f"{node.lineno}: imports {name}" for name in names if not allowed(name, package)]
        if isinstance(node, ast.Call):
            call = node.func
            if (isinstance(call, ast.Attribute) and call.attr in CLOCKS
                    and not (isinstance(call.value, ast.Name) and call.value.id == "workflow")):
                found.append(f"{node.lineno}: calls {ast.unparse(call)}()")
            elif isinstance(call, ast.Name) and call.id in BUILTINS_WITH_IO:
                found.append(f"{node.lineno}: calls {call.id}()")
    return found


@pytest.mark.parametrize("path", list(module_paths()), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_workflow_code_imports_and_calls_only_what_replays_the_same(path: Path) -> None:
    package = path.relative_to(ROOT).parts[0]
    assert violations(path, package) == [], f"{path.relative_to(ROOT)} reaches outside workflow code"


def test_the_check_sees_a_clock_io_and_a_forbidden_import(tmp_path: Path) -> None:
    """The reader must see what the sandbox no longer checks, or the test above could not fail."""
    source = tmp_path / "m.py"
    source.write_text("\n".join([
        "import random", "from datetime import datetime", "from temporalio import client, workflow",
        "def f():", "    import httpx", "    t = datetime.now()", "    u = workflow.now()",
        "    open('x')", "    return hash(t)", ""]))
    assert violations(source, "workflows") == [
        "1: imports random", "3: imports temporalio.client", "5: imports httpx",
        "6: calls datetime.now()", "8: calls open()", "9: calls hash()"]
