"""Shared pieces of the ingest, memory and iteration benchmarks: processes on loopback and a load generator.

Theory of operation
-------------------
These benchmarks measure real processes on loopback, never an in-process cluster:

- :func:`open_cluster` starts ``python -m flcluster scheduler ...`` and ``python -m flcluster server ...
  --local_server_num=N --background`` (the guide's commands) on free loopback ports, waits until every
  Server has logged ``Server started successfully.``, and SIGKILLs them all on the way out. A start-up
  that loses a Server process is redone from scratch (at most ``START_ATTEMPTS`` in all) and each lost
  attempt is reported in :attr:`Cluster.failed_starts`, which every benchmark prints.
- :func:`open_bare` starts the baseline: :data:`BARE_SERVER` (``python -c``), a Quart-Trio app on
  Hypercorn with the settings :func:`flcluster.http.serving.serve_app` gives the Servers' device port,
  whose only view reads the request body and answers 200. It imports nothing of flcluster (no
  FlatBuffers, no leader, no FedAvg, no torch). For ``/startFLJob`` it answers ``start_reply`` zero
  bytes (the size of a Server's answer, which carries the model) so that a phase's downloads cost the
  same in both. Its answers are typed ``application/x-bench-bare``, which the load generator counts as
  ``HTTP 200``.
- :class:`LoadGenerator` is a separate process (``python -m tests.benchmarks.bench_util loadgen``) that
  takes one JSON command per line on stdin and answers one JSON line on stdout. It speaks HTTP/1.1 with
  keep-alive over plain trio sockets (one connection per task and target), sends pre-encoded bodies
  (an updateModel body is one FlatBuffers template with the device id spliced in, so a request costs a
  copy, not an encoding), and reads only the ``retcode`` of each answer. Each phase reports its own CPU
  time next to the wall time, and the CPU time of the processes it was told to watch, so a figure taken
  while the generator, not the server, was the bottleneck says so.

Device ids have a fixed width (``bench-00000042``): the template's id is replaced in place, which keeps
every body the same size and the FlatBuffer valid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import trio

from flcluster.aggregation import ModelSpec
from flcluster.client.lenet import make_lenet
from flcluster.launch import start_process
from flcluster.runtime.finish import pid_running
from flcluster.wire.client_codec import (
    encode_get_model_request,
    encode_start_fl_job_request,
    encode_update_model_request,
)
from flcluster.wire.codes import ResponseCode
from flcluster.wire.fbs import ResponseFLJob as fb_rsp_fl_job
from flcluster.wire.fbs import ResponseGetModel as fb_rsp_get_model
from flcluster.wire.fbs import ResponseUpdateModel as fb_rsp_update_model
from flcluster.wire.records import FLPlanParams
from flcluster.wire.server_codec import encode_start_fl_job_response
from recovery.harness import (
    REPO,
    free_port_block,
    kill_leftovers,
    started_pids,
    wait_gone,
)
from tests.helpers import FL_NAME, free_ports

STARTED = "Server started successfully."
STARTUP_TIMEOUT = 180.0
START_ATTEMPTS = 3
HOUR_MS = 3_600_000
ID_WIDTH = 8
ID_BYTES = len(f"bench-{0:0{ID_WIDTH}d}")
RECEIVE = 1 << 18
SUCCEED = "SUCCEED"
HTTP_200 = "HTTP 200"
SAFEMODE = "The cluster is in safemode."
BARE_CONTENT_TYPE = "application/x-bench-bare"


# ------------------------------------------------------------------------------------------- the model


def lenet_spec() -> ModelSpec:
    """LeNet-5's tensors, as every Server started by :func:`open_cluster` has them."""
    return ModelSpec.from_module(make_lenet(seed=0))


def device_id(index: int) -> str:
    """The fixed-width id of synthetic device ``index``."""
    return f"bench-{index:0{ID_WIDTH}d}"


def update_template(iteration: int, seed: int = 0) -> tuple[bytes, int]:
    """An updateModel body of LeNet's size for ``device_id(0)``, and the offset of that id in it."""
    spec = lenet_spec()
    rng = np.random.default_rng(seed)
    maps = [
        (name, rng.random(size, dtype=np.float32)) for name, size in zip(spec.names, spec.sizes, strict=True)
    ]
    body = encode_update_model_request(
        fl_name=FL_NAME, fl_id=device_id(0), iteration=iteration, feature_maps=maps, timestamp="0"
    )
    marker = device_id(0).encode()
    offset = body.find(marker)
    assert offset >= 0 and body.find(marker, offset + 1) < 0, "the template's device id must occur once"
    return body, offset


