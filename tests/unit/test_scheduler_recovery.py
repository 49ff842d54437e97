"""The Scheduler's side of disaster recovery (spec/recovery.md §3.1, §5, §6) on trio's virtual clock.

A real :class:`SchedulerNode` with a real store (a :class:`MemoryStore` on a volume that outlives it, or
a SQLite file on ``tmp_path``) and fake Servers on in-memory links: the membership committed, a
restarted Scheduler rebuilt from it, the grace every member gets to register again, commit before
acknowledge, and one identity per process.
"""

from __future__ import annotations

import os
import sqlite3
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from flcluster.core.cluster import ClusterState, Role
from flcluster.errors import RegistrationRefused, StoreCorrupt, StoreForeign
from flcluster.roles import leaf_exceptions
from flcluster.runtime.scheduler import SchedulerNode
from flcluster.runtime.scheduler_recovery import scheduler_identity
from flcluster.runtime.server import ServerNode
from flcluster.store import (
    SCHEMA_VERSION,
    Member,
    MemoryVolume,
    SchedulerState,
    StoreRole,
    Transition,
    open_memory_store,
    open_sqlite_store,
)
from flcluster.wire.messages import Register, RegisterReply
from tests.helpers import FL_NAME, free_ports, lenet_job, loopback_server
from tests.unit.test_scheduler_driver import HEARTBEAT_TIMEOUT, FakeServer, alive_by_id, settings

IDENTITY = scheduler_identity("20", "Lenet", 2)


def with_store(path: Path, **overrides: Any) -> Any:
    """The Scheduler's settings of :func:`settings` with a recovery store at ``path``."""
    return attrs.evolve(settings(fl_name="Lenet", **overrides), store_path=str(path))


async def register(
    fake: FakeServer, *, pid: int | None = None, port: int | None = None, recovering: bool = False
) -> Any:
    """Register ``fake`` (pid ``100 + id`` and port ``7000 + id`` unless given); return the answer."""
    n = int(fake.node_id)
    await fake.link.send(
        Register(
            node_id=fake.node_id,
            role=Role.SERVER,
            host="127.0.0.1",
            port=7000 + n if port is None else port,
            device_port=6668 + n,
            pid=100 + n if pid is None else pid,
            server_num=2,
            fl_iteration_num=20,
            recovering=recovering,
        )
    )
    answer, _ = await fake.link.receive()
    return answer


async def form(nursery: trio.Nursery, scheduler: SchedulerNode) -> list[FakeServer]:
    fakes = [FakeServer.connect(nursery, scheduler, n) for n in ("0", "1")]
    for rank, fake in enumerate(fakes):
        assert await register(fake) == RegisterReply(accepted=True, rank=rank, reason="")
        nursery.start_soon(fake.read)
    await wait_all_tasks_blocked()
    assert scheduler.state is ClusterState.CLUSTER_READY
    return fakes


FORMED = SchedulerState(
    "CLUSTER_READY",
    2,
    (Member("0", 0, "127.0.0.1", 7000, 6668), Member("1", 1, "127.0.0.1", 7001, 6669)),
    fl_iteration_num=20,
)


async def test_every_registration_is_committed_before_its_reply(autojump_clock: Any) -> None:
    volume = MemoryVolume()
    async with open_memory_store(IDENTITY, volume) as store:
        scheduler = SchedulerNode(settings(fl_name="Lenet"))
        await scheduler.recover_from(store)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(scheduler.serve, with_management=False))
            first = FakeServer.connect(nursery, scheduler, "0")
            assert (await register(first)).accepted
            # The reply came: the member it names is already in the store.
            assert (await store.load()).scheduler == SchedulerState(
                "CLUSTER_STARTING", 2, FORMED.members[:1], fl_iteration_num=20
            )
            nursery.start_soon(first.read)
            second = FakeServer.connect(nursery, scheduler, "1")
            assert (await register(second)).accepted
            assert (await store.load()).scheduler == FORMED
            # Heartbeats change nothing the store keeps: no commit for them.
            before = store.statistics().transitions
            await first.heartbeat()
            await wait_all_tasks_blocked()
            assert store.statistics().transitions == before
            nursery.cancel_scope.cancel()


