"""Shared test helpers: free ports, settings built from an FLContext, in-process clusters."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import trio

from flcluster.config import FLContext
from flcluster.runtime.scheduler import SchedulerNode, SchedulerSettings
from flcluster.runtime.server import JobSettings, ServerNode, ServerSettings
from flcluster.settings import job_settings, scheduler_settings, server_settings


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free on loopback a moment ago."""
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


FL_NAME = "Lenet"


LOOPBACK = "127.0.0.1"


def loopback_scheduler(server_num: int, **context: object) -> SchedulerSettings:
    """A Scheduler's settings from an FLContext on loopback (node id ``"20"``), on ports the OS picks.

    ``context`` is any other FLContext keywords. FLContext refuses port 0 (an operator names a port); the
    runtime accepts it, so the derived settings take 0 for the cluster and management ports.
    """
    ctx = FLContext.from_kwargs(ms_role="MS_SCHED", server_num=server_num, scheduler_ip=LOOPBACK, **context)
    return attrs.evolve(scheduler_settings(ctx, "20"), port=0, manage_port=0)


def loopback_server(
    node_id: str, server_num: int, *, scheduler_port: int, device_port: int, **context: object
) -> ServerSettings:
    """A Server's settings from an FLContext: loopback, reconnecting every 50 ms; ``context`` is the rest."""
    ctx = FLContext.from_kwargs(
        server_num=server_num,
        scheduler_ip=LOOPBACK,
        scheduler_port=scheduler_port,
        fl_server_port=device_port,
        fl_server_host=LOOPBACK,
        connect_interval=0.05,
        **context,
    )
    return server_settings(ctx, node_id)


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


@asynccontextmanager
async def cluster(server_num: int, job: Callable[[], JobSettings]) -> AsyncIterator[list[str]]:
    """A Scheduler and ``server_num`` Servers in this process; yields the Servers' base URLs."""
    ports = free_ports(server_num)
    scheduler = SchedulerNode(loopback_scheduler(server_num))
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(scheduler.serve)
        servers = [
            ServerNode(
                loopback_server(
                    str(i),
                    server_num,
                    scheduler_port=addrs.port,
                    device_port=ports[i],
                    fl_iteration_num=job().iteration.fl_iteration_num,
                ),
                job(),
            )
            for i in range(server_num)
        ]
        for server in servers:
            nursery.start_soon(server.serve)
        for server in servers:
            await server.wait_started()
        yield [f"http://127.0.0.1:{p}" for p in ports]
        nursery.cancel_scope.cancel()
