"""The leader's side of its followers' peer links (spec/device-protocol.md, "How the Servers share an
iteration").

Theory of operation
-------------------
Every follower keeps one peer link to the leader. :class:`PeerHub` holds the leader's handle on each
(:class:`FollowerLink`) and serves it: a reader that turns the follower's pipelined ``leader_call``
frames into counting calls at the leader's driver (a :class:`LeaderDesk`), its ``cipher_call`` frames into
cipher-round requests there, and routes the follower's
``partial_sums`` and ``model_installed`` frames to the aggregation waiting for them, and one ordered
writer that drains the follower's outbox. Pushes (answers, iteration status, dropped partials) go
through that outbox so a follower sees them in the order the leader made them; a follower too slow to
drain it is dropped (it reconnects and resyncs).

The aggregation reaches the followers only through :meth:`PeerHub.collect` (one follower's partial
sums of an iteration) and :meth:`PeerHub.publish` (the new model to every follower, waiting until each
has installed it). A follower that leaves while an aggregation waits for its sums fails that wait at
once, not at its timeout.

The hub belongs to one run of the leader role: when the role ends (:meth:`PeerHub.close`) every
follower's link is cancelled, so the followers reconnect to whichever Server is leader next.

Nursery tree (each follower's task runs in the peer listener's nursery, in a cancel scope of the hub)::

    follower link ──┬ reader (calls, partial sums, installs, pings)
                    └ ordered writer (the outbox)
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from flcluster.core.iteration import Rejected
from flcluster.errors import FollowerLeft, FrameError, MessageError
from flcluster.runtime.links import FramedLink, LinkClosed, run_session
from flcluster.runtime.peer_wire import answer_of, request_of
from flcluster.runtime.rounds import CountRequest, LeaderReply, RoundService
from flcluster.wire.codes import CipherRound, ResponseCode
from flcluster.wire.messages import (
    CipherCall,
    CipherReply,
    CollectPartial,
    DropPartials,
    ErrorReply,
    HeldUpdates,
    InstanceRenewedMsg,
    IterationStatus,
    LeaderAnswer,
    LeaderCall,
    ModelInstalled,
    PartialSums,
    PeerPing,
    PublishModel,
    UpdatesCommitted,
)
from flcluster.wire.model_bytes import weights_to_bytes

log = logging.getLogger("flcluster.leader")

#: Seconds a collection of partial sums, or a publication, may take before it fails the iteration.
COLLECT_TIMEOUT = 30.0
#: Pushes queued for one follower before it counts as not keeping up.
OUTBOX = 4096

Push = (
    IterationStatus
    | DropPartials
    | ErrorReply
    | LeaderAnswer
    | InstanceRenewedMsg
    | tuple[CipherReply, bytes]
)
"""What the leader queues for a follower (sent in order by its writer; a cipher answer with its payload)."""


class LeaderDesk(Protocol):
    """What the hub needs from the leader's driver."""

    async def call(self, request: CountRequest, server: str) -> LeaderReply:
        """Run the counting part of one device request that landed on Server ``server``."""
        ...

    def confirm(self, server: str, iteration: int, fl_ids: tuple[str, ...]) -> None:
        """Server ``server`` committed these folds (spec/recovery.md §4)."""
        ...

    def resync(self, server: str, iteration: int, fl_ids: tuple[str, ...]) -> None:
        """Server ``server`` (re)linked; its committed sum of ``iteration`` holds ``fl_ids``."""
        ...

    def status(self) -> IterationStatus:
        """The iteration status as followers are told it."""
        ...

    async def cipher(self, round_: CipherRound, body: bytes, server: str) -> bytes | str:
        """Run one cipher-round request that landed on Server ``server``."""
        ...

    def plan_message(self) -> InstanceRenewedMsg | None:
        """The FLPlan values a new instance set, for a follower that links (None: the job's own)."""
        ...


