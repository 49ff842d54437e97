"""The Scheduler killed with SIGKILL while its Servers serve, restarted with the guide's script.

Real processes on loopback, started with ``examples/mobile/run_mobile_sched.py`` and
``run_mobile_server.py`` and the examples' ``config.json``, whose ``recovery`` section turns the store on
(spec/recovery.md §2, §3.1, §5 ``scheduler.iterating``, §7).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from flcluster.wire.client_codec import decode_start_fl_job_response
from flcluster.wire.codes import ResponseCode
from recovery.harness import (
    copy_examples,
    free_port_block,
    kill_leftovers,
    run_script,
    started_processes,
    wait_for_log_line,
    wait_for_state,
    wait_gone,
)
from tests.helpers import free_ports

pytestmark = pytest.mark.integration


def ranks(manage_port: int) -> dict[str, str]:
    rows = httpx.get(f"http://127.0.0.1:{manage_port}/nodes", timeout=5).json()["nodeIds"]
    return {row["nodeId"]: row["rankId"] for row in rows if row["role"] == "SERVER"}


def answered(device_port: int) -> None:
    """A device request to this Server is answered (a body that is not a RequestFLJob: RequestError)."""
    answer = httpx.post(f"http://127.0.0.1:{device_port}/startFLJob", content=b"\x00" * 16, timeout=10)
    assert answer.status_code == 200
    assert decode_start_fl_job_response(answer.content).retcode == ResponseCode.RequestError


def test_a_killed_scheduler_restarts_from_its_store_and_the_servers_keep_their_ranks(tmp_path: Path) -> None:
    sched_port, manage_port = free_ports(2)
    fl_port = free_port_block(2)
    mobile = copy_examples(tmp_path)
    common = [
        "--scheduler_ip=127.0.0.1",
        f"--scheduler_port={sched_port}",
        f"--fl_server_port={fl_port}",
        "--server_num=2",
        f"--config_file_path={mobile / 'config.json'}",
    ]
    sched_args = [*common, f"--scheduler_manage_port={manage_port}", "--heartbeat_timeout=20"]
    store = mobile / "recovery.scheduler-20.sqlite"
    try:
        sched = run_script(mobile, "run_mobile_sched.py", sched_args)
        assert sched.returncode == 0, sched.stderr
        ((sched_pid, sched_log),) = started_processes(sched.stdout)
        servers = run_script(mobile, "run_mobile_server.py", [*common, "--start_fl_job_threshold=2"])
        assert servers.returncode == 0, servers.stderr
        started = started_processes(servers.stdout)
        assert len(started) == 2
        wait_for_state(manage_port, "CLUSTER_READY", timeout=120)
        for pid, log in started:
            wait_for_log_line(log, "Server started successfully.", timeout=120, pid=pid)
        before = ranks(manage_port)
        assert sorted(before.values()) == ["0", "1"]
        log_text = sched_log.read_text()
        assert f"recovery store: {store} (created)" in log_text

        os.kill(sched_pid, signal.SIGKILL)
        assert wait_gone([sched_pid]) == []
        # The Scheduler is not on the data path: both Servers answer devices while it is down.
        for i in range(2):
            answered(fl_port + i)

        again = run_script(mobile, "run_mobile_sched.py", sched_args)
        assert again.returncode == 0, again.stderr
        ((sched_pid, sched_log),) = started_processes(again.stdout)
        log_text = wait_for_log_line(sched_log, "recovered from its store", timeout=60, pid=sched_pid)
        assert f"recovery store: {store} (existing)" in log_text
        for node_id in before:
            wait_for_log_line(sched_log, f"Server {node_id!r} registered again (recovering)", timeout=60)
        wait_for_state(manage_port, "CLUSTER_READY", timeout=60)
        assert ranks(manage_port) == before
        for (pid, _log), i in zip(started, range(2), strict=True):
            assert wait_gone([pid], timeout=0.1) == [pid], "a Server stopped while the Scheduler was down"
            answered(fl_port + i)

        finish = run_script(mobile, "finish_mobile.py", [f"--scheduler_port={sched_port}"])
        assert finish.returncode == 0, finish.stderr
        assert wait_gone([sched_pid, *(pid for pid, _ in started)], timeout=10) == []

        # A store of another job (another fl_name) stops the Scheduler at start-up, naming the file.
        store_bytes = store.read_bytes()
        other = run_script(mobile, "run_mobile_sched.py", [*sched_args, "--fl_name=OtherJob"])
        ((other_pid, other_log),) = started_processes(other.stdout)
        assert wait_gone([other_pid], timeout=60) == []
        text = other_log.read_text()
        assert f"recovery store {store}: it belongs to another job or node" in text
        assert "fl_name '' (this node has 'OtherJob')" in text
        assert "Traceback" not in text
        assert [line for line in text.splitlines() if " ERROR " in line] == [text.splitlines()[-1]]
        assert store.read_bytes() == store_bytes
    finally:
        kill_leftovers(sched_port)
