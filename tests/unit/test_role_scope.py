"""A Server's role follows the membership (spec/cluster-protocol.md, "Role scope").

Two real Servers over loopback, with a stand-in Scheduler that speaks the cluster protocol and can
renumber them (as scaling will): when the ranks swap, each Server's role scope is cancelled and
restarted, the new rank 0 leads, the old one follows it, and the device port stays up throughout.
"""

from __future__ import annotations

import httpx
import trio

from flcluster.core.cluster import ClusterState
from flcluster.errors import FrameError
from flcluster.runtime.links import FramedLink, LinkClosed
from flcluster.runtime.server import RoleKey, ServerNode, ServerStarted
from flcluster.wire.client_codec import decode_start_fl_job_response, encode_start_fl_job_request
from flcluster.wire.codes import ResponseCode
from flcluster.wire.messages import MemberRecord, Membership, Register, RegisterReply
from tests.helpers import FL_NAME, lenet_job, loopback_server


class StandInScheduler:
    """Accepts registrations with the ranks it is told and sends the memberships it is asked to."""

    def __init__(self, ranks: dict[str, int]) -> None:
        self.ranks = ranks
        self.registered: dict[str, Register] = {}
        self.links: dict[str, FramedLink] = {}
        self.changed = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        link = FramedLink(stream)
        msg, _ = await link.receive()
        assert isinstance(msg, Register)
        self.registered[msg.node_id] = msg
        self.links[msg.node_id] = link
        await link.send(RegisterReply(accepted=True, rank=self.ranks[msg.node_id], reason=""))
        self.changed.set()
        try:
            while True:
                await link.receive()  # heartbeats
        except (LinkClosed, FrameError):
            pass

    async def wait_registered(self, count: int) -> None:
        while len(self.registered) < count:
            self.changed = trio.Event()
            await self.changed.wait()

    async def announce(self) -> None:
        members = tuple(
            MemberRecord(
                rank=self.ranks[node_id],
                node_id=node_id,
                host=r.host,
                port=r.port,
                device_port=r.device_port,
                alive=True,
            )
            for node_id, r in sorted(self.registered.items())
        )
        for link in self.links.values():
            await link.send(Membership(state=ClusterState.CLUSTER_READY, members=members))


def start_body(fl_id: str) -> bytes:
    return encode_start_fl_job_request(fl_name=FL_NAME, fl_id=fl_id, iteration=0, data_size=10, timestamp="t")


async def wait_for_role(server: ServerNode, key: RoleKey) -> None:
    """Wait until ``server`` runs the role ``key`` (its leader driver up, or its follower link synced)."""
    await server.wait_role(key)
    assert server.line.attached


async def test_a_server_whose_rank_changes_restarts_its_role() -> None:
    scheduler = StandInScheduler({"a": 0, "b": 1})
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, scheduler.handle, 0)
        scheduler_port = listeners[0].socket.getsockname()[1]
        a, b = (
            ServerNode(
                loopback_server(node_id, 2, scheduler_port=scheduler_port, fl_iteration_num=5),
                lenet_job(threshold=2, iterations=5),
            )
            for node_id in "ab"
        )
        started: dict[str, ServerStarted] = {}

        async def start(server: ServerNode) -> None:
            started[server.settings.node_id] = await nursery.start(server.serve)

        with trio.fail_after(30):
            nursery.start_soon(start, a)
            nursery.start_soon(start, b)
            await scheduler.wait_registered(2)
            await scheduler.announce()
            await a.wait_started()
            await b.wait_started()
            first_a, first_b = RoleKey(0, "a", a.host, a.peer_port), RoleKey(1, "a", a.host, a.peer_port)
            await wait_for_role(b, first_b)
            assert a.roles == [first_a] and a.leader is not None and b.leader is None
            # A device at the follower is counted at the leader.
            answer = decode_start_fl_job_response(await b.rounds.start_fl_job(start_body("d1")))
            assert answer.retcode == ResponseCode.SUCCEED and answer.iteration == 1
            assert a.machine is not None and a.machine.counts().start_fl_job == 1

            # The membership renumbers the Servers: b is rank 0 now, a follows it.
            scheduler.ranks = {"a": 1, "b": 0}
            await scheduler.announce()
            second_a, second_b = RoleKey(1, "b", b.host, b.peer_port), RoleKey(0, "b", b.host, b.peer_port)
            await wait_for_role(b, second_b)
            await wait_for_role(a, second_a)
        assert a.roles == [first_a, second_a] and b.roles == [first_b, second_b]
        assert a.leader is None and b.leader is not None and b.machine is not None
        # The old leader's machine stays as it was; counting is at the new leader now, and a's
        # device port answered throughout (the same socket, never closed).
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{started['a'].device_urls[0]}/startFLJob", content=start_body("d2")
            )
        answer = decode_start_fl_job_response(response.content)
        assert answer.retcode == ResponseCode.SUCCEED and answer.iteration == 1
        assert b.machine.counts().start_fl_job == 1
        assert a.machine.counts().start_fl_job == 1
        nursery.cancel_scope.cancel()