class FollowerLink:
    """The leader's handle on one follower's link, with an ordered outbound queue for pushes."""

    def __init__(self, node_id: str, rank: int, link: FramedLink) -> None:
        self.node_id = node_id
        self.rank = rank
        self.link = link
        self.partials: dict[int, trio.MemorySendChannel[tuple[PartialSums, bytes]]] = {}
        self.installs: dict[int, trio.Event] = {}
        self.outbox, self._queued = trio.open_memory_channel[Push](OUTBOX)
        self.scope = trio.CancelScope()

    def post(self, msg: Push) -> None:
        """Queue a push; drop the follower's link when it does not keep up."""
        try:
            self.outbox.send_nowait(msg)
        except trio.WouldBlock:
            log.warning("follower %r does not keep up with the leader; dropping its link", self.node_id)
            self.outbox.close()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def write(self) -> None:
        """Send queued pushes in order until the queue is closed."""
        async with self._queued:
            async for msg in self._queued:
                if isinstance(msg, tuple):
                    await self.link.send(*msg)
                else:
                    await self.link.send(msg)


class PeerHub:
    """The followers linked to this leader, for one run of the leader role (module docstring)."""

    def __init__(self, rounds: RoundService) -> None:
        self._rounds = rounds
        self._followers: dict[str, FollowerLink] = {}
        self._linked: dict[str, trio.Event] = {}
        self._closed = False

    async def wait_linked(self, node_id: str) -> None:
        """Wait until follower ``node_id`` is linked (and re-synced)."""
        while node_id not in self._followers:
            await self._linked.setdefault(node_id, trio.Event()).wait()

    def linked(self) -> list[str]:
        """The node ids of the followers linked now."""
        return list(self._followers)

    def broadcast(self, msg: Push) -> None:
        """Queue ``msg`` for every follower."""
        for follower in list(self._followers.values()):
            follower.post(msg)

    def close(self) -> None:
        """The leader role ended: cancel every follower's link (they reconnect to the next leader)."""
        self._closed = True
        for follower in list(self._followers.values()):
            follower.scope.cancel()

    async def collect(self, node_id: str, iteration: int) -> tuple[PartialSums, bytes]:
        """Ask follower ``node_id`` for its partial sums of ``iteration`` and wait for them.

        Raises:
            AggregationError: the follower has no link, or left before answering.
            trio.TooSlowError: it did not answer within :data:`COLLECT_TIMEOUT`.
        """
        follower = self._followers.get(node_id)
        if follower is None:
            raise FollowerLeft(f"Server {node_id!r} has no link to the leader; its updates are unreachable")
        send, receive = trio.open_memory_channel[tuple[PartialSums, bytes]](1)
        follower.partials[iteration] = send
        try:
            with trio.fail_after(COLLECT_TIMEOUT):
                await follower.link.send(CollectPartial(iteration=iteration))
                return await receive.receive()
        except trio.EndOfChannel:
            raise FollowerLeft(f"Server {node_id!r} left before sending its partial sums") from None
        finally:
            follower.partials.pop(iteration, None)

    async def publish(self, iteration: int, payload: bytes) -> None:
        """Send the model of ``iteration`` to every follower and wait until each has installed it.

        The model is committed here before this is called, so a follower that does not install it in
        time (or whose link breaks) loses its link and takes the model when it re-syncs (the hello
        answer carries the current model, spec/recovery.md §5 ``leader.publishing``): publication never
        fails an iteration.
        """
        followers = list(self._followers.values())
        for follower in followers:
            follower.installs[iteration] = trio.Event()

        async def one(follower: FollowerLink) -> None:
            with trio.move_on_after(COLLECT_TIMEOUT) as scope:
                try:
                    await follower.link.send(PublishModel(iteration=iteration), payload)
                    await follower.installs[iteration].wait()
                except (LinkClosed, FrameError):
                    follower.scope.cancel()
            if scope.cancelled_caught:
                log.warning(
                    "follower %r did not install model %d in time; dropping its link",
                    follower.node_id,
                    iteration,
                )
                follower.scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                for follower in followers:
                    nursery.start_soon(one, follower)
        finally:
            for follower in followers:
                follower.installs.pop(iteration, None)

    async def serve_follower(
        self, link: FramedLink, node_id: str, rank: int, desk: LeaderDesk, held: HeldUpdates
    ) -> None:
        """Serve one follower's peer link (after its hello) until it closes or the role ends.

        The follower is first re-synced (``held``: what its committed sum holds, spec/recovery.md
        §5.1) and brought in step: the iteration status and the current model.
        """
        if self._closed:
            return
        old = self._followers.get(node_id)
        if old is not None:
            old.scope.cancel()
        follower = FollowerLink(node_id, rank, link)
        desk.resync(node_id, held.iteration, held.fl_ids)

        async def answer(call: LeaderCall) -> None:
            try:
                request = request_of(call)
            except MessageError as exc:
                # A call with malformed bytes fields (pki_verify): refused, nothing counted.
                refused = Rejected(ResponseCode.RequestError, str(exc), desk.status().next_req_time_ms)
                follower.post(answer_of(call.call_id, refused))
                return
            follower.post(answer_of(call.call_id, await desk.call(request, node_id)))

        async def cipher_answer(call: CipherCall, body: bytes) -> None:
            answer = await desk.cipher(call.round, body, node_id)
            if isinstance(answer, str):
                follower.post((CipherReply(call.call_id, True, answer), b""))
            else:
                follower.post((CipherReply(call.call_id, False, ""), answer))

        async def read() -> None:
            lost: LinkClosed | FrameError | None = None
            async with trio.open_nursery() as calls:
                try:
                    while True:
                        try:
                            msg, payload = await link.receive()
                        except MessageError as exc:
                            follower.post(ErrorReply(reason=str(exc)))
                            continue
                        dispatch(msg, payload, calls)
                except (LinkClosed, FrameError) as exc:
                    lost = exc
                    calls.cancel_scope.cancel()
            if lost is not None:
                raise lost

        def dispatch(msg: object, payload: bytes, calls: trio.Nursery) -> None:
            match msg:
                case LeaderCall():
                    calls.start_soon(answer, msg)
                case CipherCall():
                    calls.start_soon(cipher_answer, msg, payload)
                case UpdatesCommitted(iteration=it, fl_ids=fl_ids):
                    desk.confirm(node_id, it, fl_ids)
                case PartialSums(iteration=it):
                    channel = follower.partials.get(it)
                    if channel is not None:
                        channel.send_nowait((msg, payload))
                case ModelInstalled(iteration=it):
                    event = follower.installs.get(it)
                    if event is not None:
                        event.set()
                case PeerPing():
                    pass
                case _:
                    follower.post(ErrorReply(reason=f"unexpected {type(msg).__name__} on a peer link"))

        try:
            with follower.scope:
                self._followers[node_id] = follower
                self._linked.pop(node_id, trio.Event()).set()
                iteration, weights = self._rounds.store.latest()
                plan = desk.plan_message()
                if plan is not None:
                    await link.send(plan)  # before the status: devices get the new instance's FLPlan
                await link.send(desk.status())
                await link.send(
                    PublishModel(iteration=iteration), weights_to_bytes(weights, self._rounds.spec)
                )
                lost = await run_session(follower.write, read)
                log.info("follower %r left: %s", node_id, lost or "its queue was closed")
            if follower.scope.cancelled_caught:
                log.info("follower %r unlinked: the leader role ended", node_id)
        except (LinkClosed, FrameError) as exc:
            log.info("follower %r left: %s", node_id, exc)
        finally:
            follower.outbox.close()
            for waiting in follower.partials.values():
                waiting.close()  # an aggregation waiting for this follower fails now, not at its timeout
            if self._followers.get(node_id) is follower:
                del self._followers[node_id]


__all__ = ["COLLECT_TIMEOUT", "OUTBOX", "FollowerLeft", "FollowerLink", "LeaderDesk", "PeerHub", "Push"]
