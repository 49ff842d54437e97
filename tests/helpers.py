"""Shared test helpers: settings built from an FLContext, and in-process clusters on ports the OS picks.

:func:`open_cluster` is the one way a test runs a whole cluster (a Scheduler and N Servers) in its own
trio process, over real loopback sockets: every listener binds port 0 and the bound addresses come back
through ``task_status`` (the Scheduler's :class:`~flcluster.runtime.scheduler.SchedulerAddresses`, each
Server's :class:`~flcluster.runtime.server.ServerStarted`), so no test guesses a free port. Each Server
runs in a cancel scope of its own, so a test can take one away (``cluster.stop(i)``) as a crash would.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial

import attrs
import trio

from flcluster.config import ClusterConfig, FLContext
from flcluster.runtime.scheduler import SchedulerAddresses, SchedulerNode, SchedulerSettings
from flcluster.runtime.server import JobSettings, ServerNode, ServerSettings, ServerStarted
from flcluster.settings import job_settings, scheduler_settings, server_settings


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free on loopback a moment ago.

    Only for real processes, which must be told their ports before they start (the guide's flags); an
    in-process listener binds port 0 and reports what it got (:func:`open_cluster`).
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


FL_NAME = "Lenet"


LOOPBACK = "127.0.0.1"


def loopback_scheduler(
    server_num: int, *, cluster_config: ClusterConfig | None = None, **context: object
) -> SchedulerSettings:
    """A Scheduler's settings from an FLContext on loopback (node id ``"20"``), on ports the OS picks.

    ``context`` is any other FLContext keywords; ``cluster_config`` stands for ``config.json`` (TLS files,
    the management token). FLContext refuses port 0 (an operator names a port); the runtime accepts it, so
    the derived settings take 0 for the cluster and management ports.
    """
    ctx = FLContext.from_kwargs(ms_role="MS_SCHED", server_num=server_num, scheduler_ip=LOOPBACK, **context)
    return attrs.evolve(scheduler_settings(ctx, "20", cluster_config), port=0, manage_port=0)


def loopback_server(
    node_id: str,
    server_num: int,
    *,
    scheduler_port: int,
    device_port: int = 0,
    cluster_config: ClusterConfig | None = None,
    **context: object,
) -> ServerSettings:
    """A Server's settings from an FLContext: loopback, reconnecting every 50 ms; ``context`` is the rest.

    ``device_port=0`` (the default) lets the OS pick the device port; the Server reports the bound URL
    in its :class:`~flcluster.runtime.server.ServerStarted`. ``cluster_config`` stands for ``config.json``.
    """
    ctx = FLContext.from_kwargs(
        server_num=server_num,
        scheduler_ip=LOOPBACK,
        scheduler_port=scheduler_port,
        fl_server_host=LOOPBACK,
        connect_interval=0.05,
        **({"fl_server_port": device_port} if device_port else {}),
        **context,
    )
    return attrs.evolve(server_settings(ctx, node_id, cluster_config), device_port=device_port)


def lenet_context(threshold: int, iterations: int, **windows: int) -> FLContext:
    """The FL context of a LeNet job: ``threshold`` devices per iteration, windows in ms."""
    return FLContext(
        fl_name=FL_NAME,
        fl_iteration_num=iterations,
        start_fl_job_threshold=threshold,
        start_fl_job_time_window=windows.get("start", 60_000),
        update_model_time_window=windows.get("update", 60_000),
        global_iteration_time_window=windows.get("global", 600_000),
    )


def lenet_job(threshold: int, iterations: int, **windows: int) -> JobSettings:
    """The job of :func:`lenet_context`: LeNet5 with seed 0, aggregated on the CPU."""
    return job_settings(lenet_context(threshold, iterations, **windows))


#: How long an in-process cluster may take to form (a loaded 2-core machine included).
STARTUP_TIMEOUT = 60.0


@attrs.frozen
class InProcessCluster:
    """A Scheduler and its Servers running in this trio process (see :func:`open_cluster`).

    Attributes:
        scheduler: The Scheduler node.
        addresses: Its bound cluster and management addresses.
        servers: The Servers, node ids ``"0"``, ``"1"``, ... (ranks by order of arrival).
        started: What each Server reported once up: rank, peer port, bound device URLs.
        scopes: Each Server's cancel scope (cancelling one takes that Server away, sums and all).
    """

    scheduler: SchedulerNode
    addresses: SchedulerAddresses
    servers: list[ServerNode]
    started: list[ServerStarted]
    scopes: list[trio.CancelScope]

    @property
    def urls(self) -> list[str]:
        """Each Server's device base URL, in node-id order."""
        return [started.device_urls[0] for started in self.started]

    @property
    def manage_url(self) -> str:
        """The Scheduler's management base URL."""
        return self.addresses.manage_urls[0]

    def url_of(self, server: ServerNode) -> str:
        """The device base URL of one of this cluster's Servers."""
        return self.urls[self.servers.index(server)]

    def by_rank(self) -> list[ServerNode]:
        """The Servers in rank order (the leader first)."""
        return sorted(self.servers, key=lambda s: -1 if s.rank is None else s.rank)

    def stop(self, index: int) -> None:
        """Take Server ``index`` away, as if its process died (its link and port close at once)."""
        self.scopes[index].cancel()


async def _serve_in(
    server: ServerNode, scope: trio.CancelScope, *, task_status: trio.TaskStatus[ServerStarted]
) -> None:
    with scope:
        await server.serve(task_status=task_status)


@asynccontextmanager
async def open_cluster(
    server_num: int,
    job: Callable[[], JobSettings],
    *,
    scheduler_context: dict[str, object] | None = None,
    cluster_config: ClusterConfig | None = None,
    **server_context: object,
) -> AsyncIterator[InProcessCluster]:
    """Run a Scheduler and ``server_num`` Servers in this process until the block ends.

    Args:
        server_num: Servers in the cluster.
        job: Makes each Server's job (called once per Server).
        scheduler_context: FLContext keywords for the Scheduler (e.g. ``max_message_size``).
        cluster_config: Every node's ``config.json`` (e.g. TLS files: pass ``enable_ssl=True`` in both
            contexts too).
        server_context: FLContext keywords for every Server (e.g. ``max_device_body``).

    Yields the cluster once every Server has logged ``Server started successfully.``.
    """
    scheduler = SchedulerNode(
        loopback_scheduler(server_num, cluster_config=cluster_config, **(scheduler_context or {}))
    )
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(scheduler.serve)
        jobs = [job() for _ in range(server_num)]
        servers = [
            ServerNode(
                loopback_server(
                    str(i),
                    server_num,
                    scheduler_port=addresses.port,
                    fl_iteration_num=jobs[i].iteration.fl_iteration_num,
                    cluster_config=cluster_config,
                    **server_context,
                ),
                jobs[i],
            )
            for i in range(server_num)
        ]
        scopes = [trio.CancelScope() for _ in servers]
        started: list[ServerStarted | None] = [None] * server_num

        async def start(i: int) -> None:
            # Each Server reports started only once the whole cluster is ready: start them together.
            started[i] = await nursery.start(partial(_serve_in, servers[i], scopes[i]))

        with trio.fail_after(STARTUP_TIMEOUT):
            async with trio.open_nursery() as starters:
                for i in range(server_num):
                    starters.start_soon(start, i)
        reported = [s for s in started if s is not None]
        assert len(reported) == server_num
        yield InProcessCluster(scheduler, addresses, servers, reported, scopes)
        nursery.cancel_scope.cancel()
