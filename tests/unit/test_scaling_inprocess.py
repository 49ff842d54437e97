"""Scaling with real Servers in this process (spec/cluster-protocol.md §8): the barrier holds new iterations,
a new Server joins, a scaled-in Server stops serving, and every model is FedAvg of the acknowledged updates.

The cluster is :func:`tests.helpers.open_cluster` on loopback; devices are plain HTTP requests made here,
each uploading a constant (the data size is its weight), so FedAvg is known exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import numpy as np
import trio
import trio.testing

from flcluster.core.cluster import ClusterState
from flcluster.runtime.server import ServerNode
from flcluster.wire.client_codec import (
    decode_start_fl_job_response,
    decode_update_model_response,
    encode_get_model_request,
    encode_start_fl_job_request,
    encode_update_model_request,
)
from flcluster.wire.codes import SAFEMODE_TEXT, ResponseCode
from tests.helpers import (
    FL_NAME,
    InProcessCluster,
    lenet_job,
    loopback_server,
    open_cluster,
)

THRESHOLD = 2
ITERATIONS = 6


def job() -> object:
    return lenet_job(THRESHOLD, ITERATIONS)


class Devices:
    """Plain device requests against the cluster's Servers."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.spec = lenet_job(THRESHOLD, ITERATIONS).spec

    async def start(self, url: str, fl_id: str, iteration: int, data_size: int) -> int | str:
        body = encode_start_fl_job_request(
            fl_name=FL_NAME, fl_id=fl_id, iteration=iteration, data_size=data_size, timestamp="t"
        )
        raw = (await self.client.post(f"{url}/startFLJob", content=body)).content
        if raw == SAFEMODE_TEXT.encode():
            return SAFEMODE_TEXT
        return decode_start_fl_job_response(raw).retcode

    async def upload(self, url: str, fl_id: str, iteration: int, value: float, data_size: int) -> int | str:
        maps = [
            (n, np.full(s, value * data_size, np.float32))
            for n, s in zip(self.spec.names, self.spec.sizes, strict=True)
        ]
        body = encode_update_model_request(
            fl_name=FL_NAME, fl_id=fl_id, iteration=iteration, feature_maps=maps, timestamp="t"
        )
        raw = (await self.client.post(f"{url}/updateModel", content=body)).content
        if raw == SAFEMODE_TEXT.encode():
            return SAFEMODE_TEXT
        return decode_update_model_response(raw).retcode

    async def get_model_text(self, url: str, iteration: int) -> bytes:
        body = encode_get_model_request(fl_name=FL_NAME, iteration=iteration, timestamp="t")
        return (await self.client.post(f"{url}/getModel", content=body)).content

    async def iteration(self, iteration: int, plan: list[tuple[str, str, float, int]]) -> None:
        """Devices ``(url, fl_id, value, data_size)`` take part in ``iteration``; every answer SUCCEED."""
        for url, fl_id, _value, size in plan:
            assert await self.start(url, fl_id, iteration, size) == ResponseCode.SUCCEED, (iteration, fl_id)
        for url, fl_id, value, size in plan:
            assert await self.upload(url, fl_id, iteration, value, size) == ResponseCode.SUCCEED, (
                iteration,
                fl_id,
            )


def assert_fedavg(server: ServerNode, iteration: int, plan: list[tuple[str, str, float, int]]) -> None:
    want = sum(v * s for _, _, v, s in plan) / sum(s for *_, s in plan)
    held = server.rounds.store.get(iteration)
    assert held is not None, (server.settings.node_id, iteration)
    for name, tensor in held.items():
        np.testing.assert_allclose(
            tensor.numpy(), want, rtol=1e-6, err_msg=f"{name} of iteration {iteration}"
        )


async def until(predicate: Callable[[], object], what: str) -> None:
    """Wait (virtual time: the autojump clock) until ``predicate()`` is true, at most 30 s."""
    for _ in range(150):
        if predicate():
            return
        await trio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def wait_state(cluster: InProcessCluster, state: ClusterState) -> None:
    await until(lambda: cluster.scheduler.state is state, state.name)


