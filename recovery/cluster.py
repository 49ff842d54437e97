"""A drill's cluster: the guide's scripts as real processes, killed and restarted the guide's way.

Theory of operation
-------------------
Layout of a drill's work directory::

    <workdir>/config/config.json     the one config.json every node reads (``--config_file_path``); the
                                     stores (``recovery.<role>-<id>.sqlite``, spec/recovery.md §2) and
                                     the leader's metrics.json land next to it
    <workdir>/launch-<n>/mobile/     a fresh copy of examples/mobile for every launch: the scripts
                                     recreate ``server_<i>/`` and ``scheduler/`` next to themselves, so
                                     a restart from the first copy would delete a live node's directory

A launch is one run of ``run_mobile_sched.py`` or ``run_mobile_server.py`` (the guide's scripts, which
start the node in the background and return). :meth:`DrillCluster.start` starts the Scheduler, then
either all Servers with the guide's one command (``launch="guide"``; node ids ``0 .. N-1``, ranks by
arrival) or one launch per Server with the guide's one-Server form ``--node_id=X --local_server_num=1``
(``launch="per_node"``; node ``0`` first, so that it is rank 0), which is how a single node can be
started with ``FLCLUSTER_CRASH_AT`` in its environment. :meth:`DrillCluster.restart_server` is the
guide's recovery procedure: the same node id with ``--node_id=X --local_server_num=1``, on another
device port, from a fresh launch directory; it returns how long the node took to log
``Server started successfully.``.

Every pid ever started is remembered, so :meth:`DrillCluster.leftovers` can say which are still alive
after ``finish_mobile.py``; :meth:`DrillCluster.cleanup` SIGKILLs them and anything naming the
Scheduler port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx

from flcluster.crashpoints import ENV as CRASH_ENV
from flcluster.runtime.finish import pid_running, processes_naming_port
from recovery.harness import (
    REPO,
    copy_examples,
    free_port_block,
    kill_leftovers,
    started_processes,
    wait_for_log_line,
    wait_gone,
)

__all__ = ["STARTED", "ClusterOptions", "DrillCluster", "Node"]

STARTED = "Server started successfully."
FL_NAME = "drill"


@attrs.frozen
class ClusterOptions:
    """What a drill's cluster is started with."""

    server_num: int = 3
    devices: int = 8
    fl_iteration_num: int = 4
    recovery: bool = True
    window_ms: int = 15_000
    heartbeat_timeout: float = 6.0
    launch: str = "per_node"  # or "guide"


@attrs.define
class Node:
    """One process the drill started."""

    label: str  # "scheduler" or "server <node id>"
    node_id: str
    pid: int
    log: Path
    device_port: int = 0

    @property
    def url(self) -> str:
        """The device URL of a Server."""
        return f"http://127.0.0.1:{self.device_port}"