async def test_a_restarted_scheduler_rebuilds_the_membership_and_gives_each_member_one_timeout(
    autojump_clock: Any,
) -> None:
    volume = MemoryVolume()
    async with open_memory_store(IDENTITY, volume) as store:
        first_life = SchedulerNode(settings(fl_name="Lenet"))
        await first_life.recover_from(store)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(first_life.serve, with_management=False))
            await form(nursery, first_life)
            nursery.cancel_scope.cancel()
    members_before = first_life.members()

    await trio.sleep(100)  # the Scheduler is down a while; the Servers keep serving meanwhile
    async with open_memory_store(IDENTITY, volume) as store:
        scheduler = SchedulerNode(settings(fl_name="Lenet"))
        await scheduler.recover_from(store)
        started = trio.current_time()
        assert scheduler.state is ClusterState.CLUSTER_READY
        assert scheduler.members() == members_before
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(scheduler.serve, with_management=False))
            # Server 1 comes back from another port (a restarted process), server 0 stays silent.
            back = FakeServer.connect(nursery, scheduler, "1")
            assert await register(back, pid=999, port=7100, recovering=True) == RegisterReply(
                accepted=True, rank=1, reason=""
            )
            nursery.start_soon(back.read)
            nursery.start_soon(back.heartbeat_forever)
            await trio.sleep_until(started + HEARTBEAT_TIMEOUT - 0.001)
            await wait_all_tasks_blocked()
            assert alive_by_id(scheduler.members()) == {"0": True, "1": True}
            await trio.sleep_until(started + HEARTBEAT_TIMEOUT)
            await wait_all_tasks_blocked()
            assert alive_by_id(scheduler.members()) == {"0": False, "1": True}
            assert scheduler.state is ClusterState.NODE_TIMEOUT
            news = back.memberships()[-1]
            assert news.state is ClusterState.NODE_TIMEOUT
            assert [(m.rank, m.node_id, m.port) for m in news.members] == [(0, "0", 7000), (1, "1", 7100)]
            # The store has the new address and the state.
            assert (await store.load()).scheduler == attrs.evolve(
                FORMED,
                cluster_state="NODE_TIMEOUT",
                members=(FORMED.members[0], attrs.evolve(FORMED.members[1], port=7100)),
            )
            # Server 0 comes back late: same rank, the cluster is ready again.
            late = FakeServer.connect(nursery, scheduler, "0")
            assert await register(late, recovering=True) == RegisterReply(accepted=True, rank=0, reason="")
            nursery.start_soon(late.read)
            await wait_all_tasks_blocked()
            assert scheduler.state is ClusterState.CLUSTER_READY
            assert (await store.load()).scheduler.cluster_state == "CLUSTER_READY"  # type: ignore[union-attr]
            nursery.cancel_scope.cancel()


async def test_a_scheduler_restarted_during_formation_completes_it(autojump_clock: Any) -> None:
    volume = MemoryVolume()
    async with open_memory_store(IDENTITY, volume) as store:
        await store.commit(
            Transition(scheduler=SchedulerState("CLUSTER_STARTING", 2, FORMED.members[:1], 20))
        )
    async with open_memory_store(IDENTITY, volume) as store:
        scheduler = SchedulerNode(settings(fl_name="Lenet"))
        await scheduler.recover_from(store)
        assert scheduler.state is ClusterState.CLUSTER_STARTING
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(scheduler.serve, with_management=False))
            new = FakeServer.connect(nursery, scheduler, "1")
            assert (await register(new)).rank == 1
            old = FakeServer.connect(nursery, scheduler, "0")
            assert (await register(old)).rank == 0
            await wait_all_tasks_blocked()
            assert scheduler.state is ClusterState.CLUSTER_READY
            assert (await store.load()).scheduler == FORMED
            nursery.cancel_scope.cancel()


