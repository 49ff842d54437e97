"""``flcluster finish`` when nodes do not answer: it falls back to signals and leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flcluster.runtime.finish import processes_naming_port
from recovery.harness import REPO, kill_leftovers, started_pids, wait_for_state, wait_gone
from tests.helpers import free_ports

pytestmark = pytest.mark.integration


def flcluster(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MS_NODE_ID", None)
    return subprocess.run(
        [sys.executable, "-m", "flcluster", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cluster(
    tmp_path: Path, sched_port: int, manage_port: int, fl_port: int
) -> tuple[subprocess.Popen[bytes], list[int]]:
    common = ["--scheduler_ip=127.0.0.1", f"--scheduler_port={sched_port}", "--server_num=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MS_NODE_ID": "20"}
    with open(tmp_path / "scheduler.log", "wb") as log:
        scheduler = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flcluster",
                "scheduler",
                *common,
                f"--scheduler_manage_port={manage_port}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    servers = flcluster(tmp_path, "server", *common, f"--fl_server_port={fl_port}", "--background")
    assert servers.returncode == 0, servers.stderr
    wait_for_state(manage_port, "CLUSTER_READY")
    return scheduler, [scheduler.pid, *started_pids(servers.stdout)]


def test_a_server_that_does_not_answer_is_signalled(tmp_path: Path) -> None:
    sched_port, manage_port = free_ports(2)
    fl_port = 22000 + sched_port % 20000
    try:
        scheduler, pids = start_cluster(tmp_path, sched_port, manage_port, fl_port)
        stuck = pids[1]
        os.kill(stuck, signal.SIGSTOP)  # a Server that cannot answer the shutdown
        finish = flcluster(tmp_path, "finish", f"--scheduler_port={sched_port}", "--grace=2")
        assert finish.returncode == 0, finish.stderr
        killed = {int(p) for p in re.findall(r"^killed (\d+)$", finish.stdout, re.MULTILINE)}
        assert killed == set(pids)
        assert f"process {stuck} did not end on its own" in finish.stderr
        assert scheduler.wait(timeout=5) == 0
        assert wait_gone(pids, timeout=5) == []
    finally:
        kill_leftovers(sched_port)


def test_without_a_scheduler_finish_signals_every_process_naming_the_port(tmp_path: Path) -> None:
    sched_port, manage_port = free_ports(2)
    fl_port = 23000 + sched_port % 20000
    try:
        scheduler, pids = start_cluster(tmp_path, sched_port, manage_port, fl_port)
        scheduler.kill()  # the Scheduler is gone; the Servers keep running
        scheduler.wait(timeout=5)
        finish = flcluster(tmp_path, "finish", f"--scheduler_port={sched_port}", "--grace=2")
        assert finish.returncode == 0, finish.stderr
        assert "falling back to signals" in finish.stderr
        killed = {int(p) for p in re.findall(r"^killed (\d+)$", finish.stdout, re.MULTILINE)}
        assert set(pids[1:]) <= killed
        assert wait_gone(pids, timeout=5) == []
        assert processes_naming_port(sched_port) == []
    finally:
        kill_leftovers(sched_port)
