"""A whole cluster (Scheduler + 4 Servers) in one trio process, over real loopback sockets."""

from __future__ import annotations

import gc
import socket

import httpx
import pytest
import trio

from flcluster.core.cluster import ClusterState
from flcluster.errors import ConfigError
from flcluster.runtime.scheduler import SchedulerNode
from flcluster.runtime.server import ServerNode
from flcluster.wire.client_codec import decode_start_fl_job_response
from flcluster.wire.codes import ResponseCode
from tests.helpers import lenet_job, loopback_scheduler, loopback_server, open_cluster


async def test_four_servers_form_a_ready_cluster() -> None:
    async with open_cluster(4, lambda: lenet_job(threshold=8, iterations=20)) as cluster:
        servers = cluster.servers
        async with httpx.AsyncClient() as client:
            nodes = (await client.get(f"{cluster.manage_url}/nodes")).json()
            state = (await client.get(f"{cluster.manage_url}/state")).json()
            device = await client.post(f"{cluster.urls[0]}/startFLJob", content=b"x")
        assert state["cluster_state"] == "CLUSTER_READY"
        assert all(s.cluster_state is ClusterState.CLUSTER_READY for s in servers)
        assert sorted(r["nodeId"] for r in nodes["nodeIds"]) == ["0", "1", "2", "20", "3"]
        assert all(r["alive"] == "true" for r in nodes["nodeIds"])
        answer = decode_start_fl_job_response(device.content)
        assert answer.retcode == ResponseCode.RequestError
        assert answer.reason.startswith("The schema of RequestFLJob is invalid.")
        assert {s.rank for s in servers} == {0, 1, 2, 3}
        assert [started.rank for started in cluster.started] == [s.rank for s in servers]


# Hypercorn does not close the socket it failed to bind (hypercorn/config.py _create_sockets); the
# garbage collector reports it as unraisable. Nothing of ours leaks.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_taken_device_port_is_refused_with_a_clear_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        scheduler = SchedulerNode(loopback_scheduler(1))
        with pytest.RaisesGroup(
            pytest.RaisesExc(ConfigError, match=f"fl_server_port={port}"), flatten_subgroups=True
        ):
            async with trio.open_nursery() as nursery:
                addresses = await nursery.start(scheduler.serve)
                server = ServerNode(
                    loopback_server("0", 1, scheduler_port=addresses.port, device_port=port), lenet_job(1, 1)
                )
                with trio.fail_after(30):
                    await server.serve()
    gc.collect()  # hypercorn's unclosed socket is reported here, under this test's filter
