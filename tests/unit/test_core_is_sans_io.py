"""STYLE rule 1: ``flcluster/core`` holds pure state machines; this walks every import it makes.

The core may also import the few pure modules outside it (``flcluster.errors``, ``flcluster.wire.codes``);
those are walked too, and a fresh interpreter that imports the core must load none of the I/O libraries.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "flcluster" / "core"
ALLOWED_THIRD_PARTY = {"attrs"}
ALLOWED_FLCLUSTER = {"flcluster.errors", "flcluster.core", "flcluster.wire.codes"}
#: The pure modules outside the core that the core may import, and the packages on their way.
PURE_OUTSIDE = [ROOT / "flcluster" / "errors.py", ROOT / "flcluster" / "wire" / "codes.py"]
PACKAGES_ON_THE_WAY = [ROOT / "flcluster" / "wire" / "__init__.py"]
FORBIDDEN_AT_RUNTIME = (
    "trio",
    "quart",
    "hypercorn",
    "sqlite3",
    "sqlite_utils",
    "torch",
    "numpy",
    "flatbuffers",
    "httpx",
)


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize(
    "path", [*sorted(CORE.glob("*.py")), *PURE_OUTSIDE, *PACKAGES_ON_THE_WAY], ids=lambda p: p.name
)
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


def test_the_pure_modules_outside_the_core_import_only_the_standard_library() -> None:
    for path in [*PURE_OUTSIDE, *PACKAGES_ON_THE_WAY]:
        for name in imported_modules(path):
            assert name.split(".")[0] in sys.stdlib_module_names, f"{path.name} imports {name!r}"


def test_importing_the_core_loads_no_io_library() -> None:
    code = (
        "import sys, flcluster.core.cluster, flcluster.core.iteration; "
        f"print(sorted(m for m in {FORBIDDEN_AT_RUNTIME!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