async def test_a_failed_commit_sends_no_reply_and_changes_nothing(
    autojump_clock: Any, tmp_path: Path
) -> None:
    async with open_sqlite_store(tmp_path / "s.sqlite", IDENTITY) as store:
        scheduler = SchedulerNode(settings(fl_name="Lenet"))
        await scheduler.recover_from(store)
        await store.aclose()  # every commit now fails (StoreClosed, a StoreError)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(scheduler.serve, with_management=False))
            fake = FakeServer.connect(nursery, scheduler, "0")
            await fake.link.send(
                Register("0", Role.SERVER, "127.0.0.1", 7000, 6668, 100, 2, 20, recovering=False)
            )
            nursery.start_soon(fake.read)
            await wait_all_tasks_blocked()
            assert fake.received == []  # no register_reply, no membership: the link was just closed
            assert scheduler.members() == ()
            assert scheduler.state is ClusterState.CLUSTER_STARTING
            nursery.cancel_scope.cancel()


async def test_a_scheduler_store_on_disk_survives_the_restart(tmp_path: Path) -> None:
    # Real time: the SQLite store answers from its own thread, which an autojump clock would jump past.
    path = tmp_path / "recovery.scheduler-20.sqlite"
    first_life = SchedulerNode(with_store(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(first_life.serve, with_management=False))
        await form(nursery, first_life)
        nursery.cancel_scope.cancel()
    second_life = SchedulerNode(with_store(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(second_life.serve, with_management=False))
        assert second_life.members() == first_life.members()
        assert second_life.state is ClusterState.CLUSTER_READY
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"fl_name": "OtherJob"}, "fl_name 'Lenet' (this node has 'OtherJob')"),
        ({"server_num": 3}, "server_num 2 (this node has 3)"),
    ],
)
async def test_a_store_of_another_job_stops_the_scheduler(
    tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    path = tmp_path / "recovery.scheduler-20.sqlite"
    async with open_sqlite_store(path, IDENTITY) as store:
        await store.commit(Transition(scheduler=FORMED))
    before = path.read_bytes()
    scheduler = SchedulerNode(attrs.evolve(with_store(path), **change))
    with pytest.raises(StoreForeign) as refused:
        await scheduler.serve(with_management=False)
    assert str(path) in str(refused.value) and expected in str(refused.value)
    assert path.read_bytes() == before


async def test_a_stored_state_no_scheduler_writes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    async with open_sqlite_store(path, IDENTITY) as store:
        await store.commit(Transition(scheduler=attrs.evolve(FORMED, fl_iteration_num=None)))
    with pytest.raises(StoreCorrupt, match="fl_iteration_num is None with 2 nodes registered") as refused:
        await SchedulerNode(with_store(path)).serve(with_management=False)
    assert str(path) in str(refused.value)


async def test_a_version_2_scheduler_store_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite"
    async with open_sqlite_store(path, IDENTITY) as store:
        await store.commit(Transition(scheduler=FORMED))
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE device_rows")  # what versions 3 and 4 added
    conn.execute("ALTER TABLE scheduler_state DROP COLUMN fl_iteration_num")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    async with open_sqlite_store(path, IDENTITY) as store:
        assert (await store.load()).scheduler == attrs.evolve(FORMED, fl_iteration_num=None)
        await store.commit(Transition(scheduler=FORMED))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    async with open_sqlite_store(path, IDENTITY) as store:
        assert (await store.load()).scheduler == FORMED


# --------------------------------------------------------------------- one identity, one process


async def test_a_live_node_id_is_refused_to_another_process(autojump_clock: Any) -> None:
    scheduler = SchedulerNode(settings())
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(scheduler.serve, with_management=False))
        holder, _other = await form(nursery, scheduler)
        impostor = FakeServer.connect(nursery, scheduler, "0")
        reply = await register(impostor, pid=4242, port=7200)
        assert isinstance(reply, RegisterReply) and not reply.accepted
        assert "Node id '0' is held by a live Server at 127.0.0.1:7000 (pid 100)" in reply.reason
        assert "pid 4242" in reply.reason
        # The holder keeps its rank, address and link.
        assert (lambda m: (m.node_id, m.port, m.alive))(scheduler.members()[0]) == ("0", 7000, True)
        await holder.heartbeat()
        await wait_all_tasks_blocked()
        assert holder.received[-1].state is ClusterState.CLUSTER_READY

        # The same process reconnecting (same pid and host) takes its id back while its old link is open.
        again = FakeServer.connect(nursery, scheduler, "0")
        assert await register(again, port=7300) == RegisterReply(accepted=True, rank=0, reason="")
        nursery.start_soon(again.read)
        await wait_all_tasks_blocked()

        # Its link closed (a SIGKILLed process's socket closes at once): a restarted process gets the id.
        await again.link.aclose()
        await wait_all_tasks_blocked()
        restarted = FakeServer.connect(nursery, scheduler, "0")
        assert await register(restarted, pid=5151, port=7400, recovering=True) == RegisterReply(
            accepted=True, rank=0, reason=""
        )
        assert scheduler.members()[0].port == 7400
        nursery.cancel_scope.cancel()


