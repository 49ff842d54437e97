"""The guide's commands, as written (with 127.0.0.1), against real processes on loopback."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flcluster.runtime.finish import processes_naming_port
from flcluster.wire.client_codec import decode_start_fl_job_response
from flcluster.wire.codes import ResponseCode
from recovery.harness import (
    copy_examples,
    kill_leftovers,
    run_script,
    started_pids,
    wait_for_log_line,
    wait_for_state,
    wait_gone,
)
from tests.helpers import free_ports

pytestmark = pytest.mark.integration


@pytest.fixture
def ports() -> Iterator[tuple[int, int, int]]:
    """(scheduler_port, fl_server_port, scheduler_manage_port): the guide's when free, else free ones."""
    guide = (6667, 6668, 11202)
    candidates = free_ports(8)
    chosen = (
        guide
        if all(p not in _busy() for p in (*guide, 6669, 6670, 6671))
        else (
            candidates[0],
            20000 + candidates[1] % 20000,
            candidates[2],
        )
    )
    yield chosen
    kill_leftovers(chosen[0])


def _busy() -> set[int]:
    import socket

    busy = set()
    for port in (6667, 6668, 6669, 6670, 6671, 11202):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.add(port)
    return busy


def test_guide_commands_build_ready_cluster_and_finish_cleanly(
    tmp_path: Path, ports: tuple[int, int, int]
) -> None:
    sched_port, fl_port, manage_port = ports
    mobile = copy_examples(tmp_path)
    config = f"--config_file_path={mobile / 'config.json'}"
    sched = run_script(
        mobile,
        "run_mobile_sched.py",
        [
            "--scheduler_ip=127.0.0.1",
            f"--scheduler_port={sched_port}",
            f"--fl_server_port={fl_port}",
            "--server_num=4",
            f"--scheduler_manage_port={manage_port}",
            config,
        ],
    )
    assert sched.returncode == 0, sched.stderr
    servers = run_script(
        mobile,
        "run_mobile_server.py",
        [
            "--scheduler_ip=127.0.0.1",
            f"--scheduler_port={sched_port}",
            f"--fl_server_port={fl_port}",
            "--server_num=4",
            "--start_fl_job_threshold=8",
            config,
        ],
    )
    assert servers.returncode == 0, servers.stderr
    pids = started_pids(sched.stdout) + started_pids(servers.stdout)
    assert len(pids) == 5

    wait_for_state(manage_port, "CLUSTER_READY")
    nodes = httpx.get(f"http://127.0.0.1:{manage_port}/nodes").json()
    assert nodes["code"] == "0" and nodes["message"] == "Get nodes info successful."
    rows = {row["nodeId"]: row for row in nodes["nodeIds"]}
    assert set(rows) == {"0", "1", "2", "3", "20"}
    assert rows["20"] == {"alive": "true", "nodeId": "20", "rankId": "0", "role": "SCHEDULER"}
    assert sorted(rows[n]["rankId"] for n in "0123") == ["0", "1", "2", "3"]
    assert all(rows[n]["alive"] == "true" and rows[n]["role"] == "SERVER" for n in "0123")
    for i in range(4):
        # CLUSTER_READY comes first; each Server logs its start once its role is up and its device port
        # open (with recovery on, after its store has its first commit).
        wait_for_log_line(mobile / f"server_{i}" / "server.log", "Server started successfully.")
        # Every Server serves the rounds: a body that is not a RequestFLJob gets the protocol's error.
        answer = httpx.post(f"http://127.0.0.1:{fl_port + i}/startFLJob", content=b"\x00" * 16)
        assert answer.status_code == 200
        assert decode_start_fl_job_response(answer.content).retcode == ResponseCode.RequestError

    finish = run_script(mobile, "finish_mobile.py", [f"--scheduler_port={sched_port}"])
    assert finish.returncode == 0, finish.stderr
    killed = [int(p) for p in re.findall(r"^killed (\d+)$", finish.stdout, re.MULTILINE)]
    assert sorted(killed) == sorted(pids)
    assert wait_gone(pids, timeout=5) == []
    assert processes_naming_port(sched_port) == []
    assert "Scheduler exits" in (mobile / "scheduler" / "scheduler.log").read_text()


def test_servers_split_over_two_launches_form_one_cluster(tmp_path: Path) -> None:
    """The two-node form on one host: 3 Servers from one command, 1 from another (its own ports)."""
    sched_port, manage_port = free_ports(2)
    fl_port = 21000 + sched_port % 20000
    mobile = copy_examples(tmp_path)
    common = ["--scheduler_ip=127.0.0.1", f"--scheduler_port={sched_port}", "--server_num=4"]
    try:
        sched = run_script(
            mobile,
            "run_mobile_sched.py",
            [*common, f"--fl_server_port={fl_port}", f"--scheduler_manage_port={manage_port}"],
        )
        first = run_script(
            mobile, "run_mobile_server.py", [*common, f"--fl_server_port={fl_port}", "--local_server_num=3"]
        )
        # The second "host" launches from its own directory, as it would on its own machine.
        (tmp_path / "node2").mkdir()
        other = copy_examples(tmp_path / "node2")
        second = run_script(
            other,
            "run_mobile_server.py",
            [*common, f"--fl_server_port={fl_port + 3}", "--local_server_num=1"],
        )
        pids = started_pids(sched.stdout + first.stdout + second.stdout)
        wait_for_state(manage_port, "CLUSTER_READY")
        ids = sorted(
            r["nodeId"] for r in httpx.get(f"http://127.0.0.1:{manage_port}/nodes").json()["nodeIds"]
        )
        assert ids == sorted([*(f"127.0.0.1-{fl_port + i}" for i in range(4)), "20"])
        finish = run_script(mobile, "finish_mobile.py", [f"--scheduler_port={sched_port}"])
        assert finish.returncode == 0, finish.stderr
        assert wait_gone(pids, timeout=5) == []
    finally:
        kill_leftovers(sched_port)
