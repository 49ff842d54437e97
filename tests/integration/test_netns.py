"""The guide's two-node deployment across real network namespaces.

Namespace A plays "node 1" (the Scheduler and three Servers), namespace B plays "node 2" (one Server);
a veth pair joins them on a private /24 (``10.201.<pid % 256>.1`` and ``.2``). Each namespace has its
own port space, so the guide's ports (6667, 6668, 11202) are used exactly as written, and the guide's
two-node commands run with real addresses. The namespaces share this host's PID namespace and file
system, so the pids the launchers print and the logs they write can be checked from here.

What it shows (spec/cluster-protocol.md §3, §5, §6 and the node ids of ``flcluster.launch``):

- the Server in B registers with B's address, so its node id is ``<B addr>-6668``;
- the cluster reaches ``CLUSTER_READY`` with 4 Servers alive plus the Scheduler, seen from A's
  management port (loopback of A, as the guide queries it "on the machine where the scheduler is");
- B's device port answers the device protocol inside B and across the veth from A;
- ``finish_mobile.py`` run in A ends every process of both namespaces: A's through the tool, B's
  through the Scheduler's ``shutdown``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flcluster.runtime.finish import pid_running, processes_naming_port
from flcluster.wire.client_codec import decode_start_fl_job_response
from flcluster.wire.codes import ResponseCode
from recovery.harness import (
    copy_examples,
    run_script,
    started_pids,
    started_processes,
    wait_for_log_line,
    wait_gone,
)

pytestmark = [pytest.mark.netns, pytest.mark.integration]

SCHED_PORT = 6667
FL_PORT = 6668
MANAGE_PORT = 11202
STARTED = "Server started successfully."
# Generous: on a loaded host the launchers and Servers spend tens of seconds importing (torch, quart).
LAUNCH_TIMEOUT = 180
READY_TIMEOUT = 300
SCHEMA_INVALID = "The schema of RequestFLJob is invalid."

# Run inside A: poll the management port until CLUSTER_READY with every node alive; print the answers.
POLL_READY = """\
import json, sys, time
import httpx

base, want, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
last = {}
while time.monotonic() < deadline:
    try:
        state = httpx.get(base + "/state", timeout=2).json()
        nodes = httpx.get(base + "/nodes", timeout=2).json()
    except httpx.HTTPError as exc:
        last = {"error": repr(exc)}
    else:
        last = {"state": state, "nodes": nodes}
        rows = nodes.get("nodeIds", [])
        if (
            state.get("cluster_state") == "CLUSTER_READY"
            and len(rows) == want
            and all(row["alive"] == "true" for row in rows)
        ):
            print(json.dumps(last))
            sys.exit(0)
    time.sleep(0.1)
print(json.dumps(last))
sys.exit(1)
"""

# Run inside a namespace: POST a body (hex) to a device URL; print the status and the body (base64).
POST_DEVICE = """\
import base64, json, sys
import httpx

answer = httpx.post(sys.argv[1], content=bytes.fromhex(sys.argv[2]), timeout=10)
print(json.dumps({"status": answer.status_code, "body": base64.b64encode(answer.content).decode()}))
"""


@dataclass(frozen=True)
class Node:
    """One network namespace playing a host of the guide."""

    name: str
    addr: str

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside this namespace."""
        return ["ip", "netns", "exec", self.name]


def _ip(*args: str) -> None:
    """Run ``ip <args>``; a failure is a setup error that names the command and its message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def in_namespace(pid: int, name: str) -> bool:
    """Whether process ``pid`` lives in network namespace ``name`` (what ``ip netns pids`` checks)."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return False


