"""The Scheduler's trio driver (:mod:`flcluster.runtime.scheduler`) on trio's virtual clock.

Fake Servers talk to a real :class:`SchedulerNode` through in-memory stream pairs handed to
:meth:`SchedulerNode.handle_stream`, so every time below is exact: the heartbeat timeout fires at
``last heartbeat + heartbeat_timeout`` to the tick, not "about then". The management app is driven
through Quart's test client.
"""

from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from flcluster.core.cluster import (
    ClusterState,
    ExitCluster,
    LivenessCheck,
    NodeInfo,
    RegisterNode,
    Role,
)
from flcluster.http.management import create_management_app
from flcluster.runtime.clock import EpochClock
from flcluster.runtime.links import FramedLink, LinkClosed
from flcluster.runtime.scheduler import SchedulerNode, SchedulerSettings
from flcluster.wire.frames import HEADER_LENGTH, LENGTH
from flcluster.wire.messages import (
    HeartbeatMsg,
    HeartbeatReply,
    Membership,
    Register,
    RegisterReply,
    to_header,
)
from tests.helpers import loopback_scheduler

HEARTBEAT_TIMEOUT = 30.0
HEARTBEAT_INTERVAL = 3.0


def settings(**overrides: Any) -> SchedulerSettings:
    """The Scheduler's settings from an FLContext (``overrides`` are FLContext keywords)."""
    context: dict[str, Any] = {"heartbeat_timeout": HEARTBEAT_TIMEOUT, "cluster_available_timeout": 900}
    context.update(overrides)
    return loopback_scheduler(2, **context)


class FakeServer:
    """One end of an in-memory link to the Scheduler, speaking the Server's side of the protocol."""

    def __init__(self, node_id: str, link: FramedLink) -> None:
        self.node_id = node_id
        self.link = link
        self.received: list[Any] = []

    @classmethod
    def connect(cls, nursery: trio.Nursery, scheduler: SchedulerNode, node_id: str) -> FakeServer:
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(scheduler.handle_stream, server_end)
        return cls(node_id, FramedLink(client_end))

    async def register(self, *, server_num: int = 2, fl_iteration_num: int = 20) -> RegisterReply:
        await self.link.send(
            Register(
                node_id=self.node_id,
                role=Role.SERVER,
                host="127.0.0.1",
                port=7000 + int(self.node_id),
                device_port=6668 + int(self.node_id),
                pid=100 + int(self.node_id),
                server_num=server_num,
                fl_iteration_num=fl_iteration_num,
                recovering=False,
            )
        )
        reply, _ = await self.link.receive()
        assert isinstance(reply, RegisterReply)
        return reply

    async def read(self) -> None:
        """Collect everything the Scheduler sends (a Server never leaves its link unread)."""
        try:
            while True:
                msg, _ = await self.link.receive()
                self.received.append(msg)
        except LinkClosed:
            pass

    async def heartbeat(self) -> None:
        await self.link.send(HeartbeatMsg(node_id=self.node_id))

    async def heartbeat_forever(self) -> None:
        while True:
            await self.heartbeat()
            await trio.sleep(HEARTBEAT_INTERVAL)

    def memberships(self) -> list[Membership]:
        return [m for m in self.received if isinstance(m, Membership)]


def alive_by_id(members: Any) -> dict[str, bool]:
    return {m.node_id: m.alive for m in members}


async def form_cluster(nursery: trio.Nursery, scheduler: SchedulerNode) -> tuple[FakeServer, FakeServer]:
    first = FakeServer.connect(nursery, scheduler, "0")
    second = FakeServer.connect(nursery, scheduler, "1")
    assert await first.register() == RegisterReply(accepted=True, rank=0, reason="")
    nursery.start_soon(first.read)
    assert scheduler.state is ClusterState.CLUSTER_STARTING
    assert await second.register() == RegisterReply(accepted=True, rank=1, reason="")
    nursery.start_soon(second.read)
    await wait_all_tasks_blocked()
    assert scheduler.state is ClusterState.CLUSTER_READY
    for fake in (first, second):
        (membership,) = fake.memberships()
        assert membership.state is ClusterState.CLUSTER_READY
        assert [(m.rank, m.node_id, m.alive) for m in membership.members] == [(0, "0", True), (1, "1", True)]
    return first, second


