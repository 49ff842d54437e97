"""Benchmarks run on request only: ``nox -s bench``, ``pytest tests/benchmarks``, or ``-m bench``.

They take minutes and print figures rather than assert, so a plain ``pytest`` from the repository root
reports them as skipped (with the command that runs them) instead of spending that time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _requested(config: pytest.Config) -> bool:
    """Whether this run names the benchmarks: a path inside this folder, or ``bench`` in ``-m``."""
    if "bench" in (config.getoption("markexpr") or ""):
        return True
    base = config.invocation_params.dir
    for arg in config.args:
        path = (base / arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``bench`` items unless the benchmarks were asked for."""
    if _requested(config):
        return
    skip = pytest.mark.skip(reason="benchmark: run with `nox -s bench` or `pytest tests/benchmarks -s`")
    for item in items:
        if item.get_closest_marker("bench") is not None:
            item.add_marker(skip)