async def test_scale_out_then_in_while_training(autojump_clock: trio.testing.MockClock) -> None:
    autojump_clock.autojump_threshold = 0.05  # loopback traffic settles, then virtual time jumps
    async with open_cluster(2, job) as cluster, httpx.AsyncClient(timeout=30) as client:  # type: ignore[arg-type]
        devices = Devices(client)
        leader, follower = cluster.by_rank()
        assert leader.leader is not None
        lead_url, follow_url = cluster.url_of(leader), cluster.url_of(follower)

        plan1 = [(lead_url, "a", 1.0, 1), (follow_url, "b", 4.0, 3)]
        await devices.iteration(1, plan1)
        assert await leader.leader.wait_ended(1)

        # Iteration 2 runs when the scale-out comes: it may end (a startFLJob for it still counts).
        assert await devices.start(lead_url, "a", 2, 2) == ResponseCode.SUCCEED
        reply = await cluster.scheduler.scale_out(1)
        assert reply.ok, reply
        await wait_state(cluster, ClusterState.CLUSTER_SCALE_OUT)
        await until(lambda: leader.leader is not None and leader.leader.hold, "the leader to hold")
        scaling = cluster.scheduler.machine.scaling
        assert scaling is not None and not scaling.barrier  # iteration 2 is running
        assert await devices.start(follow_url, "b", 2, 2) == ResponseCode.SUCCEED
        for url, fl_id, value in ((lead_url, "a", 2.0), (follow_url, "b", 6.0)):
            assert await devices.upload(url, fl_id, 2, value, 2) == ResponseCode.SUCCEED
        assert await leader.leader.wait_ended(2)
        await until(
            lambda: (
                cluster.scheduler.machine.scaling is not None and cluster.scheduler.machine.scaling.barrier
            ),
            "the barrier",
        )
        # At the barrier no new iteration starts.
        assert await devices.start(lead_url, "a", 3, 1) == SAFEMODE_TEXT
        assert leader.leader.machine.current_iteration == 3

        # The new Server, started with the new total, joins; the cluster is READY again.
        new_job = lenet_job(THRESHOLD, ITERATIONS)
        joiner = ServerNode(
            loopback_server("2", 3, scheduler_port=cluster.addresses.port, fl_iteration_num=ITERATIONS),
            new_job,
        )
        async with trio.open_nursery() as nursery:
            started = await nursery.start(joiner.serve)
            await wait_state(cluster, ClusterState.CLUSTER_READY)
            assert started.rank == 2
            assert not leader.leader.hold
            join_url = started.device_urls[0]
            assert [s.completed for s in cluster.scheduler.scalings] == [True]

            plan3 = [(join_url, "c", 3.0, 5), (follow_url, "b", 7.0, 1)]
            await devices.iteration(3, plan3)
            assert await leader.leader.wait_ended(3)
            for server in (leader, follower, joiner):
                assert_fedavg(server, 3, plan3)

            # Scale in the follower of rank 1: the joiner becomes rank 1.
            reply = await cluster.scheduler.scale_in((follower.settings.node_id,))
            assert reply.ok, reply
            await wait_state(cluster, ClusterState.CLUSTER_READY)
            members = [(m.rank, m.node_id) for m in cluster.scheduler.members()]
            assert members == [(0, leader.settings.node_id), (1, "2")]
            await until(follower.retired.is_set, "the follower to retire")
            await until(lambda: joiner.rank == 1, "the joiner's new rank")
            # The removed Server answers the safemode text to everything, getModel included.
            assert await devices.start(follow_url, "d", 4, 1) == SAFEMODE_TEXT
            assert await devices.get_model_text(follow_url, 3) == SAFEMODE_TEXT.encode()

            plan4 = [(join_url, "c", 1.5, 2), (lead_url, "d", 9.0, 2)]
            for _ in range(100):  # the joiner's role restarts with its new rank: safemode meanwhile
                if await devices.start(join_url, "c", 4, 2) != SAFEMODE_TEXT:
                    break
                await trio.sleep(0.2)
            assert leader.leader.machine.current_iteration == 4
            assert await devices.start(lead_url, "d", 4, 2) == ResponseCode.SUCCEED
            for url, fl_id, value, size in plan4:
                assert await devices.upload(url, fl_id, 4, value, size) == ResponseCode.SUCCEED
            assert await leader.leader.wait_ended(4)
            for server in (leader, joiner):
                assert_fedavg(server, 4, plan4)
            assert cluster.scheduler.state is ClusterState.CLUSTER_READY
            nursery.cancel_scope.cancel()


async def test_a_scale_out_nobody_joins_rolls_back_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    autojump_clock.autojump_threshold = 0.05
    async with (
        open_cluster(2, job, scheduler_context={"scaling_timeout": 5.0}) as cluster,
        httpx.AsyncClient(timeout=30) as client,
    ):  # type: ignore[arg-type]
        devices = Devices(client)
        leader, follower = cluster.by_rank()
        assert leader.leader is not None
        assert (await cluster.scheduler.scale_out(2)).ok
        await wait_state(cluster, ClusterState.CLUSTER_SCALE_OUT)
        await wait_state(cluster, ClusterState.CLUSTER_READY)
        (ended,) = cluster.scheduler.scalings
        assert not ended.completed
        assert cluster.scheduler.machine.server_num == 2
        await until(lambda: leader.leader is not None and not leader.leader.hold, "the hold to end")
        plan = [(cluster.url_of(leader), "a", 1.0, 1), (cluster.url_of(follower), "b", 2.0, 1)]
        await devices.iteration(1, plan)
        assert await leader.leader.wait_ended(1)
        assert_fedavg(follower, 1, plan)


