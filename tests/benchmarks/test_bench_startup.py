"""Start-up time of a four-Server cluster on loopback, next to the cost of the interpreters alone.

Each run launches ``python -m flcluster scheduler ...`` (in the background, as ``run_mobile_sched.py``
does) and ``python -m flcluster server ... --local_server_num=4 --background`` on free loopback ports,
polls the Scheduler's ``/state``, and reads the Servers' logs. Figures, in seconds, median/min/max over
``REPEATS`` runs, one line each:

- baseline: 5 Python processes started together that only ``import flcluster`` and exit. The
  package is lazy (its ``__init__`` loads neither torch nor the web stack), so this is little more
  than the interpreters; a second baseline starts 1 process importing what the Scheduler loads
  (``flcluster.cli``, ``flcluster.roles``) and 4 importing what a Server loads (those and
  ``flcluster.runtime.server``, which brings torch): the imports a cluster pays before any networking;
- first launch → ``CLUSTER_READY`` (the first ``/state`` answer that says so);
- first launch → the last of the 4 ``Server started successfully.`` lines (log time stamps);
- the Scheduler's ``listening`` line → ``CLUSTER_READY``: the time the Servers take to notice the
  Scheduler, which is where the reconnect interval shows.

Scenarios: the guide's order (the Scheduler launched first, then the Servers) and Servers first (the
Scheduler launched only once every Server has logged that it is waiting for it, so every Server sits in
its reconnect loop); each with the default ``connect_interval`` (3 s, the original's constant) and with
``--connect_interval=0.2``. The runs of all scenarios are interleaved so that load on the host spreads
evenly over them. Nothing is asserted about time: benchmarks print figures, they do not judge them.
A run in which a process of the cluster exits during start-up is a defect, not a figure: it is
printed as ``FAILED start-up`` with the end of that process's log, tried again (up to ``ATTEMPTS``
times), and the test fails after printing every figure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter
from pathlib import Path

import attrs
import httpx
import pytest

from flcluster.config import FLContext
from flcluster.launch import start_process
from flcluster.runtime.finish import pid_running
from recovery.harness import (
    REPO,
    free_port_block,
    kill_leftovers,
    started_processes,
    wait_gone,
)
from tests.helpers import free_ports

pytestmark = pytest.mark.bench

REPEATS = 3
ATTEMPTS = 3  # a run whose cluster does not come up is reported, then tried again
SERVER_NUM = 4
BASELINE_PROCESSES = 5
FAST_INTERVAL = 0.2
DEFAULT_INTERVAL: float = attrs.fields(FLContext).connect_interval.default
TIMEOUT = 180.0
POLL = 0.05
STARTED = "Server started successfully."
WAITING = "waiting for the Scheduler"
LISTENING = "listening on port"


@dataclass(frozen=True)
class Scenario:
    """One way of starting the cluster."""

    servers_first: bool
    connect_interval: float | None  # None: the default, no flag passed

    @property
    def label(self) -> str:
        """How the figures of this scenario are named."""
        order = "servers first" if self.servers_first else "guide order"
        interval = DEFAULT_INTERVAL if self.connect_interval is None else self.connect_interval
        default = " (default)" if self.connect_interval is None else ""
        return f"{order}, connect_interval={interval:g}{default}"


@dataclass(frozen=True)
class Startup:
    """The figures of one run, in seconds."""

    ready: float
    started: float
    listening_to_ready: float


SCENARIOS = [
    Scenario(servers_first=False, connect_interval=None),
    Scenario(servers_first=False, connect_interval=FAST_INTERVAL),
    Scenario(servers_first=True, connect_interval=None),
    Scenario(servers_first=True, connect_interval=FAST_INTERVAL),
]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MS_NODE_ID", None)
    return env


def _log_time(line: str) -> float:
    """The time stamp of a flcluster log line (``%(asctime)s``, local time, milliseconds)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


class StartupFailed(AssertionError):
    """A process of the cluster exited, or a step did not happen in time, during start-up."""


