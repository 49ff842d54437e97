"""A new instance with recovery configured starts every Server's stored history over (spec/cluster-protocol.md
§9, "With recovery configured"; spec/store.md ``new_history``).

In one process: a Scheduler and two Servers, each with its own SQLite store on ``tmp_path`` (the
:class:`~tests.unit.test_server_recovery.Cluster` of the restart tests). Every device uploads a constant
(already multiplied by its data size), so each model's FedAvg is known exactly. The stores are read with
plain ``sqlite3`` after the Servers stop, to see what a restart would find.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np
import trio

from flcluster.runtime.scheduler import SchedulerNode
from flcluster.runtime.server import ServerNode
from flcluster.wire.client_codec import (
    decode_start_fl_job_response,
    decode_update_model_response,
    encode_start_fl_job_request,
    encode_update_model_request,
)
from flcluster.wire.codes import ResponseCode
from tests.helpers import FL_NAME, lenet_job, loopback_scheduler
from tests.unit.test_server_recovery import Cluster

#: fl_id -> (value, data size) of each device in every iteration here.
DEVICES = {"a": (1.0, 3), "b": (2.0, 5), "c": (4.0, 7)}
WANT = sum(v for v, _ in DEVICES.values()) / sum(s for _, s in DEVICES.values())


def job() -> object:
    return lenet_job(3, 5, update=30_000)


async def start(client: httpx.AsyncClient, url: str, iteration: int) -> None:
    for fl_id, (_value, size) in DEVICES.items():
        body = encode_start_fl_job_request(
            fl_name=FL_NAME, fl_id=fl_id, iteration=iteration, data_size=size, timestamp="t"
        )
        for _attempt in range(200):  # a Server still re-linking to its leader answers safemode
            raw = (await client.post(f"{url}/startFLJob", content=body)).content
            if not raw.startswith(b"The cluster is in safemode"):
                break
            await trio.sleep(0.05)
        answer = decode_start_fl_job_response(raw)
        assert answer.retcode == ResponseCode.SUCCEED, (iteration, fl_id, answer.reason)


async def upload(client: httpx.AsyncClient, urls: list[str], iteration: int) -> None:
    """Each device uploads to the next Server of ``urls`` in turn; every answer SUCCEED."""
    spec = lenet_job(3, 5).spec
    for index, (fl_id, (value, _size)) in enumerate(DEVICES.items()):
        maps = [(n, np.full(s, value, np.float32)) for n, s in zip(spec.names, spec.sizes, strict=True)]
        body = encode_update_model_request(
            fl_name=FL_NAME, fl_id=fl_id, iteration=iteration, feature_maps=maps, timestamp="t"
        )
        raw = (await client.post(f"{urls[index % len(urls)]}/updateModel", content=body)).content
        assert decode_update_model_response(raw).retcode == ResponseCode.SUCCEED, (iteration, fl_id)


def assert_model(node: ServerNode, iteration: int, want: float) -> None:
    model = node.rounds.store.get(iteration)
    assert model is not None, (node.settings.node_id, iteration)
    for name, tensor in model.items():
        np.testing.assert_allclose(tensor.numpy(), want, rtol=1e-6, err_msg=f"{name} of {iteration}")


async def held(node: ServerNode) -> list[int]:
    """The iterations of the models a running Server's store holds (what a restart would find)."""
    assert node.recovery is not None
    return [m.iteration for m in (await node.recovery.load()).models]


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until ``await check()`` is true, at most 30 s."""
    for _ in range(600):
        if await check():
            return
        await trio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stored(path: str) -> tuple[list[int], int | None, int | None]:
    """(model iterations, partial-sum iteration, server-state iteration) in the store file of a stopped
    Server (a running one holds its file locked)."""
    db = sqlite3.connect(path)
    try:
        models = [row[0] for row in db.execute("SELECT iteration FROM models ORDER BY iteration")]
        partial = db.execute("SELECT iteration FROM partial_sum WHERE id = 1").fetchone()
        server = db.execute("SELECT iteration FROM server_state WHERE id = 1").fetchone()
    finally:
        db.close()
    return models, None if partial is None else partial[0], None if server is None else server[0]


async def open_two(nursery: trio.Nursery, tmp_path: Path) -> tuple[SchedulerNode, Cluster, str, str]:
    """A Scheduler and Servers "0" and "1" with their stores; (scheduler, cluster, leader id, follower id)."""
    scheduler = SchedulerNode(loopback_scheduler(2))
    addrs = await nursery.start(scheduler.serve)
    cluster = Cluster(nursery, tmp_path, addrs.port)
    for node_id in ("0", "1"):
        await cluster.start(node_id, job())  # type: ignore[arg-type]
    for node in list(cluster.nodes.values()):
        with trio.fail_after(20):
            await node.wait_started()
    leader = next(i for i, n in cluster.nodes.items() if n.rank == 0)
    return scheduler, cluster, leader, next(i for i in cluster.nodes if i != leader)


async def run_iteration(client: httpx.AsyncClient, c: Cluster, leader: str, iteration: int) -> None:
    await start(client, c.url(leader), iteration)
    await upload(client, [c.url(i) for i in ("0", "1")], iteration)
    node = c.nodes[leader].leader
    assert node is not None
    with trio.fail_after(30):
        assert await node.wait_ended(iteration), node.machine.failed


async def restart(c: Cluster, node_id: str) -> ServerNode:
    """Stop ``node_id`` as a crash would (its store closed, every answered commit on disk), start it again."""
    c.scopes[node_id].cancel()
    await trio.sleep(0.2)
    back = await c.start(node_id, job())  # type: ignore[arg-type]
    with trio.fail_after(30):
        await back.wait_started()
    return back


async def test_a_new_instance_between_iterations_is_a_new_history_that_restarts_keep(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=30) as client:
        scheduler, c, leader, follower = await open_two(nursery, tmp_path)
        for iteration in (1, 2):
            await run_iteration(client, c, leader, iteration)
        reply, result = await scheduler.new_instance({"fl_iteration_num": 3})
        assert (
            reply.ok
            and result is not None
            and (result.ok, result.message)
            == (
                True,
                "Start new instance successful.",
            )
        )
        # Answered after the leader's commit of the new history (rule 1); the follower's follows (rule 2).
        lead = c.nodes[leader]
        assert lead.leader is not None and lead.leader.machine.current_iteration == 1
        assert await held(lead) == [0]

        async def follower_renewed() -> bool:
            return await held(c.nodes[follower]) == [0]

        await eventually(follower_renewed, "the follower's new history")
        for node in c.nodes.values():
            assert_model(node, 0, WANT)  # the old instance's last model is model 0

        await run_iteration(client, c, leader, 1)
        # Both Servers killed and restarted: they resume in the new instance, at iteration 2.
        for node_id in (follower, leader):
            await restart(c, node_id)
        lead = c.nodes[leader]
        assert lead.leader is not None and lead.leader.machine.current_iteration == 2
        assert lead.leader.machine.config.fl_iteration_num == 3
        for node in c.nodes.values():
            assert node.rounds.store.latest()[0] == 1
        await run_iteration(client, c, leader, 2)
        for node in c.nodes.values():
            assert_model(node, 2, WANT)
        nursery.cancel_scope.cancel()
    for node_id in ("0", "1"):
        models, partial, _server = stored(c.settings(node_id).store_path)
        assert models == [0, 1, 2] and partial in (None, 2, 3), (node_id, models, partial)


async def test_a_pending_new_instance_takes_the_ended_iterations_model_as_model_0(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=30) as client:
        scheduler, c, leader, follower = await open_two(nursery, tmp_path)
        await run_iteration(client, c, leader, 1)
        await start(client, c.url(leader), 2)
        reply, result = await scheduler.new_instance({"fl_iteration_num": 4})
        assert reply.ok and result is not None and result.ok
        lead = c.nodes[leader].leader
        assert lead is not None and lead.machine.current_iteration == 2  # pending: iteration 2 goes on
        await upload(client, [c.url(i) for i in ("0", "1")], 2)

        # Iteration 2 completes and the new instance applies with it (its record goes with the old one).
        async def renewed() -> bool:
            assert lead is not None
            return lead.machine.current_iteration == 1 and [await held(n) for n in c.nodes.values()] == [
                [0],
                [0],
            ]

        await eventually(renewed, "the new instance on both Servers")
        assert lead.machine.config.fl_iteration_num == 4
        for node in c.nodes.values():
            assert node.rounds.store.latest()[0] == 0
            assert_model(node, 0, WANT)
        back = await restart(c, follower)
        assert back.rounds.store.latest()[0] == 0
        await run_iteration(client, c, leader, 1)
        nursery.cancel_scope.cancel()


async def test_a_follower_that_missed_the_new_instance_starts_over_from_the_leaders_model(
    tmp_path: Path,
) -> None:
    """Rule 3: a follower down when the new instance applied restores the old history, then takes the
    leader's model 0 on its re-sync and commits it as a new history."""
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=30) as client:
        scheduler, c, leader, follower = await open_two(nursery, tmp_path)
        await run_iteration(client, c, leader, 1)
        await start(client, c.url(leader), 2)
        # Pending (the Scheduler takes /newInstance only with every Server connected); then the
        # follower goes down, holding no update of iteration 2, which ends without it.
        reply, result = await scheduler.new_instance({"fl_iteration_num": 3})
        assert reply.ok and result is not None and result.ok
        c.scopes[follower].cancel()
        await trio.sleep(0.2)
        await upload(client, [c.url(leader)], 2)
        lead = c.nodes[leader]
        assert lead.leader is not None

        async def leader_renewed() -> bool:
            assert lead.leader is not None
            return lead.leader.machine.current_iteration == 1 and await held(lead) == [0]

        await eventually(leader_renewed, "the new instance on the leader")
        assert stored(c.settings(follower).store_path)[0] == [0, 1]
        back = await c.start(follower, job())  # type: ignore[arg-type]
        with trio.fail_after(30):
            await back.wait_started()

        async def follower_renewed() -> bool:
            return await held(back) == [0]

        await eventually(follower_renewed, "the follower's start-over from the leader's model 0")
        assert back.rounds.store.latest()[0] == 0
        assert_model(back, 0, WANT)
        await run_iteration(client, c, leader, 1)
        assert_model(back, 1, WANT)
        nursery.cancel_scope.cancel()
