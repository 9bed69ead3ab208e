"""Every activity contract has exactly one implementation in `activities/`, registered
under the contract's name with the contract's input and result types, and every
implementation has a contract (a renamed or retyped side fails here, not in a workflow)."""

import ast
import importlib
import inspect
import pkgutil
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from temporalio import activity

import activities
import workflows
from domain import contracts


def _implementations() -> list[tuple[str, Callable[..., Any], bool]]:
    """(registered name, function, listed in its holder's `all()`) for every activity
    defined in the `activities` package."""
    found = []
    for module_info in pkgutil.iter_modules(activities.__path__):
        module = importlib.import_module(f"activities.{module_info.name}")
        for holder in vars(module).values():
            if not inspect.isclass(holder) or holder.__module__ != module.__name__:
                continue
            # `all()` only lists bound methods: what the worker registers, read without a store
            listed: list[Callable[..., Any]] = typing.cast(Any, object.__new__(holder)).all()
            registered = {getattr(m, "__func__", m) for m in listed}
            for fn in vars(holder).values():
                definition = activity._Definition.from_callable(fn) if callable(fn) else None
                if definition is not None:
                    assert definition.name is not None
                    found.append((definition.name, fn, fn in registered))
    return found


def test_every_contract_has_one_registered_implementation_of_its_types() -> None:
    implementations = _implementations()
    names = [name for name, _, _ in implementations]
    declared = {c.name: c for c in contracts.ALL}
    assert len(declared) == len(contracts.ALL), "two contracts share a name"
    assert sorted(names) == sorted(declared), "an activity without a contract, or a contract without one"
    for name, fn, registered in implementations:
        contract = declared[name]
        hints = typing.get_type_hints(fn)
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert registered, f"{name} is defined but not in its holder's all()"
        assert len(params) == 1 and hints[params[0]] is contract.input, f"{name}: input type"
        assert hints["return"] is contract.result, f"{name}: result type"


def test_workflows_call_activities_only_through_contracts() -> None:
    """A direct `workflow.execute_activity("name", ..., result_type=...)` would write a
    name and a result type a second time, beside the contract."""
    direct = []
    for path in sorted(Path(workflows.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith(("execute_", "start_"))
                    and "activity" in node.attr):
                direct.append(f"{path}:{node.lineno} {node.attr}")
    assert direct == []