@dataclass
class Watched:
    """The processes of one run: a start-up step fails at once when any of them exits."""

    logs: dict[int, Path] = field(default_factory=dict)  # Server pid -> its log
    scheduler: subprocess.Popen[bytes] | None = None
    scheduler_log: Path | None = None

    def check(self) -> None:
        """Raise :class:`StartupFailed` naming the first process that is gone, with its log's last line."""
        gone = [(pid, log) for pid, log in self.logs.items() if not pid_running(pid)]
        if (
            self.scheduler is not None
            and self.scheduler_log is not None
            and self.scheduler.poll() is not None
        ):
            gone.insert(0, (self.scheduler.pid, self.scheduler_log))
        if gone:
            pid, log = gone[0]
            try:
                last = log.read_text(errors="replace").strip().splitlines()[-1:]
            except OSError as exc:
                last = [repr(exc)]
            raise StartupFailed(f"process {pid} exited during start-up; {log} ends with {last}")


def _wait_line(path: Path, text: str, deadline: float, watched: Watched) -> float:
    """Wait for the first line of ``path`` containing ``text``; return its time stamp."""
    content = ""
    while time.time() < deadline:
        with contextlib.suppress(FileNotFoundError):
            content = path.read_text(errors="replace")
        for line in content.splitlines():
            if text in line:
                return _log_time(line)
        watched.check()
        time.sleep(POLL)
    raise StartupFailed(f"{path} has no {text!r} line in {TIMEOUT}s; it reads:\n{content[-4000:]}")


def _wait_ready(manage_port: int, deadline: float, watched: Watched) -> float:
    """Poll ``/state`` until it says ``CLUSTER_READY``; return when that answer arrived."""
    last: object = None
    with httpx.Client(timeout=1.0) as client:
        while time.time() < deadline:
            try:
                last = client.get(f"http://127.0.0.1:{manage_port}/state").json().get("cluster_state")
            except httpx.HTTPError as exc:
                last = exc
            if last == "CLUSTER_READY":
                return time.time()
            watched.check()
            time.sleep(POLL)
    raise StartupFailed(f"the cluster was not ready in {TIMEOUT}s; last /state: {last!r}")