async def test_a_refused_server_stops_with_the_schedulers_reason() -> None:
    """A real ServerNode (this process's pid) given a node id a live process holds: it exits, told why."""
    scheduler = SchedulerNode(settings(heartbeat_timeout=30))
    (device_port,) = free_ports(1)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(partial(scheduler.serve, with_management=False))
        holder = FakeServer.connect(nursery, scheduler, "0")
        assert (await register(holder, pid=os.getpid() + 1)).accepted
        nursery.start_soon(holder.read)
        server = ServerNode(
            loopback_server("0", 2, scheduler_port=addresses.port, device_port=device_port),
            lenet_job(1, 20),
        )
        with trio.fail_after(20), pytest.raises(BaseException) as refused:
            await server.serve()
        (leaf,) = leaf_exceptions(refused.value)
        assert isinstance(leaf, RegistrationRefused)
        assert f"Node id '0' is held by a live Server at 127.0.0.1:7000 (pid {os.getpid() + 1})" in str(leaf)
        nursery.cancel_scope.cancel()


def test_the_identity_names_the_scheduler_role() -> None:
    assert IDENTITY.role is StoreRole.SCHEDULER and IDENTITY.fl_name == FL_NAME


@pytest.mark.parametrize(
    ("connected", "pid", "host", "now_ms", "accepted"),
    [
        (True, 5, "127.0.0.1", 1_000, False),  # live, linked, another pid: refused
        (True, 1, "10.0.0.9", 1_000, False),  # same pid on another host is another process
        (True, 1, "127.0.0.1", 1_000, True),  # the same process reconnecting
        (False, 5, "127.0.0.1", 1_000, True),  # the holder's link is closed
        (True, 5, "127.0.0.1", 30_000, True),  # the holder's heartbeat timed out (not yet reaped)
    ],
)
def test_the_core_rule_one_identity_one_process(
    connected: bool, pid: int, host: str, now_ms: int, accepted: bool
) -> None:
    from flcluster.core.cluster import ClusterConfig, ClusterMachine, NodeInfo, RegisterNode

    def event(pid: int, host: str, now_ms: int, connected: bool) -> RegisterNode:
        info = NodeInfo(node_id="0", role=Role.SERVER, host=host, port=7000, device_port=6668, pid=pid)
        return RegisterNode(
            cause="c",
            info=info,
            server_num=2,
            fl_iteration_num=20,
            recovering=False,
            holder_connected=connected,
            now_ms=now_ms,
        )

    machine = ClusterMachine(ClusterConfig(server_num=2, heartbeat_timeout_ms=30_000))
    assert machine.handle(event(1, "127.0.0.1", 0, False)).reply.rank == 0  # type: ignore[union-attr]
    before = machine.snapshot()
    reply = machine.handle(event(pid, host, now_ms, connected)).reply
    assert (type(reply).__name__ == "AcceptRegistration") is accepted
    if not accepted:
        assert machine.snapshot() == before
        assert "Node id '0' is held by a live Server at 127.0.0.1:7000 (pid 1)" in reply.reason  # type: ignore[union-attr]
