"""flcluster/secure is pure: stdlib without I/O or clock, attrs, numpy, cryptography, flcluster.errors.

The Servers' trio layer and the device SDK both call it; a fresh interpreter that imports it must load
none of the I/O libraries.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SECURE = Path(__file__).resolve().parents[3] / "flcluster" / "secure"
ALLOWED = {"__future__", "collections", "math", "secrets", "typing", "attrs", "numpy", "cryptography"}
ALLOWED_FLCLUSTER = {"flcluster.errors", "flcluster.secure"}


def imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            names.append(node.module or "")
    return names


@pytest.mark.parametrize("path", sorted(SECURE.glob("*.py")), ids=lambda p: p.name)
def test_every_import_is_allowed(path: Path) -> None:
    for name in imports(path):
        if name.startswith("flcluster"):
            assert any(name == ok or name.startswith(ok + ".") for ok in ALLOWED_FLCLUSTER), (path.name, name)
        else:
            assert name.split(".")[0] in ALLOWED, (path.name, name)


def test_importing_it_loads_no_io_library() -> None:
    code = (
        "import sys, flcluster.secure, flcluster.secure.bound;"
        "bad = [m for m in ('trio', 'quart', 'hypercorn', 'sqlite3', 'torch', 'httpx') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
