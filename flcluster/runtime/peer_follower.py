"""A follower's side of its peer link to the leader.

Theory of operation
-------------------
A follower runs a :class:`FollowerSession` over its link to the leader. It forwards the counting part
of device requests as pipelined ``leader_call`` frames (many in flight, matched by ``call_id``) and
forwards cipher-round bodies as pipelined ``cipher_call`` frames (answered ``cipher_answer``, the
response table as payload), and carries out what the leader pushes: a new instance's FLPlan values
(``instance_renewed``), the iteration status (applied to this Server's
:class:`~flcluster.runtime.rounds.RoundService`), models to install (answered ``model_installed``),
requests for this Server's partial sums of an iteration (with the fl_ids they hold), and partial sums
to drop. After each committed fold it sends the leader an ``updates_committed`` confirmation
(pipelined, unanswered; spec/recovery.md §4). The session counts
as *synced* once the leader has sent both the status and the current model; only then does the
Server's role attach it as the way to the leader.

If the link drops, calls in flight answer the safemode text, so the device retries; nothing was
counted for them at a leader that never answered.

Nursery tree (inside the follower role's link task)::

    session reader ── partial-sum senders (one per collect_partial)
"""

from __future__ import annotations

import contextlib
import itertools
import logging

import trio

from flcluster.core.iteration import ClientParams, PlainText
from flcluster.crashpoints import crash_point
from flcluster.http.device import DeviceAnswer
from flcluster.runtime.links import FramedLink, LinkClosed
from flcluster.runtime.peer_wire import call_of, reply_of, view_of
from flcluster.runtime.rounds import CountRequest, LeaderReply, RoundService
from flcluster.wire.codes import SAFEMODE_TEXT, CipherRound
from flcluster.wire.messages import (
    CipherCall,
    CipherReply,
    CollectPartial,
    DropPartials,
    ErrorReply,
    InstanceRenewedMsg,
    IterationStatus,
    LeaderAnswer,
    ModelInstalled,
    PartialSums,
    PeerPing,
    PublishModel,
    UpdatesCommitted,
)
from flcluster.wire.model_bytes import weights_from_bytes

log = logging.getLogger("flcluster.follower")


class FollowerSession:
    """A follower's side of its peer link: pipelined calls out, leader pushes in."""

    def __init__(self, link: FramedLink, rounds: RoundService) -> None:
        self._link = link
        self._rounds = rounds
        self._ids = itertools.count()
        self._waiting: dict[int, trio.MemorySendChannel[LeaderReply]] = {}
        self._cipher_waiting: dict[int, trio.MemorySendChannel[DeviceAnswer]] = {}
        self._synced = trio.Event()
        self._closed = False

    async def call(self, request: CountRequest) -> LeaderReply:
        """Send one counting call and wait for its answer (safemode text if the link drops)."""
        if self._closed:
            return PlainText(SAFEMODE_TEXT)
        call_id = next(self._ids)
        send, receive = trio.open_memory_channel[LeaderReply](1)
        self._waiting[call_id] = send
        try:
            await self._link.send(call_of(call_id, request))
            return await receive.receive()
        except (LinkClosed, trio.EndOfChannel):
            return PlainText(SAFEMODE_TEXT)
        finally:
            self._waiting.pop(call_id, None)

    async def cipher(self, round_: CipherRound, body: bytes) -> DeviceAnswer:
        """Forward one cipher-round body to the leader and wait for its answer (safemode text if the link
        drops; spec/secure-aggregation.md §R6)."""
        if self._closed:
            return SAFEMODE_TEXT
        call_id = next(self._ids)
        send, receive = trio.open_memory_channel[DeviceAnswer](1)
        self._cipher_waiting[call_id] = send
        try:
            await self._link.send(CipherCall(call_id, round_), body)
            return await receive.receive()
        except (LinkClosed, trio.EndOfChannel):
            return SAFEMODE_TEXT
        finally:
            self._cipher_waiting.pop(call_id, None)

    async def confirm(self, iteration: int, fl_ids: tuple[str, ...]) -> None:
        """Send the leader a confirmation of committed folds (pipelined; no answer).

        A confirmation lost with the link is not lost for good: the next peer hello carries every
        fl_id the committed sum holds (spec/recovery.md §5.1).
        """
        if self._closed:
            return
        with contextlib.suppress(LinkClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            await self._link.send(UpdatesCommitted(iteration=iteration, fl_ids=fl_ids))

    async def wait_synced(self) -> None:
        """Wait until the leader has sent the iteration status and the current model."""
        await self._synced.wait()

    async def run(self) -> None:
        """Read the leader's frames until the link closes; then fail every call in flight."""
        got_status = got_model = False
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        msg, payload = await self._link.receive()
                    except LinkClosed:
                        nursery.cancel_scope.cancel()
                        return
                    match msg:
                        case LeaderAnswer(call_id=call_id):
                            channel = self._waiting.get(call_id)
                            if channel is not None:
                                channel.send_nowait(reply_of(msg))
                        case CipherReply(call_id=call_id, plain=plain, text=text):
                            waiting = self._cipher_waiting.get(call_id)
                            if waiting is not None:
                                waiting.send_nowait(text if plain else payload)
                        case IterationStatus():
                            self._rounds.apply_view(view_of(msg))
                            self._rounds.drop_sums_before(msg.iteration)
                            got_status = True
                        case PublishModel(iteration=iteration):
                            self._rounds.install_model(
                                iteration, weights_from_bytes(payload, self._rounds.spec), from_leader=True
                            )
                            # Committed before model_installed (spec/recovery.md §3.2).
                            await self._rounds.persist_model(iteration)
                            got_model = True
                            await self._link.send(ModelInstalled(iteration=iteration))
                        case CollectPartial(iteration=iteration):
                            nursery.start_soon(self._send_partial, iteration)
                        case DropPartials(iteration=iteration):
                            self._rounds.drop_partials(iteration)
                        case InstanceRenewedMsg(epochs=epochs, mini_batch=mini_batch, lr=lr, reset=reset):
                            # A new instance (spec/cluster-protocol.md §9): its FLPlan values; with reset
                            # it applies now, and this Server's latest model becomes model 0, committed
                            # as a new history before anything else is taken from the link (rule 2).
                            self._rounds.set_client(ClientParams(epochs, mini_batch, lr))
                            if reset:
                                self._rounds.renew()
                                crash_point("follower.new_instance")
                                await self._rounds.persist_model(0)
                        case ErrorReply(reason=reason):
                            log.warning("the leader reports an error: %s", reason)
                        case PeerPing():
                            pass
                        case _:
                            log.warning("ignoring an unexpected %r from the leader", msg.TYPE)
                    if got_status and got_model:
                        self._synced.set()
        finally:
            self._closed = True
            for channel in list(self._waiting.values()):
                channel.close()
            for waiting in list(self._cipher_waiting.values()):
                waiting.close()

    async def _send_partial(self, iteration: int) -> None:
        partial, fl_ids = await self._rounds.collect_partial(iteration)
        total_get, accepted_get = self._rounds.take_get_model_counts()
        msg = PartialSums(iteration, partial.update_count, total_get, accepted_get, fl_ids)
        await self._link.send(msg, partial.to_bytes())


__all__ = ["FollowerSession"]