def _launch_servers(argv: Sequence[str], workdir: Path, watched: Watched) -> None:
    """Run the background launcher (it returns at once, as the guide's script); watch the Servers."""
    done = subprocess.run(
        list(argv), cwd=workdir, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    launched = started_processes(done.stdout)
    assert len(launched) == SERVER_NUM, done.stdout
    watched.logs.update(launched)


def start_cluster(workdir: Path, scenario: Scenario) -> Startup:
    """Start a Scheduler and 4 Servers as ``scenario`` says, measure, and SIGKILL them all.

    Raises:
        StartupFailed: a process exited before the cluster was up, or a step timed out.
    """
    workdir.mkdir(parents=True)
    sched_port, manage_port = free_ports(2)
    fl_port = free_port_block(SERVER_NUM)
    common = ["--scheduler_ip=127.0.0.1", f"--scheduler_port={sched_port}", f"--server_num={SERVER_NUM}"]
    sched_argv = [
        *(sys.executable, "-u", "-m", "flcluster", "scheduler"),
        *common,
        f"--scheduler_manage_port={manage_port}",
    ]
    server_argv = [
        *(sys.executable, "-m", "flcluster", "server"),
        *common,
        f"--fl_server_port={fl_port}",
        f"--local_server_num={SERVER_NUM}",
        "--background",
    ]
    if scenario.connect_interval is not None:
        server_argv.append(f"--connect_interval={scenario.connect_interval}")
    server_logs = [workdir / f"server_{i}" / "server.log" for i in range(SERVER_NUM)]
    sched_log = workdir / "scheduler" / "scheduler.log"
    watched = Watched()

    def launch_scheduler() -> None:
        watched.scheduler, launched = start_process(
            sched_argv, workdir=sched_log.parent, log_name=sched_log.name, env=_env()
        )
        watched.scheduler_log = launched.log

    try:
        start = time.time()
        deadline = start + TIMEOUT
        if scenario.servers_first:
            _launch_servers(server_argv, workdir, watched)
            for log in server_logs:
                _wait_line(log, WAITING, deadline, watched)
            launch_scheduler()
        else:
            launch_scheduler()
            _launch_servers(server_argv, workdir, watched)
        ready = _wait_ready(manage_port, deadline, watched)
        started = max(_wait_line(log, STARTED, deadline, watched) for log in server_logs)
        listening = _wait_line(sched_log, LISTENING, deadline, watched)
        return Startup(ready=ready - start, started=started - start, listening_to_ready=ready - listening)
    finally:
        for pid in watched.logs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if watched.scheduler is not None:
            watched.scheduler.kill()
            watched.scheduler.wait()
        wait_gone(list(watched.logs), timeout=10)
        kill_leftovers(sched_port)


# What the cluster's five processes import: ``flcluster`` itself is lazy (it never loads torch), so the
# brief's "import flcluster" baseline is only the interpreters; the second baseline is what each role
# really loads before it does any networking.
PLAIN_IMPORT = "import flcluster"
SCHEDULER_IMPORTS = "import flcluster.cli, flcluster.roles"
SERVER_IMPORTS = "import flcluster.cli, flcluster.roles, flcluster.runtime.server"


def import_baseline(sources: Sequence[str]) -> float:
    """Seconds for one interpreter per source, started together, to run it (imports) and exit."""
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", source], env=_env()) for source in sources]
    codes = [proc.wait(timeout=TIMEOUT) for proc in procs]
    elapsed = time.monotonic() - start
    assert codes == [0] * len(sources), list(zip(sources, codes, strict=True))
    return elapsed


def _figure(label: str, values: Sequence[float]) -> str:
    return (
        f"startup | {label:<92} | median {statistics.median(values):6.2f} s"
        f" | min {min(values):6.2f} s | max {max(values):6.2f} s | n={len(values)}"
    )


def test_bench_startup_to_cluster_ready(tmp_path: Path) -> None:
    baseline: list[float] = []
    role_baseline: list[float] = []
    runs: dict[Scenario, list[Startup]] = {s: [] for s in SCENARIOS}
    failures: list[str] = []
    for repeat in range(REPEATS):
        baseline.append(import_baseline([PLAIN_IMPORT] * BASELINE_PROCESSES))
        role_baseline.append(import_baseline([SCHEDULER_IMPORTS] + [SERVER_IMPORTS] * SERVER_NUM))
        for number, scenario in enumerate(SCENARIOS):
            for attempt in range(ATTEMPTS):
                try:
                    runs[scenario].append(
                        start_cluster(tmp_path / f"run{repeat}-{number}-{attempt}", scenario)
                    )
                    break
                except StartupFailed as exc:
                    failures.append(f"{scenario.label}, run {repeat}, attempt {attempt}: {exc}")

    lines = [
        "",
        f"startup | host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, {REPEATS} runs each",
        _figure(f"baseline: {BASELINE_PROCESSES} processes `{PLAIN_IMPORT}` and exit, together", baseline),
        _figure(
            f"baseline: 1 process with the Scheduler's imports + {SERVER_NUM} with a Server's, together",
            role_baseline,
        ),
    ]
    for scenario, found in runs.items():
        if not found:
            lines.append(f"startup | {scenario.label}: no run started")
            continue
        lines += [
            _figure(f"{scenario.label}: launch -> CLUSTER_READY", [r.ready for r in found]),
            _figure(f"{scenario.label}: launch -> 4 x '{STARTED}'", [r.started for r in found]),
            _figure(
                f"{scenario.label}: Scheduler listening -> CLUSTER_READY",
                [r.listening_to_ready for r in found],
            ),
        ]
    slow, fast = runs[SCENARIOS[2]], runs[SCENARIOS[3]]
    if slow and fast:
        for what, pick in (
            ("launch -> CLUSTER_READY", attrgetter("ready")),
            ("Scheduler listening -> CLUSTER_READY", attrgetter("listening_to_ready")),
        ):
            share = statistics.median(map(pick, slow)) - statistics.median(map(pick, fast))
            lines.append(
                f"startup | servers first: reconnect interval's share of {what}"
                f" (median at {DEFAULT_INTERVAL:g} s minus median at {FAST_INTERVAL:g} s): {share:+.2f} s"
            )
    lines += [f"startup | FAILED start-up: {failure}" for failure in failures]
    print("\n".join(lines))
    # Timing is never judged; a cluster that does not come up is a defect, reported after the figures.
    assert not failures, f"{len(failures)} start-up(s) failed:\n" + "\n".join(failures)
