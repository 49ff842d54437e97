"""The management API's operator endpoints (spec/management-api.md) against a real :class:`SchedulerNode`.

Fake Servers hold in-memory links to the Scheduler (the :mod:`tests.unit.test_scheduler_driver` ones); the
leader's side of an instance operation is a fake that answers ``instance_call`` frames. Every bad request
gets the original's error answer and leaves the cluster machine's snapshot exactly as it was.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from quart.typing import TestClientProtocol as Client
from trio.testing import wait_all_tasks_blocked

from flcluster.config.file import ClusterConfig
from flcluster.core.cluster import ClusterState
from flcluster.http.management import create_management_app
from flcluster.runtime.scheduler import SchedulerNode
from flcluster.wire.messages import InstanceAnswer, InstanceCall, InstanceOp, ScalingBarrier
from tests.helpers import loopback_scheduler
from tests.unit.test_scheduler_driver import FakeServer, form_cluster, settings

NOT_READY = "The cluster is not ready."


async def answer(
    client: Client, path: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
    response = await client.post(
        path, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    assert response.mimetype == "application/json"
    return response.status_code, await response.get_json()


def refused(message: str) -> tuple[int, dict[str, str]]:
    return 400, {"code": "1", "error_message": message}


async def unchanged(scheduler: SchedulerNode, client: Client, path: str, body: object) -> Any:
    """Send a request that must be refused; check nothing changed; return the answer."""
    before = scheduler.machine.snapshot()
    got = await answer(client, path, body)
    assert scheduler.machine.snapshot() == before, (path, body, got)
    return got


BAD_SCALE_OUT: dict[str, tuple[object, str]] = {
    "empty": (b"", "The post message size is invalid."),
    "not JSON": (b"{server_num: 2", "Illegal JSON format:"),
    "a list": ([1, 2], "Illegal JSON format:expected a JSON object, got list"),
    "no worker_num": ({"server_num": 2}, "The json is not contain the key:worker_num"),
    "no server_num": ({"worker_num": 0}, "The json is not contain the key:server_num"),
    "a bool": ({"worker_num": 0, "server_num": True}, "The value of the key:server_num should be an integer"),
    "a string": (
        {"worker_num": 0, "server_num": "2"},
        "The value of the key:server_num should be an integer",
    ),
    "a fraction": (
        {"worker_num": 0, "server_num": 1.5},
        "The value of the key:server_num should be an integer",
    ),
    "negative": ({"worker_num": 0, "server_num": -1}, "The value should not be less than 0."),
    "negative workers": ({"worker_num": -1, "server_num": 1}, "The value should not be less than 0."),
    "workers": ({"worker_num": 1, "server_num": 1}, "The Worker does not currently support scale out."),
    "zero": ({"worker_num": 0, "server_num": 0}, "The server_num to scale out should be at least 1, got 0."),
    "too many": ({"worker_num": 0, "server_num": 65534}, "at most 65535 are supported."),
}

BAD_SCALE_IN: dict[str, tuple[object, str]] = {
    "empty": (b"", "The post message size is invalid."),
    "no node_ids": ({"ids": ["1"]}, "The json is not contain the key:node_ids"),
    "not a list": ({"node_ids": "1"}, "The value of the key:node_ids should be a list of node id strings"),
    "numbers": ({"node_ids": [1]}, "The value of the key:node_ids should be a list of node id strings"),
    "empty list": ({"node_ids": []}, "The node ids should not be empty."),
    "unknown": ({"node_ids": ["7"]}, "The node id:7 is illegal."),
    "rank 0": ({"node_ids": ["1", "0"]}, "The node id:0 is rank 0 of server, should not be scale in."),
}


async def test_bad_scaling_bodies_get_the_originals_answers_and_change_nothing() -> None:
    scheduler = SchedulerNode(settings())
    client = create_management_app(scheduler, max_body=1024).test_client()
    async with trio.open_nursery() as nursery:
        await form_cluster(nursery, scheduler)
        for path, table in (("/scaleout", BAD_SCALE_OUT), ("/scalein", BAD_SCALE_IN)):
            for name, (body, message) in table.items():
                status, got = await unchanged(scheduler, client, path, body)
                assert status == 400, (path, name, got)
                assert got["code"] == "1" and set(got) == {"code", "error_message"}, (path, name, got)
                assert got["error_message"].startswith(message) or message in got["error_message"], (
                    path,
                    name,
                    got,
                )
        status, got = await unchanged(scheduler, client, "/scaleout", b"x" * 2000)
        assert (status, got) == refused("The post message is bigger than 1024 bytes.")
        assert scheduler.state is ClusterState.CLUSTER_READY
        nursery.cancel_scope.cancel()


async def test_scale_out_then_rollback_and_scaling_while_scaling_is_refused(autojump_clock: Any) -> None:
    scheduler = SchedulerNode(settings())
    client = create_management_app(scheduler, max_body=1024).test_client()
    async with trio.open_nursery() as nursery:
        leader, _follower = await form_cluster(nursery, scheduler)
        # Rolling back with no scale-out in progress:
        got = await unchanged(scheduler, client, "/scaleoutRollback", None)
        assert got == refused(
            "The cluster state is not CLUSTER_SCALE_OUT, there is no scale out to roll back."
        )

        got = await answer(client, "/scaleout", {"worker_num": 0, "server_num": 2.0})  # the tool sends floats
        assert got == (200, {"code": "0", "message": "Cluster begin to scale out."})
        assert scheduler.state is ClusterState.CLUSTER_SCALE_OUT
        assert scheduler.machine.server_num == 4
        await wait_all_tasks_blocked()
        assert leader.memberships()[-1].state is ClusterState.CLUSTER_SCALE_OUT

        # Scaling while scaling, and the other operations, are refused.
        for path, body in (
            ("/scaleout", {"worker_num": 0, "server_num": 1}),
            ("/scalein", {"node_ids": ["1"]}),
            ("/disableFLS", None),
            ("/newInstance", {"fl_iteration_num": 5}),
        ):
            assert await unchanged(scheduler, client, path, body) == refused(NOT_READY), path
        # The leader has not reached the barrier: no rollback yet.
        got = await unchanged(scheduler, client, "/scaleoutRollback", None)
        assert got == refused("Cluster servers are not ready for scaling rollback, please retry later.")

        await leader.link.send(ScalingBarrier(node_id="0", iteration=3))
        await wait_all_tasks_blocked()
        response = await client.get("/scaleoutRollback")
        assert response.status_code == 200
        assert await response.get_json() == {"code": "0", "message": "Cluster scale out rollback success."}
        assert scheduler.state is ClusterState.CLUSTER_READY
        assert scheduler.machine.server_num == 2
        assert [s.completed for s in scheduler.scalings] == [False]
        nursery.cancel_scope.cancel()


async def test_scale_in_removes_the_servers_and_compacts_nothing_else(autojump_clock: Any) -> None:
    scheduler = SchedulerNode(loopback_scheduler(3, heartbeat_timeout=30.0, cluster_available_timeout=900))
    client = create_management_app(scheduler, max_body=1024).test_client()
    async with trio.open_nursery() as nursery:
        fakes = [FakeServer.connect(nursery, scheduler, str(i)) for i in range(3)]
        for fake in fakes:
            await fake.register(server_num=3)
            nursery.start_soon(fake.read)
        await wait_all_tasks_blocked()
        assert scheduler.state is ClusterState.CLUSTER_READY
        got = await answer(client, "/scalein", {"node_ids": ["1", "1"]})  # a repeated id counts once
        assert got == (200, {"code": "0", "message": "Cluster begin to scale in."})
        assert scheduler.state is ClusterState.CLUSTER_SCALE_IN
        await fakes[0].link.send(ScalingBarrier(node_id="0", iteration=2))
        await wait_all_tasks_blocked()
        assert scheduler.state is ClusterState.CLUSTER_READY
        assert [(m.rank, m.node_id) for m in scheduler.members()] == [(0, "0"), (1, "2")]
        # The removed Server got the final membership (without it), then its link was closed.
        final = fakes[1].memberships()[-1]
        assert final.state is ClusterState.CLUSTER_READY
        assert [m.node_id for m in final.members] == ["0", "2"]
        assert "1" not in scheduler._links
        # An id that left is unknown now.
        got = await unchanged(scheduler, client, "/scalein", {"node_ids": ["1"]})
        assert got == refused("The node id:1 is illegal.")
        nursery.cancel_scope.cancel()


async def fake_leader(
    fake: FakeServer, answers: dict[InstanceOp, tuple[bool, str, dict[str, object]]]
) -> None:
    """Answer every ``instance_call`` sent to ``fake`` (none for an op not in ``answers``)."""
    seen = 0
    while True:
        calls = [m for m in fake.received if isinstance(m, InstanceCall)]
        for call in calls[seen:]:
            if call.op in answers:
                ok, message, result = answers[call.op]
                await fake.link.send(InstanceAnswer(call.call_id, ok, message, json.dumps(result)))
        seen = len(calls)
        await trio.sleep(0.01)


QUERY = {
    "start_fl_job_threshold": 8,
    "start_fl_job_time_window": 300000,
    "update_model_ratio": 1.0,
    "update_model_time_window": 300000,
    "fl_iteration_num": 20,
    "client_epoch_num": 25,
    "client_batch_size": 32,
    "client_learning_rate": 0.001,
    "global_iteration_time_window": 3600000,
}


async def test_instance_operations_go_through_the_leader(autojump_clock: Any) -> None:
    scheduler = SchedulerNode(settings())
    client = create_management_app(scheduler, max_body=1024).test_client()
    async with trio.open_nursery() as nursery:
        leader, _ = await form_cluster(nursery, scheduler)
        answers: dict[InstanceOp, tuple[bool, str, dict[str, object]]] = {
            InstanceOp.QUERY_INSTANCE: (True, "", QUERY),
            InstanceOp.DISABLE: (True, "", {"instance_state": "disable"}),
            InstanceOp.ENABLE: (True, "", {"instance_state": "running"}),
            InstanceOp.NEW_INSTANCE: (
                False,
                "This is just the first iteration, do not need to new instance.",
                {},
            ),
        }
        nursery.start_soon(fake_leader, leader, answers)

        assert await answer(client, "/queryInstance") == (
            200,
            {"code": "0", "message": "Query Instance successful.", "result": QUERY},
        )
        got = await unchanged(scheduler, client, "/enableFLS", None)
        assert got == refused("The cluster state is not CLUSTER_DISABLE_FLS, does not need to enable fls.")

        assert await answer(client, "/disableFLS") == (
            200,
            {"code": "0", "message": "start disabling FL-Server successful.", "result": True},
        )
        assert scheduler.state is ClusterState.CLUSTER_DISABLE_FLS
        await wait_all_tasks_blocked()
        assert leader.memberships()[-1].state is ClusterState.CLUSTER_DISABLE_FLS
        got = await unchanged(scheduler, client, "/disableFLS", None)
        assert got == refused("The cluster state is already in CLUSTER_DISABLE_FLS.")
        # Scaling while disabled is refused.
        got = await unchanged(scheduler, client, "/scaleout", {"worker_num": 0, "server_num": 1})
        assert got == refused(NOT_READY)
        # A query is served while disabled.
        assert (await answer(client, "/queryInstance"))[0] == 200

        assert await answer(client, "/enableFLS") == (
            200,
            {"code": "0", "message": "start enabling FL-Server successful.", "result": True},
        )
        assert scheduler.state is ClusterState.CLUSTER_READY

        # A failed new instance is HTTP 200 with code "1" (the original's), and the reason.
        assert await answer(client, "/newInstance", {"fl_iteration_num": 5}) == (
            200,
            {
                "code": "1",
                "error_message": "Start new instance failed.",
                "result": False,
                "reason": "This is just the first iteration, do not need to new instance.",
            },
        )
        assert scheduler.state is ClusterState.CLUSTER_READY
        got = await unchanged(scheduler, client, "/newInstance", b"[1]")
        assert got == refused("Illegal JSON format:expected a JSON object, got list")

        # A leader that does not answer: the operation times out (the state settles back).
        del answers[InstanceOp.QUERY_INSTANCE], answers[InstanceOp.NEW_INSTANCE]
        scheduler.instance_timeout = 5.0
        assert await answer(client, "/queryInstance") == refused("The query instance is timeout.")
        assert await answer(client, "/newInstance", {"fl_iteration_num": 5}) == refused(
            "The new instance is timeout."
        )
        assert scheduler.state is ClusterState.CLUSTER_READY
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "path", ["/scaleout", "/scalein", "/scaleoutRollback", "/newInstance", "/disableFLS"]
)
async def test_operator_endpoints_need_the_token(path: str) -> None:
    token = "s3cret-token-0123456789"
    scheduler = SchedulerNode(loopback_scheduler(2, cluster_config=ClusterConfig(manage_token=token)))
    client = create_management_app(scheduler, max_body=1024, token=token).test_client()
    before = scheduler.machine.snapshot()
    status, got = await answer(client, path, {"worker_num": 0, "server_num": 1})
    assert status == 401 and "access token" in got["error_message"]
    status, got = await answer(
        client, path, {"worker_num": 0, "server_num": 1}, headers={"Authorization": "Bearer nope"}
    )
    assert status == 401
    assert scheduler.machine.snapshot() == before
    response = await client.post(
        path, data=b'{"worker_num":0,"server_num":1}', headers={"Authorization": f"Bearer {token}"}
    )
    # With the token the request is judged (the cluster has not formed: refused, but not for the token).
    assert response.status_code == 400
    assert "access token" not in (await response.get_json())["error_message"]