async def test_a_silent_server_times_out_at_exactly_the_heartbeat_timeout(autojump_clock: Any) -> None:
    scheduler = SchedulerNode(settings())
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(partial(scheduler.serve, with_management=False))
        assert addresses.port > 0
        assert addresses.manage_urls == []
        live, silent = await form_cluster(nursery, scheduler)
        nursery.start_soon(live.heartbeat_forever)

        for _ in range(4):
            await trio.sleep(HEARTBEAT_INTERVAL)
            await silent.heartbeat()
        went_silent = trio.current_time()
        assert went_silent == 4 * HEARTBEAT_INTERVAL

        await trio.sleep_until(went_silent + HEARTBEAT_TIMEOUT - 0.001)
        await wait_all_tasks_blocked()
        assert alive_by_id(scheduler.members()) == {"0": True, "1": True}
        assert scheduler.state is ClusterState.CLUSTER_READY
        assert len(live.memberships()) == 1

        await trio.sleep_until(went_silent + HEARTBEAT_TIMEOUT)
        await wait_all_tasks_blocked()
        assert trio.current_time() == went_silent + HEARTBEAT_TIMEOUT
        assert alive_by_id(scheduler.members()) == {"0": True, "1": False}
        assert scheduler.state is ClusterState.NODE_TIMEOUT
        timeout_news = live.memberships()[-1]
        assert timeout_news.state is ClusterState.NODE_TIMEOUT
        assert alive_by_id(timeout_news.members) == {"0": True, "1": False}

        # The live Server's next heartbeat is told the cluster is in NODE_TIMEOUT.
        await trio.sleep_until(went_silent + HEARTBEAT_TIMEOUT + HEARTBEAT_INTERVAL)
        await wait_all_tasks_blocked()
        states = [r.state for r in live.received if isinstance(r, HeartbeatReply)]
        assert states[-1] is ClusterState.NODE_TIMEOUT

        await silent.heartbeat()
        await wait_all_tasks_blocked()
        assert alive_by_id(scheduler.members()) == {"0": True, "1": True}
        assert scheduler.state is ClusterState.CLUSTER_READY
        for fake in (live, silent):
            back = fake.memberships()[-1]
            assert back.state is ClusterState.CLUSTER_READY
            assert alive_by_id(back.members) == {"0": True, "1": True}
        assert silent.received[-1] == HeartbeatReply(state=ClusterState.CLUSTER_READY)
        nursery.cancel_scope.cancel()


async def test_a_fractional_heartbeat_timeout_is_kept_to_the_millisecond(autojump_clock: Any) -> None:
    """Seconds from the settings become the machine's milliseconds once; the timeout stays exact."""
    scheduler = SchedulerNode(settings(heartbeat_timeout=2.5, heartbeat_interval=1.0))
    assert scheduler.machine.config.heartbeat_timeout_ms == 2_500
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(scheduler.serve, with_management=False))
        first, _second = await form_cluster(nursery, scheduler)
        registered = trio.current_time()
        await trio.sleep_until(registered + 1.25)
        await first.heartbeat()
        await trio.sleep_until(registered + 2.499)
        await wait_all_tasks_blocked()
        assert alive_by_id(scheduler.members()) == {"0": True, "1": True}
        await trio.sleep_until(registered + 2.5)
        await wait_all_tasks_blocked()
        assert alive_by_id(scheduler.members()) == {"0": True, "1": False}
        await trio.sleep_until(registered + 1.25 + 2.5)
        await wait_all_tasks_blocked()
        assert alive_by_id(scheduler.members()) == {"0": False, "1": False}
        nursery.cancel_scope.cancel()


async def test_the_epoch_clock_reads_a_deadline_back_exactly_when_woken_at_it(autojump_clock: Any) -> None:
    clock = EpochClock()
    start = clock.now_ms()
    assert abs(start - time.time() * 1000) < 60_000  # epoch milliseconds, not trio's arbitrary origin
    for step in (1, 7, 999, 1_000, 29_999, 30_000, 123_457):
        deadline = clock.now_ms() + step
        await trio.sleep_until(clock.trio_time(deadline))
        assert clock.now_ms() == deadline


async def test_serve_returns_an_exit_when_the_cluster_does_not_form_in_time(autojump_clock: Any) -> None:
    scheduler = SchedulerNode(settings())
    outcome: list[tuple[float, ExitCluster]] = []
    returned = trio.Event()

    async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        result = await scheduler.serve(with_management=False, task_status=task_status)
        outcome.append((trio.current_time(), result))
        returned.set()

    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        await nursery.start(run)
        lonely = FakeServer.connect(nursery, scheduler, "0")
        assert (await lonely.register()).accepted
        nursery.start_soon(lonely.read)
        nursery.start_soon(lonely.heartbeat_forever)
        with trio.fail_after(1000):
            await returned.wait()
        nursery.cancel_scope.cancel()

    ((exited_at, result),) = outcome
    assert exited_at == started + 900
    reason = "only 1 of server_num=2 Servers registered within cluster_available_timeout"
    assert result == ExitCluster(cause="cluster_available_timeout", reason=reason, unfinished=("0",))
    assert scheduler.state is ClusterState.CLUSTER_EXIT


async def test_a_formed_cluster_outlives_the_startup_deadline(autojump_clock: Any) -> None:
    scheduler = SchedulerNode(settings(cluster_available_timeout=60))
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(scheduler.serve, with_management=False))
        first, second = await form_cluster(nursery, scheduler)
        nursery.start_soon(first.heartbeat_forever)
        nursery.start_soon(second.heartbeat_forever)
        await trio.sleep(120)
        await wait_all_tasks_blocked()
        assert scheduler.state is ClusterState.CLUSTER_READY
        assert alive_by_id(scheduler.members()) == {"0": True, "1": True}
        nursery.cancel_scope.cancel()