class DrillCluster:
    """The processes of one drill (see the module docstring)."""

    def __init__(self, workdir: Path, options: ClusterOptions) -> None:
        self.workdir = workdir
        self.options = options
        self.config_dir = workdir / "config"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.config_dir / "config.json"
        config: dict[str, Any] = {"metrics": {"storage_type": 1, "storage_file_path": "metrics.json"}}
        if options.recovery:
            config["recovery"] = {"storage_type": 1, "storage_file_path": "recovery.json"}
        self.config_path.write_text(json.dumps(config, indent=4) + "\n")
        self.sched_port = free_port_block(2, host="127.0.0.1")
        self.manage_port = self.sched_port + 1
        self.fl_port = free_port_block(options.server_num, host="127.0.0.1", low=32000, high=40000)
        self.scheduler: Node | None = None
        self.servers: dict[str, Node] = {}
        self.every_pid: list[int] = []
        self._launches = 0

    # --- paths and flags ---------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        """The leader's metrics.json."""
        return self.config_dir / "metrics.json"

    def common_flags(self) -> list[str]:
        """The flags every node gets."""
        o = self.options
        return [
            "--scheduler_ip=127.0.0.1",
            f"--scheduler_port={self.sched_port}",
            f"--server_num={o.server_num}",
            f"--config_file_path={self.config_path}",
            "--heartbeat_interval=1",
            f"--heartbeat_timeout={o.heartbeat_timeout}",
            "--connect_interval=0.2",
        ]

    def server_flags(self) -> list[str]:
        """The flags of a Server (without its port and node id)."""
        o = self.options
        return [
            *self.common_flags(),
            f"--fl_name={FL_NAME}",
            f"--fl_iteration_num={o.fl_iteration_num}",
            f"--start_fl_job_threshold={o.devices}",
            "--update_model_ratio=1.0",
            f"--start_fl_job_time_window={o.window_ms}",
            f"--update_model_time_window={o.window_ms}",
            f"--global_iteration_time_window={3 * o.window_ms}",
            f"--model_keep={o.fl_iteration_num + 2}",
            "--fl_server_host=127.0.0.1",
        ]

    # --- launches ----------------------------------------------------------------------------------

    def _launch(self, script: str, args: Sequence[str], env: Mapping[str, str]) -> list[tuple[int, Path]]:
        self._launches += 1
        where = copy_examples(self.workdir / f"launch-{self._launches}")
        child = {**os.environ, "PYTHONPATH": str(REPO), **env}
        child.pop("MS_NODE_ID", None)
        if CRASH_ENV not in env:
            child.pop(CRASH_ENV, None)
        done = subprocess.run(
            [sys.executable, script, *args],
            cwd=where,
            env=child,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{script} {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}"
            )
        started = started_processes(done.stdout)
        self.every_pid += [pid for pid, _ in started]
        return started

    def start_scheduler(self, env: Mapping[str, str] | None = None) -> Node:
        """Start (or start again) the Scheduler on the drill's ports (``run_mobile_sched.py``)."""
        args = [
            *self.common_flags(),
            f"--fl_server_port={self.fl_port}",
            f"--scheduler_manage_port={self.manage_port}",
        ]
        ((pid, log),) = self._launch("run_mobile_sched.py", args, env or {})
        self.scheduler = Node("scheduler", "20", pid, log)
        return self.scheduler

    def start_server(self, node_id: str, port: int, env: Mapping[str, str] | None = None) -> Node:
        """Start one Server with the guide's one-Server form (``--node_id=X --local_server_num=1``)."""
        args = [
            *self.server_flags(),
            f"--fl_server_port={port}",
            f"--node_id={node_id}",
            "--local_server_num=1",
        ]
        ((pid, log),) = self._launch("run_mobile_server.py", args, env or {})
        node = self.servers[node_id] = Node(f"server {node_id}", node_id, pid, log, port)
        return node

    def start(self, env_for: Mapping[str, Mapping[str, str]] | None = None) -> None:
        """Start the Scheduler and every Server; ``env_for`` adds variables for one node (label → env).

        Labels: ``scheduler`` and the Servers' node ids ``"0" .. "N-1"``.
        """
        env_for = env_for or {}
        self.start_scheduler(env_for.get("scheduler"))
        n = self.options.server_num
        if self.options.launch == "guide":
            args = [*self.server_flags(), f"--fl_server_port={self.fl_port}"]
            for i, (pid, log) in enumerate(self._launch("run_mobile_server.py", args, {})):
                self.servers[str(i)] = Node(f"server {i}", str(i), pid, log, self.fl_port + i)
            return
        self.start_server("0", self.fl_port, env_for.get("0"))
        self._wait_registered("0", timeout=60)
        for i in range(1, n):
            self.start_server(str(i), self.fl_port + i, env_for.get(str(i)))

    def _wait_registered(self, node_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node_id in self.ranks():
                return
            node = self.servers.get(node_id)
            if node is not None and not pid_running(node.pid):
                return
            time.sleep(0.1)

    # --- looking -----------------------------------------------------------------------------------

    def state(self) -> str:
        """The cluster state from ``/state`` ("" when the Scheduler does not answer)."""
        try:
            answer = httpx.get(f"http://127.0.0.1:{self.manage_port}/state", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return ""
        return str(answer.get("cluster_state", ""))

    def wait_state(self, want: str, timeout: float) -> float | None:
        """Seconds until ``/state`` says ``want``, or ``None`` if it did not within ``timeout``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.state() == want:
                return time.monotonic() - start
            time.sleep(0.1)
        return None

    def ranks(self) -> dict[str, str]:
        """Node id → rank of the Servers in ``/nodes`` (empty when the Scheduler does not answer)."""
        try:
            rows = httpx.get(f"http://127.0.0.1:{self.manage_port}/nodes", timeout=2).json()["nodeIds"]
        except (httpx.HTTPError, ValueError, KeyError):
            return {}
        return {row["nodeId"]: row["rankId"] for row in rows if row.get("role") == "SERVER"}

    def alive_rows(self) -> dict[str, str]:
        """Node id → ``alive`` of every Server row in ``/nodes``."""
        try:
            rows = httpx.get(f"http://127.0.0.1:{self.manage_port}/nodes", timeout=2).json()["nodeIds"]
        except (httpx.HTTPError, ValueError, KeyError):
            return {}
        return {row["nodeId"]: row["alive"] for row in rows if row.get("role") == "SERVER"}

    def node_of_rank(self, rank: int) -> Node:
        """The Server that holds ``rank`` now."""
        for node_id, r in self.ranks().items():
            if r == str(rank) and node_id in self.servers:
                return self.servers[node_id]
        raise AssertionError(f"no Server holds rank {rank}; /nodes says {self.ranks()}")

    def wait_started(self, node: Node, timeout: float = 120) -> None:
        """Wait for a Server's ``Server started successfully.`` (fails at once if it died)."""
        wait_for_log_line(node.log, STARTED, timeout=timeout, pid=node.pid)

    # --- killing and restarting --------------------------------------------------------------------

    def kill(self, node: Node) -> None:
        """SIGKILL ``node`` and wait until it is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.pid, signal.SIGKILL)
        wait_gone([node.pid], timeout=10)

    def wait_death(self, node: Node, timeout: float) -> bool:
        """Whether ``node`` ended within ``timeout`` seconds."""
        return not wait_gone([node.pid], timeout=timeout)

    def restart_server(
        self, node_id: str, *, other_port: bool = True, timeout: float = 120
    ) -> tuple[Node, float]:
        """The guide's recovery: ``node_id`` again, one Server, another port; time until it serves."""
        old = self.servers[node_id]
        port = free_port_block(1, host="127.0.0.1", low=40000, high=44000) if other_port else old.device_port
        began = time.monotonic()
        node = self.start_server(node_id, port)
        self.wait_started(node, timeout=timeout)
        return node, time.monotonic() - began

    def restart_scheduler(self, timeout: float = 120) -> float | None:
        """The Scheduler again on its ports; seconds until the cluster is CLUSTER_READY (``None``: never)."""
        began = time.monotonic()
        self.start_scheduler()
        waited = self.wait_state("CLUSTER_READY", timeout)
        return None if waited is None else time.monotonic() - began

    # --- the end -----------------------------------------------------------------------------------

    def finish(self) -> str:
        """``finish_mobile.py --scheduler_port=...``; its output."""
        where = self.workdir / "launch-1" / "mobile"
        done = subprocess.run(
            [sys.executable, "finish_mobile.py", f"--scheduler_port={self.sched_port}", "--grace=10"],
            cwd=where,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        return done.stdout + done.stderr

    def leftovers(self, timeout: float = 15) -> list[int]:
        """Pids the drill started, or naming its Scheduler port, still alive after ``timeout``."""
        alive = wait_gone(self.every_pid, timeout=timeout)
        return sorted(set(alive) | set(processes_naming_port(self.sched_port)))

    def cleanup(self) -> None:
        """SIGKILL whatever of the drill is still running."""
        for pid in self.every_pid:
            with contextlib.suppress(ProcessLookupError):
                if pid_running(pid):
                    os.kill(pid, signal.SIGKILL)
        kill_leftovers(self.sched_port)
        wait_gone(self.every_pid, timeout=5)
