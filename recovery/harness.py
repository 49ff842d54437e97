"""The process harness: run the guide's scripts as real processes, wait for states and log lines, clean up.

Shared by the integration tests (``tests/integration``), the benchmarks and the kill-and-restart drills
of this folder, so that all of them start, watch and stop a real cluster the same way.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from flcluster.runtime.finish import pid_running, processes_naming_port

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "mobile"


def copy_examples(dest: Path) -> Path:
    """A private copy of ``examples/mobile`` (the scripts write ``server_<i>/`` next to themselves)."""
    target = dest / "mobile"
    shutil.copytree(EXAMPLES, target, ignore=shutil.ignore_patterns("server_*", "scheduler", "__pycache__"))
    return target


def run_script(
    cwd: Path, script: str, args: Sequence[str], *, prefix: Sequence[str] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python <script> <args>`` in ``cwd`` (optionally under ``prefix``, e.g. ``ip netns exec``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MS_NODE_ID", None)
    return subprocess.run(
        [*prefix, sys.executable, script, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def started_pids(output: str) -> list[int]:
    """The pids the launcher scripts print (``started ..., pid N, log ...``)."""
    return [int(p) for p in re.findall(r"pid (\d+)", output)]


def wait_for_state(
    manage_port: int, want: str, *, timeout: float = 180, host: str = "127.0.0.1"
) -> dict[str, Any]:
    """Poll ``/state`` until the cluster state is ``want``; return the last answer."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = httpx.get(f"http://{host}:{manage_port}/state", timeout=2).json()
        except httpx.HTTPError:
            last = {}
        if last.get("cluster_state") == want:
            return last
        time.sleep(0.1)
    raise AssertionError(f"cluster did not reach {want} within {timeout}s; last /state answer: {last}")


def kill_leftovers(scheduler_port: int) -> None:
    """SIGKILL anything still naming this scheduler port (test cleanup, never an assertion)."""
    for pid in processes_naming_port(scheduler_port):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def wait_gone(pids: Sequence[int], timeout: float = 20) -> list[int]:
    """Wait for the pids to end; return those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if pid_running(p)]
        time.sleep(0.05)
    return alive


def free_port_block(count: int, *, host: str = "0.0.0.0", low: int = 20000, high: int = 32000) -> int:
    """The first of ``count`` consecutive TCP ports that were all free on ``host`` a moment ago.

    The block starts at a random place in ``[low, high)`` (below Linux's ephemeral range, so outgoing
    connections do not take the ports meanwhile), which keeps concurrent test runs apart.
    """
    for _ in range(200):
        first = random.randrange(low, high - count)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind((host, port))
            except OSError:
                continue
            return first
    raise AssertionError(f"no block of {count} free ports in [{low}, {high}) on {host}")


def started_processes(output: str) -> list[tuple[int, Path]]:
    """The (pid, log) pairs the launchers print (``started ..., pid N, log PATH``)."""
    return [(int(pid), Path(log)) for pid, log in re.findall(r"pid (\d+), log (\S+)", output)]


def wait_for_log_line(path: Path, text: str, *, timeout: float = 60, pid: int | None = None) -> str:
    """Wait until the log at ``path`` contains ``text``; return the whole log.

    With ``pid`` (the process writing the log), fail at once when that process is gone without it.
    """
    deadline = time.monotonic() + timeout
    content = ""
    while True:
        gone = pid is not None and not pid_running(pid)
        with contextlib.suppress(FileNotFoundError):
            content = path.read_text(errors="replace")
        if text in content:
            return content
        if gone:
            raise AssertionError(
                f"process {pid} ended without {text!r} in {path}; it reads:\n{content[-4000:]}"
            )
        if time.monotonic() >= deadline:
            raise AssertionError(f"{path} has no {text!r} after {timeout}s; it reads:\n{content[-4000:]}")
        time.sleep(0.05)
