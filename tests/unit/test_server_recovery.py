"""Server restarts mid-iteration resume from their recovery store (spec/recovery.md §5.1, §5.3).

In one process: a Scheduler and two Servers, each with its own store (SQLite on ``tmp_path``). A Server's
``serve`` is cancelled mid-iteration (its store closed as on a crash: every answered commit is on disk)
and a new :class:`ServerNode` with the same node id and store file is started; the iteration then
completes with the exact FedAvg of the acknowledged updates.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import httpx
import numpy as np
import trio

from flcluster.runtime.scheduler import SchedulerNode
from flcluster.runtime.server import JobSettings, ServerNode, ServerSettings
from flcluster.wire.client_codec import (
    decode_start_fl_job_response,
    decode_update_model_response,
    encode_start_fl_job_request,
    encode_update_model_request,
)
from flcluster.wire.codes import ResponseCode
from tests.helpers import FL_NAME, free_ports, lenet_job, loopback_scheduler, loopback_server

SIZES = {"a": 3, "b": 5, "c": 7}
VALUES = {"a": 1.0, "b": 2.0, "c": 4.0}


class Cluster:
    def __init__(self, nursery: trio.Nursery, tmp_path: Path, scheduler_port: int) -> None:
        self.nursery = nursery
        self.tmp = tmp_path
        self.scheduler_port = scheduler_port
        self.ports = free_ports(2)
        self.scopes: dict[str, trio.CancelScope] = {}
        self.nodes: dict[str, ServerNode] = {}

    def settings(self, node_id: str) -> ServerSettings:
        base = loopback_server(
            node_id,
            2,
            scheduler_port=self.scheduler_port,
            device_port=self.ports[int(node_id)],
            fl_iteration_num=5,
        )
        return attrs.evolve(base, store_path=str(self.tmp / f"recovery.server-{node_id}.sqlite"))

    async def start(self, node_id: str, job: JobSettings) -> ServerNode:
        node = ServerNode(self.settings(node_id), job)
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await node.serve()

        self.nodes[node_id], self.scopes[node_id] = node, scope
        self.nursery.start_soon(run)
        return node

    def url(self, node_id: str) -> str:
        return f"http://127.0.0.1:{self.ports[int(node_id)]}"


async def start_jobs(client: httpx.AsyncClient, url: str) -> None:
    for fl_id, size in SIZES.items():
        body = encode_start_fl_job_request(
            fl_name=FL_NAME, fl_id=fl_id, iteration=1, data_size=size, timestamp="t"
        )
        answer = decode_start_fl_job_response((await client.post(f"{url}/startFLJob", content=body)).content)
        assert answer.retcode == ResponseCode.SUCCEED, answer.reason


async def upload(client: httpx.AsyncClient, url: str, job: JobSettings, fl_id: str) -> int:
    maps = [
        (n, np.full(s, VALUES[fl_id], np.float32))
        for n, s in zip(job.spec.names, job.spec.sizes, strict=True)
    ]
    body = encode_update_model_request(
        fl_name=FL_NAME, fl_id=fl_id, iteration=1, feature_maps=maps, timestamp="t"
    )
    raw = (await client.post(f"{url}/updateModel", content=body)).content
    if raw.startswith(b"The cluster is in safemode"):
        return -1
    return decode_update_model_response(raw).retcode


def expected_value() -> float:
    # A device uploads its weights already multiplied by its data size (spec/aggregation.md).
    return sum(VALUES.values()) / sum(SIZES.values())


async def run_restart(tmp_path: Path, restarted: str) -> None:
    job = lenet_job(3, 5, update=30_000)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=30) as client:
        scheduler = SchedulerNode(loopback_scheduler(2))
        addrs = await nursery.start(scheduler.serve)
        c = Cluster(nursery, tmp_path, addrs.port)
        for node_id in ("0", "1"):
            await c.start(node_id, lenet_job(3, 5, update=30_000))
        for node in list(c.nodes.values()):
            with trio.fail_after(20):
                await node.wait_started()
        leader_id = next(i for i, n in c.nodes.items() if n.rank == 0)
        follower_id = next(i for i in c.nodes if i != leader_id)
        victim = leader_id if restarted == "leader" else follower_id
        survivor = follower_id if victim == leader_id else leader_id
        await start_jobs(client, c.url(leader_id))
        # a and b land on the Server that is killed: acknowledged, committed in its store.
        assert await upload(client, c.url(victim), job, "a") == ResponseCode.SUCCEED
        assert await upload(client, c.url(victim), job, "b") == ResponseCode.SUCCEED
        c.scopes[victim].cancel()
        await trio.sleep(0.2)
        back = await c.start(victim, lenet_job(3, 5, update=30_000))
        with trio.fail_after(30):
            await back.wait_started()
            # The repeat of an acknowledged update is refused, never folded twice.
            assert await upload(client, c.url(victim), job, "a") != ResponseCode.SUCCEED
            # c completes the iteration: 3 confirmed updates, two of them from before the restart.
            # The survivor may still be re-linking to a restarted leader (it answers safemode then).
            for _attempt in range(200):
                code = await upload(client, c.url(survivor), job, "c")
                if code == ResponseCode.SUCCEED:
                    break
                await trio.sleep(0.05)
            assert code == ResponseCode.SUCCEED
            leader = c.nodes[leader_id].leader
            assert leader is not None
            assert await leader.wait_ended(1), (leader.machine.failed, code)
        for node in c.nodes.values():
            model = node.rounds.store.get(1)
            assert model is not None
            for name in job.spec.names:
                np.testing.assert_allclose(model[name].numpy(), expected_value(), rtol=1e-6)
        nursery.cancel_scope.cancel()


async def test_a_follower_restarted_mid_iteration_keeps_its_acknowledged_updates(tmp_path: Path) -> None:
    await run_restart(tmp_path, "follower")


async def test_the_leader_restarted_mid_iteration_keeps_every_acknowledged_update(tmp_path: Path) -> None:
    await run_restart(tmp_path, "leader")