def netns_pids(name: str) -> list[int]:
    """The live (not zombie) processes inside network namespace ``name``."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return sorted(pid for pid in pids if in_namespace(pid, name) and pid_running(pid))


def _remove_namespace(name: str) -> None:
    """SIGKILL whatever still runs inside ``name`` (only our cluster can be there), then delete it."""
    for pid in netns_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_gone(netns_pids(name), timeout=10)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)


@pytest.fixture
def two_nodes() -> Iterator[tuple[Node, Node]]:
    """Namespaces A and B joined by a veth pair, loopback up in both; removed with all they hold."""
    pid = os.getpid()
    subnet = f"10.201.{pid % 256}"
    node1 = Node(f"flcluster-a-{pid}", f"{subnet}.1")
    node2 = Node(f"flcluster-b-{pid}", f"{subnet}.2")
    veth1, veth2 = f"flca{pid}", f"flcb{pid}"  # at most 15 characters, unique while this pid lives
    # Leftovers of an earlier run that had this pid and died before its finaliser ran.
    for name in (node1.name, node2.name):
        if Path(f"/run/netns/{name}").exists():
            _remove_namespace(name)
    try:
        made = subprocess.run(
            ["ip", "netns", "add", node1.name], capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError:
        pytest.skip("network namespaces cannot be made: there is no `ip` command")
    if made.returncode != 0:
        pytest.skip(f"network namespaces cannot be made (`ip netns add` needs root): {made.stderr.strip()}")
    created = [node1.name]
    try:
        _ip("netns", "add", node2.name)
        created.append(node2.name)
        probe = subprocess.run(
            [*node1.prefix, "true"], capture_output=True, text=True, timeout=30, check=False
        )
        if probe.returncode != 0:
            pytest.skip(f"network namespaces cannot be entered (`ip netns exec`): {probe.stderr.strip()}")
        subprocess.run(["ip", "link", "del", veth1], capture_output=True, timeout=30, check=False)  # stale
        _ip("link", "add", veth1, "type", "veth", "peer", "name", veth2)
        for node, veth in ((node1, veth1), (node2, veth2)):
            _ip("link", "set", veth, "netns", node.name)
            _ip("-n", node.name, "addr", "add", f"{node.addr}/24", "dev", veth)
            _ip("-n", node.name, "link", "set", veth, "up")
            _ip("-n", node.name, "link", "set", "lo", "up")
        yield node1, node2
    finally:
        for name in created:
            _remove_namespace(name)
        # Only left in this namespace when setup failed between creating the pair and moving it.
        subprocess.run(["ip", "link", "del", veth1], capture_output=True, timeout=30, check=False)


def _run_probe(
    node: Node, tmp_path: Path, name: str, code: str, *args: str, timeout: float
) -> tuple[Any, int]:
    """Run ``code`` with this interpreter inside ``node``; return the JSON it prints last, and its status."""
    probes = tmp_path / "probes"
    probes.mkdir(exist_ok=True)
    (probes / f"{name}.py").write_text(code)
    done = run_script(probes, f"{name}.py", list(args), prefix=node.prefix, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    assert lines, f"the probe in {node.name} printed nothing (exit {done.returncode}): {done.stderr}"
    return json.loads(lines[-1]), done.returncode


def _log_tails(*roots: Path) -> str:
    """The end of every log under ``roots``, for failure messages."""
    parts = [
        f"--- {log}\n{log.read_text(errors='replace')[-2000:]}"
        for root in roots
        for log in sorted(root.glob("*/*.log"))
    ]
    return "\n".join(parts)


def test_two_node_deployment_over_network_namespaces(tmp_path: Path, two_nodes: tuple[Node, Node]) -> None:
    node1, node2 = two_nodes
    mobile1 = copy_examples(tmp_path / "node1")
    mobile2 = copy_examples(tmp_path / "node2")
    common = [
        f"--scheduler_ip={node1.addr}",
        f"--scheduler_port={SCHED_PORT}",
        f"--fl_server_port={FL_PORT}",
        "--server_num=4",
    ]
    sched = run_script(
        mobile1,
        "run_mobile_sched.py",
        [*common, f"--scheduler_manage_port={MANAGE_PORT}", f"--config_file_path={mobile1 / 'config.json'}"],
        prefix=node1.prefix,
        timeout=LAUNCH_TIMEOUT,
    )
    assert sched.returncode == 0, sched.stderr
    servers1 = run_script(
        mobile1,
        "run_mobile_server.py",
        [
            *common,
            "--start_fl_job_threshold=8",
            "--local_server_num=3",
            f"--config_file_path={mobile1 / 'config.json'}",
        ],
        prefix=node1.prefix,
        timeout=LAUNCH_TIMEOUT,
    )
    assert servers1.returncode == 0, servers1.stderr
    servers2 = run_script(
        mobile2,
        "run_mobile_server.py",
        [
            *common,
            "--start_fl_job_threshold=8",
            "--local_server_num=1",
            f"--config_file_path={mobile2 / 'config.json'}",
        ],
        prefix=node2.prefix,
        timeout=LAUNCH_TIMEOUT,
    )
    assert servers2.returncode == 0, servers2.stderr
    pids1 = started_pids(sched.stdout + servers1.stdout)
    pids2 = started_pids(servers2.stdout)
    assert len(pids1) == 4 and len(pids2) == 1
    assert set(netns_pids(node1.name)) >= set(pids1) and set(netns_pids(node2.name)) >= set(pids2), (
        "a launched process is not running in its namespace\n" + _log_tails(mobile1, mobile2)
    )

    # From inside A, as the guide queries the Scheduler's management port on its own machine.
    answer, code = _run_probe(
        node1,
        tmp_path,
        "poll_ready",
        POLL_READY,
        f"http://127.0.0.1:{MANAGE_PORT}",
        "5",
        str(READY_TIMEOUT),
        timeout=READY_TIMEOUT + 60,
    )
    assert code == 0, f"not ready; last answers seen from A: {answer}\n" + _log_tails(mobile1, mobile2)
    rows = {row["nodeId"]: row for row in answer["nodes"]["nodeIds"]}
    b_id = f"{node2.addr}-{FL_PORT}"
    server_ids = {*(f"{node1.addr}-{FL_PORT + i}" for i in range(3)), b_id}
    assert set(rows) == {*server_ids, "20"}
    assert rows["20"] == {"alive": "true", "nodeId": "20", "rankId": "0", "role": "SCHEDULER"}
    assert sorted(rows[n]["rankId"] for n in server_ids) == ["0", "1", "2", "3"]
    assert all(rows[n]["role"] == "SERVER" for n in server_ids)

    # B registered with its own address, reached over the veth.
    sched_log = (mobile1 / "scheduler" / "scheduler.log").read_text()
    assert re.search(rf"Server '{re.escape(b_id)}' registered from {re.escape(node2.addr)}:\d+", sched_log), (
        sched_log
    )
    for pid, log in started_processes(servers1.stdout + servers2.stdout):
        wait_for_log_line(log, STARTED, timeout=60, pid=pid)

    # B's device port answers the device protocol inside B, and from A across the veth: a body that is
    # no RequestFLJob gets a ResponseFLJob refusing it (spec/device-protocol.md), an empty one the
    # original's HTTP 500.
    device_url = f"http://{node2.addr}:{FL_PORT}/startFLJob"
    for node in (node2, node1):
        reply, code = _run_probe(
            node, tmp_path, "post_device", POST_DEVICE, device_url, "00" * 16, timeout=60
        )
        assert code == 0 and reply["status"] == 200, (node.name, reply)
        refused = decode_start_fl_job_response(base64.b64decode(reply["body"]))
        assert refused.retcode == ResponseCode.RequestError, (node.name, refused)
        assert refused.reason.startswith(SCHEMA_INVALID), (node.name, refused)
    reply, code = _run_probe(node2, tmp_path, "post_device", POST_DEVICE, device_url, "", timeout=60)
    assert reply["status"] == 500, reply
    assert json.loads(base64.b64decode(reply["body"])) == {
        "error_message": "Get post message failed",
        "code": "1",
    }

    finish = run_script(
        mobile1,
        "finish_mobile.py",
        [f"--scheduler_port={SCHED_PORT}", f"--scheduler_ip={node1.addr}"],
        prefix=node1.prefix,
        timeout=90,
    )
    assert finish.returncode == 0, finish.stderr
    killed = [int(p) for p in re.findall(r"^killed (\d+)$", finish.stdout, re.MULTILINE)]
    # The tool waits for the processes of its own host. B's Server ends on the Scheduler's shutdown;
    # the namespaces share one process table, so the tool may also see it end (a real second host's
    # processes are invisible to it).
    assert set(pids1) <= set(killed) <= set(pids1 + pids2), finish.stdout + finish.stderr
    assert wait_gone(pids1 + pids2, timeout=20) == []
    assert "Scheduler exits" in (mobile1 / "scheduler" / "scheduler.log").read_text()
    assert netns_pids(node1.name) == [] and netns_pids(node2.name) == []
    naming = processes_naming_port(SCHED_PORT)  # the host's own clusters may use 6667 too: only ours count
    assert [p for p in naming if in_namespace(p, node1.name) or in_namespace(p, node2.name)] == []
