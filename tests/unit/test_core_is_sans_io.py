"""STYLE rule 1: ``flcluster/core`` holds pure state machines; this walks every import it makes."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "flcluster" / "core"
ALLOWED_THIRD_PARTY = {"attrs"}
ALLOWED_FLCLUSTER = {"flcluster.errors", "flcluster.core"}


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_only_the_standard_library_attrs_and_errors(path: Path) -> None:
    for name in imported_modules(path):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names and top not in {"sqlite3", "socket", "asyncio", "threading"}:
            continue
        if top in ALLOWED_THIRD_PARTY:
            continue
        assert any(name == ok or name.startswith(ok + ".") for ok in ALLOWED_FLCLUSTER), (
            f"{path.name} imports {name!r}; flcluster/core must stay sans-IO (no trio, sqlite, torch, ...)"
        )


def test_the_walk_finds_the_core_modules() -> None:
    assert {p.name for p in CORE.glob("*.py")} >= {"cluster.py", "iteration.py"}
    assert "attrs" in imported_modules(CORE / "cluster.py")