async def test_instance_operations_through_the_management_port(
    autojump_clock: trio.testing.MockClock,
) -> None:
    autojump_clock.autojump_threshold = 0.05
    async with open_cluster(2, job) as cluster, httpx.AsyncClient(timeout=30) as client:  # type: ignore[arg-type]
        devices = Devices(client)
        leader, follower = cluster.by_rank()
        assert leader.leader is not None
        manage = cluster.manage_url

        async def post(path: str, body: object = None) -> tuple[int, object]:
            content = b"" if body is None else json.dumps(body).encode()
            response = await client.post(f"{manage}{path}", content=content)
            return response.status_code, response.json()

        # At iteration 1 a new instance is refused (the original's answer), HTTP 200.
        status, answer = await post("/newInstance", {"fl_iteration_num": 3})
        assert (status, answer) == (
            200,
            {
                "code": "1",
                "error_message": "Start new instance failed.",
                "result": False,
                "reason": "This is just the first iteration, do not need to new instance.",
            },
        )
        plan1 = [(cluster.url_of(leader), "a", 1.0, 1), (cluster.url_of(follower), "b", 3.0, 1)]
        await devices.iteration(1, plan1)
        assert await leader.leader.wait_ended(1)

        # A value its FLContext rule refuses, and an unknown key: refused with the rule's message.
        status, answer = await post("/newInstance", {"start_fl_job_threshold": 0})
        assert status == 200 and answer["result"] is False and "start_fl_job_threshold" in answer["reason"]  # type: ignore[index]
        status, answer = await post("/newInstance", {"epochs": 3})
        assert status == 200 and "unknown keys ['epochs']" in answer["reason"]  # type: ignore[index]

        status, answer = await post("/newInstance", {"fl_iteration_num": 3.0, "client_epoch_num": 2})
        assert (status, answer) == (
            200,
            {"code": "0", "message": "Start new instance successful.", "result": True},
        )
        await wait_state(cluster, ClusterState.CLUSTER_READY)
        status, answer = await post("/queryInstance")
        assert status == 200
        result = answer["result"]  # type: ignore[index]
        assert result["fl_iteration_num"] == 3 and result["client_epoch_num"] == 2, result
        assert leader.leader.machine.current_iteration == 1
        # The follower got the new FLPlan: a device there is told 2 epochs, iteration 1 of the new instance.
        await until(lambda: follower.rounds.plan.epochs == 2, "the follower's new FLPlan")
        body = encode_start_fl_job_request(
            fl_name=FL_NAME, fl_id="c", iteration=1, data_size=1, timestamp="t"
        )
        start = decode_start_fl_job_response(
            (await client.post(f"{cluster.url_of(follower)}/startFLJob", content=body)).content
        )
        assert start.retcode == ResponseCode.SUCCEED and start.iteration == 1
        assert start.fl_plan is not None and start.fl_plan.epochs == 2

        # Disable fails the running iteration; devices are told the job is disabled; enable resumes.
        status, answer = await post("/disableFLS")
        assert (status, answer) == (
            200,
            {"code": "0", "message": "start disabling FL-Server successful.", "result": True},
        )
        assert cluster.scheduler.state is ClusterState.CLUSTER_DISABLE_FLS
        assert leader.leader.machine.state.value == "disable"
        status, answer = await post("/enableFLS")
        assert status == 200 and answer["result"] is True  # type: ignore[index]
        await wait_state(cluster, ClusterState.CLUSTER_READY)
        assert leader.leader.machine.state.value == "running"


async def test_a_rolled_back_scale_out_releases_the_server_that_joined(
    autojump_clock: trio.testing.MockClock,
) -> None:
    autojump_clock.autojump_threshold = 0.05
    async with open_cluster(2, job) as cluster, httpx.AsyncClient(timeout=30) as client:  # type: ignore[arg-type]
        devices = Devices(client)
        leader, follower = cluster.by_rank()
        assert leader.leader is not None
        assert (await cluster.scheduler.scale_out(2)).ok
        await until(
            lambda: (
                cluster.scheduler.machine.scaling is not None and cluster.scheduler.machine.scaling.barrier
            ),
            "the barrier",
        )
        joiner = ServerNode(
            loopback_server("2", 4, scheduler_port=cluster.addresses.port, fl_iteration_num=ITERATIONS),
            lenet_job(THRESHOLD, ITERATIONS),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(joiner.serve)
            await until(lambda: "2" in [m.node_id for m in cluster.scheduler.members()], "the joiner")
            # One of the two new Servers came: the operator rolls back.
            assert (await cluster.scheduler.scale_out_rollback()).ok
            assert cluster.scheduler.state is ClusterState.CLUSTER_READY
            assert [m.node_id for m in cluster.scheduler.members()] == [
                leader.settings.node_id,
                follower.settings.node_id,
            ]
            await until(joiner.retired.is_set, "the joiner to be released")
            assert joiner.rounds.retired
            await until(lambda: not leader.leader.hold, "the hold to end")  # type: ignore[union-attr]
            plan = [(cluster.url_of(leader), "a", 2.0, 1), (cluster.url_of(follower), "b", 4.0, 3)]
            await devices.iteration(1, plan)
            assert await leader.leader.wait_ended(1)
            assert_fedavg(follower, 1, plan)
            nursery.cancel_scope.cancel()