async def test_a_refused_registration_leaves_the_registered_node_linked(autojump_clock: Any) -> None:
    """A refused re-registration of a known node id must not cut the node's working link."""
    scheduler = SchedulerNode(settings())
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(scheduler.serve, with_management=False))
        first, _second = await form_cluster(nursery, scheduler)
        impostor = FakeServer.connect(nursery, scheduler, "0")
        reply = await impostor.register(fl_iteration_num=21)
        assert not reply.accepted
        assert "fl_iteration_num=21" in reply.reason
        assert "fl_iteration_num=20" in reply.reason
        # node 0's original link still carries the Scheduler's answers
        await first.heartbeat()
        await wait_all_tasks_blocked()
        assert first.received[-1] == HeartbeatReply(state=ClusterState.CLUSTER_READY)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ management app


def node_info(node_id: str) -> NodeInfo:
    return NodeInfo(node_id=node_id, role=Role.SERVER, host="127.0.0.1", port=7000, device_port=6668, pid=1)


def register_event(node_id: str, now_ms: int) -> RegisterNode:
    return RegisterNode(
        cause=f"register:{node_id}",
        info=node_info(node_id),
        server_num=2,
        fl_iteration_num=20,
        recovering=False,
        holder_connected=False,
        now_ms=now_ms,
    )


async def test_management_nodes_and_state_have_the_original_shape() -> None:
    scheduler = SchedulerNode(settings())
    client = create_management_app(scheduler, max_body=1024).test_client()

    response = await client.get("/state")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert await response.get_json() == {
        "code": "0",
        "message": "Get cluster state successful.",
        "cluster_state": "CLUSTER_STARTING",
    }
    response = await client.get("/nodes")
    assert await response.get_json() == {
        "code": "0",
        "message": "Get nodes info successful.",
        "nodeIds": [{"nodeId": "20", "rankId": "0", "role": "SCHEDULER", "alive": "true"}],
    }

    for rank, (node_id, now_ms) in enumerate([("a", 0), ("b", 10_000)]):
        reply = await scheduler.dispatch(register_event(node_id, now_ms))
        assert reply == RegisterReply(accepted=True, rank=rank, reason="")
    # a is silent since 0: the machine counts in milliseconds, converted once from the settings' seconds
    assert scheduler.machine.config.heartbeat_timeout_ms == 30_000
    assert await scheduler.dispatch(LivenessCheck(cause="test", now_ms=29_999)) is None
    assert alive_by_id(scheduler.members()) == {"a": True, "b": True}
    await scheduler.dispatch(LivenessCheck(cause="test", now_ms=30_000))

    response = await client.get("/nodes")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert await response.get_json() == {
        "code": "0",
        "message": "Get nodes info successful.",
        "nodeIds": [
            {"nodeId": "a", "rankId": "0", "role": "SERVER", "alive": "false"},
            {"nodeId": "b", "rankId": "1", "role": "SERVER", "alive": "true"},
            {"nodeId": "20", "rankId": "0", "role": "SCHEDULER", "alive": "true"},
        ],
    }
    response = await client.post("/state")
    assert response.status_code == 200
    assert await response.get_json() == {
        "code": "0",
        "message": "Get cluster state successful.",
        "cluster_state": "NODE_TIMEOUT",
    }


async def test_management_unknown_path_is_a_json_404_in_the_error_shape() -> None:
    client = create_management_app(SchedulerNode(settings()), max_body=1024).test_client()
    response = await client.get("/metrics")  # not served yet (spec/management-api.md)
    assert response.status_code == 404
    assert response.mimetype == "application/json"
    body = await response.get_json()
    assert body["code"] == "1"
    assert set(body) == {"code", "error_message"}
    assert body["error_message"].startswith("The management API has no endpoint at this path")


async def test_a_node_id_that_cannot_be_sent_back_does_not_kill_the_scheduler(autojump_clock: Any) -> None:
    scheduler = SchedulerNode(settings())
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(scheduler.serve, with_management=False))
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(scheduler.handle_stream, server_end)
        header = to_header(Register("X", Role.SERVER, "127.0.0.1", 7000, 6668, 1, 2, 20, False))
        raw = json.dumps(header).replace('"X"', '"\\ud800"').encode()
        await client_end.send_all(LENGTH.pack(2 + len(raw)) + HEADER_LENGTH.pack(len(raw)) + raw)
        odd = FakeServer("odd", FramedLink(client_end))
        nursery.start_soon(odd.read)
        await wait_all_tasks_blocked()
        # Accepted or refused, either is fine; what matters is that the Scheduler keeps serving.
        normal = FakeServer.connect(nursery, scheduler, "1")
        assert isinstance(await normal.register(), RegisterReply)
        nursery.start_soon(normal.read)
        await normal.heartbeat()
        await wait_all_tasks_blocked()
        assert scheduler.state is not ClusterState.CLUSTER_EXIT
        assert normal.received[-1] == HeartbeatReply(state=scheduler.state)
        nursery.cancel_scope.cancel()
