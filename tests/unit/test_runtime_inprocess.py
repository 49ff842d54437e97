"""A whole cluster (Scheduler + 4 Servers) in one trio process, over real loopback sockets."""

from __future__ import annotations

import httpx
import trio

from flcluster.core.cluster import ClusterState
from flcluster.runtime.scheduler import SchedulerNode
from flcluster.runtime.server import ServerNode
from flcluster.wire.client_codec import decode_start_fl_job_response
from flcluster.wire.codes import ResponseCode
from tests.helpers import free_ports, lenet_job, loopback_scheduler, loopback_server


async def test_four_servers_form_a_ready_cluster() -> None:
    ports = free_ports(5)
    scheduler = SchedulerNode(loopback_scheduler(4))
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(scheduler.serve)
        servers = [
            ServerNode(
                loopback_server(
                    str(i), 4, scheduler_port=addrs.port, device_port=ports[i], fl_iteration_num=20
                ),
                lenet_job(threshold=8, iterations=20),
            )
            for i in range(4)
        ]
        with trio.fail_after(20):
            for server in servers:
                nursery.start_soon(server.serve)
            for server in servers:
                await server.wait_started()
            async with httpx.AsyncClient() as client:
                nodes = (await client.get(f"{addrs.manage_urls[0]}/nodes")).json()
                state = (await client.get(f"{addrs.manage_urls[0]}/state")).json()
                device = await client.post(f"http://127.0.0.1:{ports[0]}/startFLJob", content=b"x")
        assert state["cluster_state"] == "CLUSTER_READY"
        assert all(s.cluster_state is ClusterState.CLUSTER_READY for s in servers)
        assert sorted(r["nodeId"] for r in nodes["nodeIds"]) == ["0", "1", "2", "20", "3"]
        assert all(r["alive"] == "true" for r in nodes["nodeIds"])
        answer = decode_start_fl_job_response(device.content)
        assert answer.retcode == ResponseCode.RequestError
        assert answer.reason.startswith("The schema of RequestFLJob is invalid.")
        assert {s.rank for s in servers} == {0, 1, 2, 3}
        nursery.cancel_scope.cancel()
