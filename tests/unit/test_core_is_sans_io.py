"""STYLE rules 1 and 2: ``flcluster/core`` holds pure state machines; this walks every import it makes.

A core module may import the standard library (but nothing that does I/O or reads the clock), attrs,
``flcluster.errors`` and other core modules. Relative imports are allowed only within ``core/`` itself:
``from .. import x`` would be a way out of the rule that this walk must see.

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
#: Standard-library modules that do I/O, run concurrently or read the clock (STYLE rule 2).
FORBIDDEN_STDLIB = {
    "asyncio",
    "datetime",
    "os",
    "selectors",
    "socket",
    "sqlite3",
    "subprocess",
    "threading",
    "time",
}


def imported_modules(path: Path) -> list[str]:
    """Every module ``path`` imports, relative imports resolved against ``flcluster.core``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                names.append(node.module)
                continue
            # ``from . import x`` inside core/ is flcluster.core; each further dot climbs one package.
            package = ["flcluster", "core"][: max(0, 3 - node.level)]
            base = ".".join(package) if package else "<outside flcluster>"
            names.append(f"{base}.{node.module}" if node.module else base)
    return names


def module_is_allowed(name: str) -> bool:
    """Whether a core module may import ``name``."""
    top = name.split(".")[0]
    if top in sys.stdlib_module_names:
        return top not in FORBIDDEN_STDLIB
    if top in ALLOWED_THIRD_PARTY:
        return True
    return any(name == ok or name.startswith(ok + ".") for ok in ALLOWED_FLCLUSTER)


@pytest.mark.parametrize(
    "path", [*sorted(CORE.glob("*.py")), *PURE_OUTSIDE, *PACKAGES_ON_THE_WAY], ids=lambda p: p.name
)
def test_core_module_imports_only_the_standard_library_attrs_and_errors(path: Path) -> None:
    for name in imported_modules(path):
        assert module_is_allowed(name), (
            f"{path.name} imports {name!r}; flcluster/core must stay sans-IO "
            "(no trio, sqlite, torch, time, relative imports out of core/, ...)"
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


@pytest.mark.parametrize(
    ("source", "allowed"),
    [
        ("import time", False),
        ("from time import monotonic", False),
        ("import datetime", False),
        ("import trio", False),
        ("from torch import nn", False),
        ("from .. import runtime", False),
        ("from ..runtime import server", False),
        ("from ...x import y", False),
        ("from . import iteration", True),
        ("from .outcome import Outcome", True),
        ("import enum", True),
        ("from flcluster.errors import IllegalEvent", True),
    ],
)
def test_the_rule_catches_what_it_must(source: str, allowed: bool, tmp_path: Path) -> None:
    module = tmp_path / "probe.py"
    module.write_text(source + "\n")
    assert all(module_is_allowed(name) for name in imported_modules(module)) is allowed
