"""A whole cluster (Scheduler + 4 Servers) in one trio process, over real loopback sockets."""

from __future__ import annotations

import httpx

from flcluster.core.cluster import ClusterState
from flcluster.wire.client_codec import decode_start_fl_job_response
from flcluster.wire.codes import ResponseCode
from tests.helpers import lenet_job, open_cluster


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
