"""Crash points (flcluster/crashpoints.py): a child process armed at a point dies there by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from flcluster import crashpoints

CHILD = """
import sys
from flcluster.crashpoints import crash_point
for i in range(1, 6):
    crash_point("a.point")
    crash_point("other")
    print(i, flush=True)
print("done", flush=True)
"""


def run_child(armed: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != crashpoints.ENV}
    if armed is not None:
        env[crashpoints.ENV] = armed
    return subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60)


def test_an_unarmed_process_runs_through() -> None:
    out = run_child(None)
    assert out.returncode == 0 and out.stdout.split() == ["1", "2", "3", "4", "5", "done"]


@pytest.mark.parametrize(
    ("armed", "printed"), [("a.point", []), ("a.point:3", ["1", "2"]), ("x,other:2", ["1"])]
)
def test_an_armed_point_kills_the_process_at_its_hit(armed: str, printed: list[str]) -> None:
    out = run_child(armed)
    assert out.returncode == -signal.SIGKILL
    assert out.stdout.split() == printed
    assert "crash point" in out.stderr and "killing pid" in out.stderr


@pytest.mark.parametrize("bad", ["a:0", "a:x", "a:-1"])
def test_a_bad_hit_count_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="hit count"):
        crashpoints.arm(bad)
    crashpoints.arm("")
