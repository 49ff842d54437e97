"""Shared test helpers: free ports, in-process clusters."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from flcluster.aggregation import ModelSpec, ModelWeights
from flcluster.client.lenet import make_lenet
from flcluster.core.iteration import IterationConfig
from flcluster.runtime.scheduler import SchedulerNode, SchedulerSettings
from flcluster.runtime.server import JobSettings, ServerNode, ServerSettings
from flcluster.wire.records import FLPlanParams


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


def lenet_job(threshold: int, iterations: int, **windows: int) -> JobSettings:
    module = make_lenet(seed=0)
    spec = ModelSpec.from_module(module)
    return JobSettings(
        spec=spec,
        initial=ModelWeights.from_state_dict(module.state_dict(), spec),
        iteration=IterationConfig(
            start_fl_job_threshold=threshold,
            update_model_ratio=1.0,
            start_fl_job_time_window=windows.get("start", 60_000),
            update_model_time_window=windows.get("update", 60_000),
            global_iteration_time_window=windows.get("global", 600_000),
            fl_iteration_num=iterations,
        ),
        plan=FLPlanParams(fl_name=FL_NAME, iterations=iterations),
    )


@asynccontextmanager
async def cluster(server_num: int, job: Callable[[], JobSettings]) -> AsyncIterator[list[str]]:
    """A Scheduler and ``server_num`` Servers in this process; yields the Servers' base URLs."""
    ports = free_ports(server_num)
    scheduler = SchedulerNode(SchedulerSettings(node_id="20", server_num=server_num, port=0, manage_port=0))
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(scheduler.serve)
        servers = [
            ServerNode(
                ServerSettings(
                    node_id=str(i),
                    server_num=server_num,
                    fl_iteration_num=job().iteration.fl_iteration_num,
                    scheduler_port=addrs.port,
                    device_port=ports[i],
                    device_host="127.0.0.1",
                    connect_interval=0.05,
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