def update_body_bytes() -> int:
    """The size of one LeNet updateModel body (every device's is the same size)."""
    return len(update_template(1)[0])


def start_reply_bytes() -> int:
    """The size of a Server's startFLJob answer for LeNet (it carries the whole model)."""
    spec = lenet_spec()
    maps = [
        (name, np.zeros(size, dtype=np.float32)) for name, size in zip(spec.names, spec.sizes, strict=True)
    ]
    return len(
        encode_start_fl_job_response(
            retcode=int(ResponseCode.SUCCEED),
            reason="success",
            iteration=1,
            is_selected=True,
            next_req_time=str(int(time.time() * 1000)),
            fl_plan=FLPlanParams(fl_name=FL_NAME, iterations=1),
            feature_maps=maps,
        )
    )


# --------------------------------------------------------------------------------------- /proc readers


def _proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {key} line")


def rss_bytes(pid: int) -> int:
    """``VmRSS`` of ``pid``, in bytes."""
    return _proc_status(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    """``VmHWM`` (the peak resident set) of ``pid``, in bytes."""
    return _proc_status(pid, "VmHWM") * 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (``/proc/<pid>/stat`` fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------- processes


def log_time(line: str) -> float:
    """The epoch time stamp of a flcluster log line (``%(asctime)s``: local time, milliseconds)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def first_log_time(paths: Sequence[Path], text: str) -> float | None:
    """The time stamp of the first line containing ``text`` in any of ``paths`` (None: no such line)."""
    found = [
        log_time(line)
        for path in paths
        if path.exists()
        for line in path.read_text(errors="replace").splitlines()
        if text in line
    ]
    return min(found, default=None)


def child_env() -> dict[str, str]:
    """The environment for the processes the benchmarks start (this checkout first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MS_NODE_ID", None)
    return env


class ServerDied(AssertionError):
    """A Server process ended before it logged ``Server started successfully.``."""


def wait_started(log: Path, pid: int, timeout: float = STARTUP_TIMEOUT) -> None:
    """Wait for a Server's ``Server started successfully.``.

    Raises:
        ServerDied: the process ended first (the message quotes its log).
        AssertionError: the line did not come within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    content = ""
    while True:
        alive = pid_running(pid)
        with contextlib.suppress(FileNotFoundError):
            content = log.read_text(errors="replace")
        if STARTED in content:
            return
        if not alive:
            raise ServerDied(f"Server pid {pid} ended before it started; {log} reads:\n{content[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{log} has no {STARTED!r} after {timeout:.0f} s; it reads:\n{content[-4000:]}"
            )
        time.sleep(0.05)


@dataclass(frozen=True)
class Cluster:
    """A Scheduler and Servers started by :func:`open_cluster`.

    Attributes:
        urls: the Servers' device URLs, in port order.
        server_pids: the Servers' pids, in the same order.
        workdir: where they run (``scheduler/``, ``server_<i>/``).
        failed_starts: the last log line of each earlier start-up attempt that lost a Server (empty when
            the first attempt worked); benchmarks print them.
    """

    urls: list[str]
    server_pids: list[int]
    workdir: Path
    failed_starts: list[str] = field(default_factory=list)

    def logs(self) -> list[Path]:
        """The Servers' logs, in device-port order."""
        return [self.workdir / f"server_{i}" / "server.log" for i in range(len(self.urls))]


@contextlib.contextmanager
def open_cluster(
    workdir: Path,
    *,
    server_num: int,
    threshold: int,
    iterations: int = 2,
    window_ms: int = HOUR_MS,
    env: dict[str, str] | None = None,
    recovery: bool = False,
) -> Iterator[Cluster]:
    """Start a Scheduler and ``server_num`` Servers for LeNet on loopback; SIGKILL them all afterwards.

    A start-up in which a Server process ends before it has started is thrown away and tried again,
    from scratch on fresh ports, up to ``START_ATTEMPTS`` times; what the lost Server logged last is
    kept in :attr:`Cluster.failed_starts` so that the benchmark prints it (it is a fault of the cluster,
    not of the measurement, and must stay visible).

    Args:
        workdir: where the processes run and log (``scheduler/``, ``server_<i>/``; ``attempt<k>/`` for
            the attempts after the first).
        server_num: how many Servers (one process each, ``--local_server_num=server_num --background``).
        threshold: ``start_fl_job_threshold`` (``update_model_ratio`` stays 1.0).
        iterations: ``fl_iteration_num``.
        window_ms: both round windows; the global window is twice as long.
        env: variables to set for the Servers (on top of this process's environment).
        recovery: give every node a ``config.json`` with the ``recovery`` section, so each keeps its
            SQLite recovery store in ``workdir`` (spec/recovery.md).
    """
    failed: list[str] = []
    for attempt in range(1, START_ATTEMPTS + 1):
        where = workdir if attempt == 1 else workdir / f"attempt{attempt}"
        launch = _launched(where, server_num, threshold, iterations, window_ms, env or {}, recovery)
        with launch as (urls, pids):
            try:
                for i, pid in enumerate(pids):
                    wait_started(where / f"server_{i}" / "server.log", pid)
            except ServerDied as exc:
                lines = str(exc).strip().splitlines()
                failed.append(f"attempt {attempt}: {lines[0].split(';')[0]}: {lines[-1]}")
                if attempt == START_ATTEMPTS:
                    raise
                continue
            yield Cluster(urls=urls, server_pids=pids, workdir=where, failed_starts=failed)
            return


@contextlib.contextmanager
def _launched(
    workdir: Path,
    server_num: int,
    threshold: int,
    iterations: int,
    window_ms: int,
    env: dict[str, str],
    recovery: bool,
) -> Iterator[tuple[list[str], list[int]]]:
    """Launch the Scheduler and the Servers (the guide's commands); yield the device URLs and pids."""
    workdir.mkdir(parents=True, exist_ok=True)
    sched_port, manage_port = free_ports(2)
    fl_port = free_port_block(server_num, host="127.0.0.1")
    common = ["--scheduler_ip=127.0.0.1", f"--scheduler_port={sched_port}", f"--server_num={server_num}"]
    if recovery:
        config = workdir / "config.json"
        config.write_text(json.dumps({"recovery": {"storage_type": 1, "storage_file_path": "recovery.json"}}))
        common.append(f"--config_file_path={config}")
    sched_argv = [
        *(sys.executable, "-u", "-m", "flcluster", "scheduler"),
        *common,
        f"--scheduler_manage_port={manage_port}",
    ]
    server_argv = [
        *(sys.executable, "-m", "flcluster", "server"),
        *common,
        f"--fl_server_port={fl_port}",
        "--fl_server_host=127.0.0.1",
        f"--fl_name={FL_NAME}",
        f"--fl_iteration_num={iterations}",
        f"--start_fl_job_threshold={threshold}",
        f"--start_fl_job_time_window={window_ms}",
        f"--update_model_time_window={window_ms}",
        f"--global_iteration_time_window={2 * window_ms}",
        "--connect_interval=0.2",
        f"--local_server_num={server_num}",
        "--background",
    ]
    sched, _ = start_process(
        sched_argv, workdir=workdir / "scheduler", log_name="scheduler.log", env=child_env()
    )
    pids: list[int] = []
    try:
        launched = subprocess.run(
            server_argv,
            cwd=workdir,
            env={**child_env(), **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        pids = started_pids(launched.stdout)
        assert launched.returncode == 0 and len(pids) == server_num, launched.stdout + launched.stderr
        yield [f"http://127.0.0.1:{fl_port + i}" for i in range(server_num)], pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sched.kill()
        sched.wait()
        wait_gone(pids, timeout=10)
        kill_leftovers(sched_port)


BARE_SERVER = """
import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

START_REPLY = bytes(int(sys.argv[1]))
CONTENT_TYPE = sys.argv[2]
app = QuartTrio("bench-bare")
app.config["MAX_CONTENT_LENGTH"] = 64 * 1024 * 1024


@app.route("/<name>", methods=["GET", "POST", "PUT"])
async def round_(name):
    body = await request.get_data(cache=False, as_text=False)
    assert body
    return Response(START_REPLY if name == "startFLJob" else b"", status=200, content_type=CONTENT_TYPE)


async def main():
    config = Config()  # as flcluster.http.serving.serve_app configures the Servers' device port
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 75.0
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve, app, config)
        print(urls[0], flush=True)


trio.run(main)
"""
"""The baseline endpoint's program (``python -c``): Hypercorn + Quart-Trio and nothing of flcluster.

It imports no flcluster module (so no torch either): its CPU and memory are the HTTP stack's alone.
"""


@dataclass(frozen=True)
class Bare:
    """Baseline endpoints started by :func:`open_bare`."""

    urls: list[str]
    pids: list[int]


@contextlib.contextmanager
def open_bare(workdir: Path, *, count: int = 1, start_reply: int = 0) -> Iterator[Bare]:
    """Start ``count`` bare Hypercorn + Quart-Trio processes on loopback (port 0); kill them afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(count):
            with open(workdir / f"bare_{i}.log", "w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", BARE_SERVER, str(start_reply), BARE_CONTENT_TYPE],
                        cwd=REPO,
                        env=child_env(),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=log,
                        text=True,
                    )
                )
        urls = []
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("http://"), f"the bare endpoint did not report its URL: {line!r}"
            urls.append(line)
        yield Bare(urls=urls, pids=[p.pid for p in procs])
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


# ------------------------------------------------------------------------------- the load generator (driver)


@dataclass(frozen=True)
class PhaseResult:
    """What the load generator measured for one phase.

    Attributes:
        op: ``startFLJob``, ``updateModel`` or ``getModel``.
        requests: requests answered (retries included).
        outcomes: answers by kind: ``SUCCEED`` or another retcode name, ``HTTP <status>``, ``text: ...``.
        first_sent: epoch seconds when the first request went out.
        last_answered: epoch seconds when the last answer was in.
        wall: seconds from the phase's start to its end (monotonic clock).
        client_cpu: CPU seconds the load generator spent in the phase.
        watched_cpu: CPU seconds each watched pid spent over the command (by pid, as a string).
        body_bytes: request body bytes sent.
        answered_at: getModel only: epoch seconds at which each URL first answered SUCCEED.
        per_url: requests answered by each URL.
    """

    op: str
    requests: int
    outcomes: dict[str, int]
    first_sent: float
    last_answered: float
    wall: float
    client_cpu: float
    watched_cpu: dict[str, float] = field(default_factory=dict)
    body_bytes: int = 0
    answered_at: dict[str, float] = field(default_factory=dict)
    per_url: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Requests per second over the phase."""
        return self.requests / self.wall

    @property
    def megabytes_per_s(self) -> float:
        """Request body megabytes (10^6 bytes) per second over the phase."""
        return self.body_bytes / self.wall / 1e6

    @property
    def client_load(self) -> float:
        """The load generator's CPU time as a fraction of the phase's wall time (1.0 = one core)."""
        return self.client_cpu / self.wall

    def watched_load(self, pid: int) -> float:
        """A watched process's CPU time as a fraction of the phase's wall time."""
        return self.watched_cpu[str(pid)] / self.wall

    def only(self, outcome: str) -> bool:
        """Whether every answer was ``outcome``."""
        return set(self.outcomes) == {outcome}


def phase_spec(
    op: str,
    urls: Sequence[str],
    *,
    first: int = 0,
    count: int = 0,
    concurrency: int = 16,
    iteration: int = 1,
    seed: int = 0,
    timeout: float = 600.0,
    poll: float = 0.005,
) -> dict[str, Any]:
    """One phase for :meth:`LoadGenerator.sequence` (the arguments are those of :meth:`LoadGenerator.run`)."""
    return {
        "op": op,
        "urls": list(urls),
        "first": first,
        "count": count,
        "concurrency": concurrency,
        "iteration": iteration,
        "seed": seed,
        "timeout": timeout,
        "poll": poll,
    }


class LoadGenerator:
    """The load generator process: ``run(...)`` sends one command and waits for its figures."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(workdir / "loadgen.log", "w")  # noqa: SIM115 (closed in close())
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.benchmarks.bench_util", "loadgen"],
            cwd=REPO,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.pid = self._proc.pid

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, command: dict[str, Any]) -> Any:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise AssertionError(f"the load generator exited ({self._proc.wait()}); see its loadgen.log")
        answer = json.loads(line)
        if "error" in answer:
            raise AssertionError(f"the load generator failed: {answer['error']}")
        return answer

    def run(
        self,
        op: str,
        urls: Sequence[str],
        *,
        first: int = 0,
        count: int = 0,
        concurrency: int = 16,
        iteration: int = 1,
        seed: int = 0,
        watch: Sequence[int] = (),
        timeout: float = 600.0,
        poll: float = 0.005,
    ) -> PhaseResult:
        """Run one phase: ``count`` devices from ``first`` send ``op`` to random ``urls``.

        ``getModel`` instead polls every URL for ``iteration``'s model until each answers SUCCEED.
        """
        spec = phase_spec(
            op,
            urls,
            first=first,
            count=count,
            concurrency=concurrency,
            iteration=iteration,
            seed=seed,
            timeout=timeout,
            poll=poll,
        )
        return self.sequence([spec], watch=watch)[0]

    def sequence(self, phases: Sequence[dict[str, Any]], *, watch: Sequence[int] = ()) -> list[PhaseResult]:
        """Run phases back to back in the generator (no round trip to this process between them)."""
        answer = self._send({"phases": list(phases), "watch": list(watch)})
        return [PhaseResult(**result) for result in answer["results"]]

    def close(self) -> None:
        """Stop the generator (end of its stdin) and wait for it."""
        if self._proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._log.close()


# ------------------------------------------------------------------------------- the load generator (process)


_RESPONSE_ROOTS: dict[str, Any] = {
    "startFLJob": fb_rsp_fl_job.ResponseFLJob,
    "updateModel": fb_rsp_update_model.ResponseUpdateModel,
    "getModel": fb_rsp_get_model.ResponseGetModel,
}


class _Connection:
    """One keep-alive HTTP/1.1 connection: send a request, read one answer (``content-length`` framed)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.closing = False  # the server said ``connection: close``

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(RECEIVE)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    async def exchange(self, request: bytes) -> tuple[int, str, bytes]:
        await self.stream.send_all(request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        lines = bytes(self.buffer[:end]).decode("latin-1").lower().split("\r\n")
        del self.buffer[: end + 4]
        status = int(lines[0].split(" ", 2)[1])
        headers = dict(line.split(":", 1) for line in lines[1:])
        if "content-length" not in headers:
            raise ConnectionError(f"an answer without content-length: {lines!r}")
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            await self._fill()
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        self.closing = headers.get("connection", "").strip() == "close"
        return status, headers.get("content-type", "").strip(), body


class _Phase:
    """One phase of the load generator (see :meth:`LoadGenerator.run`)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.op: str = spec["op"]
        self.urls: list[str] = spec["urls"]
        self.first: int = spec["first"]
        self.count: int = spec["count"]
        self.concurrency: int = spec["concurrency"]
        self.iteration: int = spec["iteration"]
        self.timeout: float = spec["timeout"]
        self.poll: float = spec["poll"]
        rng = random.Random(spec["seed"])
        self.routes = [rng.randrange(len(self.urls)) for _ in range(self.count)]
        self.heads = [self._head(url) for url in self.urls]
        self.addresses = [(urlsplit(u).hostname or "127.0.0.1", urlsplit(u).port or 80) for u in self.urls]
        self.outcomes: Counter[str] = Counter()
        self.per_url: Counter[str] = Counter()
        self.requests = 0
        self.body_bytes = 0
        self.first_sent = 0.0
        self.last_answered = 0.0
        self.answered_at: dict[str, float] = {}
        self._template = b""
        self._offset = 0
        self._bodies: list[bytes] = []
        match self.op:
            case "updateModel":
                self._template, self._offset = update_template(self.iteration)
            case "startFLJob":
                self._bodies = [
                    encode_start_fl_job_request(
                        fl_name=FL_NAME,
                        fl_id=device_id(index),
                        iteration=self.iteration,
                        data_size=1 + index % 64,
                        timestamp="0",
                    )
                    for index in range(self.first, self.first + self.count)
                ]
            case "getModel":
                self._bodies = [
                    encode_get_model_request(fl_name=FL_NAME, iteration=self.iteration, timestamp="0")
                ]
            case _:
                raise ValueError(f"unknown op {self.op!r}; expected startFLJob, updateModel or getModel")

    def _head(self, url: str) -> str:
        parts = urlsplit(url)
        return (
            f"POST {parts.path}/{self.op} HTTP/1.1\r\nhost: {parts.netloc}\r\n"
            "content-type: application/octet-stream\r\n"
        )

    def request(self, target: int, index: int) -> tuple[bytes, int]:
        """The request bytes for device ``index`` (``index`` is unused by getModel) and its body size."""
        match self.op:
            case "updateModel":
                t, o = self._template, self._offset
                body = b"".join((t[:o], device_id(index).encode(), t[o + ID_BYTES :]))
            case "startFLJob":
                body = self._bodies[index - self.first]
            case _:
                body = self._bodies[0]
        head = f"{self.heads[target]}content-length: {len(body)}\r\n\r\n".encode()
        return head + body, len(body)

    def classify(self, status: int, content_type: str, body: bytes) -> str:
        if status != 200:
            return f"HTTP {status}"
        if content_type.startswith("text/plain"):
            return "text: " + body[:80].decode(errors="replace")
        if content_type.startswith(BARE_CONTENT_TYPE):
            return HTTP_200
        # Only the retcode, through the generated accessor: a full decode of a startFLJob answer (the
        # whole model) would cost the generator more than the Server's encoding of it.
        code = int(_RESPONSE_ROOTS[self.op].GetRootAs(body, 0).Retcode())
        try:
            return ResponseCode(code).name
        except ValueError:
            return f"retcode {code}"

    async def send(self, conns: dict[int, _Connection], target: int, index: int) -> str:
        """Send one request on this task's connection to ``target`` (opened on first use)."""
        conn = conns.get(target)
        if conn is not None and conn.closing:
            await conn.stream.aclose()
            conn = None
        if conn is None:
            conn = conns[target] = _Connection(await trio.open_tcp_stream(*self.addresses[target]))
        request, size = self.request(target, index)
        if not self.first_sent:
            self.first_sent = time.time()
        status, content_type, body = await conn.exchange(request)
        self.last_answered = time.time()
        self.requests += 1
        self.per_url[self.urls[target]] += 1
        self.body_bytes += size
        return self.classify(status, content_type, body)

    async def run(self) -> None:
        with trio.fail_after(self.timeout):
            if self.op == "getModel":
                async with trio.open_nursery() as nursery:
                    for target in range(len(self.urls)):
                        nursery.start_soon(self._poll, target)
                return
            indexes = iter(range(self.first, self.first + self.count))
            async with trio.open_nursery() as nursery:
                for _ in range(min(self.concurrency, self.count)):
                    nursery.start_soon(self._work, indexes)

    async def _work(self, indexes: Iterator[int]) -> None:
        conns: dict[int, _Connection] = {}
        try:
            for index in indexes:
                target = self.routes[index - self.first]
                while True:
                    outcome = await self.send(conns, target, index)
                    self.outcomes[outcome] += 1
                    if outcome != f"text: {SAFEMODE}":
                        break
                    # As a device does: the cluster is between iterations; ask again shortly.
                    await trio.sleep(self.poll)
        finally:
            for conn in conns.values():
                await conn.stream.aclose()

    async def _poll(self, target: int) -> None:
        conns: dict[int, _Connection] = {}
        try:
            while True:
                outcome = await self.send(conns, target, 0)
                self.outcomes[outcome] += 1
                if outcome == SUCCEED:
                    self.answered_at[self.urls[target]] = self.last_answered
                    return
                await trio.sleep(self.poll)
        finally:
            for conn in conns.values():
                await conn.stream.aclose()


async def _run_phases(phases: list[_Phase]) -> list[dict[str, Any]]:
    results = []
    for phase in phases:
        cpu, start = time.process_time(), time.monotonic()
        await phase.run()
        results.append(
            {
                "op": phase.op,
                "requests": phase.requests,
                "outcomes": dict(phase.outcomes),
                "first_sent": phase.first_sent,
                "last_answered": phase.last_answered,
                "wall": time.monotonic() - start,
                "client_cpu": time.process_time() - cpu,
                "body_bytes": phase.body_bytes,
                "answered_at": phase.answered_at,
                "per_url": dict(phase.per_url),
            }
        )
    return results


def _loadgen_main() -> None:
    for line in sys.stdin:
        try:
            command = json.loads(line)
            phases = [_Phase(spec) for spec in command["phases"]]  # bodies are prepared before the clock
            watch = [int(pid) for pid in command["watch"]]
            before = {pid: cpu_seconds(pid) for pid in watch}
            results = trio.run(_run_phases, phases)
            watched = {str(pid): cpu_seconds(pid) - before[pid] for pid in watch}
            for result in results:
                result["watched_cpu"] = watched
            answer: dict[str, Any] = {"results": results}
        except Exception:
            answer = {"error": traceback.format_exc()}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> None:
    """``loadgen``: the load generator (commands on stdin, figures on stdout)."""
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_util")
    sub = parser.add_subparsers(dest="role", required=True)
    sub.add_parser("loadgen")
    parser.parse_args(argv)
    _loadgen_main()


if __name__ == "__main__":
    main()
