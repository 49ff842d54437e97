"""The leader's side of federated iterations, and the followers' side of the peer link.

Theory of operation
-------------------
Server rank 0 runs a :class:`Leader`: the trio driver of the sans-IO
:class:`~flcluster.core.iteration.IterationMachine`. It is the only place where device requests are
counted, so the counters are exact however requests are spread over Servers. Everything reaches the
machine through :meth:`Leader.feed`, which applies one event and carries out its instructions in order:

- ``ArmWindow`` / ``DisarmWindow``: a window is a task in the leader's nursery sleeping in its own
  cancel scope until the deadline (on trio's clock, so tests run on ``autojump_clock``), then feeding
  ``WindowClosed``; disarming cancels the scope.
- ``AggregateIteration``: a task collects every Server's partial sums (its own and each follower's, in
  rank order), checks that they hold exactly the acknowledged updates, finalises FedAvg with torch off
  the event loop, publishes the model to every follower, waits for each to install it, and only then
  feeds ``AggregationDone``; any failure feeds ``AggregationFailed`` and the old model carries over.
- ``DiscardPartials``: every Server drops the sums of the failed iteration and carries the model over.
- Any change of iteration, phase or instance state is pushed to every follower as ``iteration_status``.

A follower runs a :class:`FollowerSession` over its link to the leader: it forwards the counting part
of device requests as pipelined ``leader_call`` frames (many in flight, matched by ``call_id``) and
carries out what the leader pushes. If the link drops, calls in flight answer the safemode text, so the
device retries; nothing was counted for them at a leader that never answered.

Nursery tree (inside the Server's)::

    leader ──┬ window tasks (one per armed window, each in its own cancel scope)
             └ aggregation task (at most one at a time)
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from flcluster.aggregation import AggregationError, PartialSum, combine, finalize
from flcluster.aggregation.checkpoint import save_checkpoint
from flcluster.aggregation.metrics import ClientVisitedInfo, IterationMetrics, MetricsWriter
from flcluster.core.iteration import (
    Accepted,
    AggregateIteration,
    AggregationDone,
    AggregationFailed,
    ArmWindow,
    DisarmWindow,
    DiscardPartials,
    Event,
    InstanceState,
    InstanceStateChanged,
    IterationCompleted,
    IterationFailed,
    IterationMachine,
    OperatorAnswer,
    Phase,
    PlainText,
    Rejected,
    StartFLJobReceived,
    UpdateModelReceived,
    WindowClosed,
    WindowKind,
)
from flcluster.errors import FrameError, MessageError
from flcluster.runtime.links import FramedLink, LinkClosed, run_session
from flcluster.runtime.rounds import (
    CountRequest,
    IterationView,
    LeaderReply,
    RoundService,
)
from flcluster.wire.codes import SAFEMODE_TEXT, ResponseCode
from flcluster.wire.messages import (
    CollectPartial,
    DropPartials,
    ErrorReply,
    IterationStatus,
    LeaderAnswer,
    LeaderCall,
    ModelInstalled,
    PartialSums,
    PeerPing,
    PublishModel,
)
from flcluster.wire.model_bytes import weights_from_bytes, weights_to_bytes

log = logging.getLogger("flcluster.leader")

COLLECT_TIMEOUT = 30.0
OPS = ("startFLJob", "updateModel")


class EpochClock:
    """Epoch milliseconds read off trio's clock, so virtual time (``autojump_clock``) moves it too."""

    def __init__(self) -> None:
        self._offset = time.time() - trio.current_time()

    def now_ms(self) -> int:
        """Now, in epoch milliseconds."""
        return int((trio.current_time() + self._offset) * 1000)

    def trio_time(self, epoch_ms: int) -> float:
        """The trio clock reading at which the epoch reaches ``epoch_ms``."""
        return epoch_ms / 1000 - self._offset


OUTBOX = 4096


class _Follower:
    """The leader's handle on one follower's link, with an ordered outbound queue for pushes.

    Pushes (status, dropped partials) go through the queue and one writer task, so a follower sees
    them in the order the leader made them; a follower too slow to drain its queue is dropped (it
    reconnects and resyncs).
    """

    def __init__(self, node_id: str, rank: int, link: FramedLink) -> None:
        self.node_id = node_id
        self.rank = rank
        self.link = link
        self.partials: dict[int, trio.MemorySendChannel[tuple[PartialSums, bytes]]] = {}
        self.installs: dict[int, trio.Event] = {}
        self.outbox, self._queued = trio.open_memory_channel[tuple[Any, bytes]](OUTBOX)

    def post(self, msg: Any, payload: bytes = b"") -> None:
        """Queue a push; drop the follower's link when it does not keep up."""
        try:
            self.outbox.send_nowait((msg, payload))
        except trio.WouldBlock:
            log.warning("follower %r does not keep up with the leader; dropping its link", self.node_id)
            self.outbox.close()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def write(self) -> None:
        """Send queued pushes in order until the queue is closed."""
        async with self._queued:
            async for msg, payload in self._queued:
                await self.link.send(msg, payload)


@attrs.frozen
class LeaderOptions:
    """What the leader does besides counting: checkpoints, their rotation, and metrics.json.

    Built from a validated :class:`flcluster.config.FLContext` by :func:`flcluster.settings.leader_options`;
    no defaults of its own.

    Attributes:
        fl_name: The job name (names checkpoints and metrics lines).
        checkpoint_dir: Where ``<fl_name>_iteration_<N>.ckpt`` goes after each completed iteration.
        checkpoint_keep: Checkpoints kept on disk.
        metrics_path: ``metrics.json`` (from config.json's ``metrics`` section); empty: none.
        instance_name: The instance name written in metrics lines.
        participation_levels: ``participation_time_level`` in minutes (startFLJob → updateModel buckets).
    """

    fl_name: str
    checkpoint_dir: str
    checkpoint_keep: int
    metrics_path: str
    instance_name: str
    participation_levels: tuple[int, int]


@attrs.define
class _Visits:
    """What one iteration saw, for its metrics.json line (reference §3.9)."""

    start_total: int = 0
    start_accept: int = 0
    update_total: int = 0
    update_accept: int = 0
    get_total: int = 0
    get_accept: int = 0
    loss_sum: float = 0.0
    accuracy_sum: float = 0.0
    levels: list[int] = attrs.Factory(lambda: [0, 0, 0])

    def info(self) -> ClientVisitedInfo:
        return ClientVisitedInfo(
            start_fl_job_total=self.start_total,
            start_fl_job_accept=self.start_accept,
            start_fl_job_reject=self.start_total - self.start_accept,
            update_model_total=self.update_total,
            update_model_accept=self.update_accept,
            update_model_reject=self.update_total - self.update_accept,
            get_model_total=self.get_total,
            get_model_accept=self.get_accept,
            get_model_reject=self.get_total - self.get_accept,
            participation_time_level1=self.levels[0],
            participation_time_level2=self.levels[1],
            participation_time_level3=self.levels[2],
        )


class Leader:
    """The iteration driver on Server rank 0 (see the module docstring)."""

    def __init__(
        self,
        machine: IterationMachine,
        rounds: RoundService,
        clock: EpochClock,
        *,
        self_id: str,
        members: Callable[[], list[tuple[int, str]]],
        options: LeaderOptions,
    ) -> None:
        self.machine = machine
        self._self_id = self_id
        self.rounds = rounds
        self.clock = clock
        self.options = options
        self._members = members
        self._followers: dict[str, _Follower] = {}
        self._windows: dict[WindowKind, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._status: IterationStatus | None = None
        self._causes = itertools.count()
        self.completed: list[int] = []
        self.failed: list[int] = []
        self._ended = trio.Event()
        self._visits = _Visits()
        self._metrics = MetricsWriter(self.options.metrics_path) if self.options.metrics_path else None
        self._instance_name = self.options.instance_name or f"instance_{time.strftime('%Y%m%d_%H%M%S')}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the leader's nursery (windows, aggregation) until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._push_status()
            task_status.started()
            await trio.sleep_forever()

    async def wait_ended(self, iteration: int) -> bool:
        """Wait until ``iteration`` has ended; True when it completed, False when it failed."""
        while iteration not in self.completed and iteration not in self.failed:
            await self._ended.wait()
        return iteration in self.completed

    # ------------------------------------------------------------------------------ feeding

    def _cause(self, what: str) -> str:
        return f"{what}#{next(self._causes)}"

    def feed(self, event: Event) -> LeaderReply | OperatorAnswer | None:
        """Apply one event to the machine and carry out its instructions; return its reply."""
        outcome = self.machine.handle(event)
        for ins in outcome.instructions:
            self._carry_out(ins)
        self._push_status()
        return outcome.reply

    def call(self, request: CountRequest) -> LeaderReply:
        """The counting part of one device request (from this Server or a follower)."""
        now = self.clock.now_ms()
        fl_id = request.fl_id
        visits = self._visits
        match request.op:
            case "startFLJob":
                event: Event = StartFLJobReceived(
                    self._cause(f"startFLJob:{fl_id}"), fl_id, request.data_size, now
                )
                visits.start_total += 1
            case "updateModel":
                event = UpdateModelReceived(
                    self._cause(f"updateModel:{fl_id}"), fl_id, request.iteration, now
                )
                visits.update_total += 1
            case _:
                raise ValueError(f"unknown leader call {request.op!r}; expected one of {OPS}")
        reply = self.feed(event)
        assert isinstance(reply, Accepted | Rejected | PlainText)
        if isinstance(reply, Accepted):
            if request.op == "startFLJob":
                visits.start_accept += 1
            else:
                visits.update_accept += 1
                visits.loss_sum += request.upload_loss
                visits.accuracy_sum += request.upload_accuracy
                # The device's startFLJob of this iteration: held until the iteration ends.
                meta = self.machine.device_meta(fl_id)
                if meta is not None:
                    minutes = (now - meta.accepted_at_ms) / 60_000
                    level1, level2 = self.options.participation_levels
                    visits.levels[0 if minutes < level1 else 1 if minutes < level2 else 2] += 1
        return reply

    def _carry_out(self, ins: Any) -> None:
        assert self._nursery is not None, "the leader must be running"
        match ins:
            case ArmWindow(kind=kind, iteration=iteration, deadline_ms=deadline):
                old = self._windows.pop(kind, None)
                if old is not None:
                    old.cancel()
                scope = trio.CancelScope()
                self._windows[kind] = scope
                self._nursery.start_soon(self._window, scope, kind, iteration, deadline)
            case DisarmWindow(kind=kind):
                armed = self._windows.pop(kind, None)
                if armed is not None:
                    armed.cancel()
            case AggregateIteration():
                self._nursery.start_soon(self._aggregate, ins)
            case DiscardPartials(iteration=iteration):
                self.rounds.drop_partials(iteration)
                self._broadcast(DropPartials(iteration=iteration))
            case IterationCompleted(iteration=iteration, started_at_ms=start, ended_at_ms=end):
                log.info("iteration %d completed", iteration)
                self.completed.append(iteration)
                self._iteration_ended(iteration, start, end, succeeded=True)
            case IterationFailed(iteration=iteration, reason=reason, started_at_ms=start, ended_at_ms=end):
                log.info("iteration %d failed: %s", iteration, reason)
                self.failed.append(iteration)
                self._iteration_ended(iteration, end if start is None else start, end, succeeded=False)
            case InstanceStateChanged(old=old, new=new):
                log.info("instance %s -> %s", old.value, new.value)

    def _iteration_ended(self, iteration: int, start_ms: int, end_ms: int, *, succeeded: bool) -> None:
        """Write the iteration's metrics.json line (when configured) and wake :meth:`wait_ended`."""
        visits, self._visits = self._visits, _Visits()
        if self._metrics is not None:
            line = IterationMetrics(
                instance_name=self._instance_name,
                start_time_ms=start_ms,
                end_time_ms=end_ms,
                fl_name=self.options.fl_name,
                instance_status=self.machine.state.value,
                fl_iteration_num=self.machine.config.fl_iteration_num,
                current_iteration=iteration,
                metrics_auc=visits.accuracy_sum / max(visits.update_accept, 1),
                metrics_loss=visits.loss_sum / self.machine.config.update_model_threshold,
                iteration_execution_time_ms=max(end_ms - start_ms, 0),
                client_visited_info=visits.info(),
                iteration_result=succeeded,
            )
            try:
                self._metrics.write(line)
            except OSError as exc:
                log.error("cannot write %s: %s", self._metrics.path, exc)
        self._ended.set()
        self._ended = trio.Event()

    async def _window(
        self, scope: trio.CancelScope, kind: WindowKind, iteration: int, deadline_ms: int
    ) -> None:
        with scope:
            await trio.sleep_until(self.clock.trio_time(deadline_ms))
        if scope.cancelled_caught or self._windows.get(kind) is not scope:
            return
        del self._windows[kind]
        self.feed(WindowClosed(self._cause(f"window:{kind.value}"), kind, iteration, self.clock.now_ms()))

    # ---------------------------------------------------------------------------- aggregation

    async def _aggregate(self, ins: AggregateIteration) -> None:
        iteration = ins.iteration
        try:
            weights = await self._combine(ins)
            self.rounds.install_model(iteration, weights)
            payload = weights_to_bytes(weights, self.rounds.spec)
            await self._publish(iteration, payload)
            if self.options.checkpoint_dir:
                await trio.to_thread.run_sync(self._save_checkpoint, iteration, weights)
        except (
            AggregationError,
            LinkClosed,
            FrameError,
            ValueError,
            OSError,
            trio.TooSlowError,
        ) as exc:
            log.warning("aggregation of iteration %d failed: %s", iteration, exc)
            self.feed(AggregationFailed(self._cause("aggregation"), iteration, str(exc), self.clock.now_ms()))
            return
        self.feed(AggregationDone(self._cause("aggregation"), iteration, self.clock.now_ms()))

    async def _combine(self, ins: AggregateIteration) -> Any:
        iteration = ins.iteration
        partials = [await self.rounds.collect_partial(iteration)]
        total_get, accepted_get = self.rounds.take_get_model_counts()
        self._visits.get_total += total_get
        self._visits.get_accept += accepted_get
        for _rank, node_id in sorted(self._members()):
            if node_id == self._self_id:
                continue
            follower = self._followers.get(node_id)
            if follower is None:
                raise AggregationError(
                    f"Server {node_id!r} has no link to the leader; its updates are unreachable"
                )
            partials.append(await self._collect_from(follower, iteration))
        total = combine(partials)
        if total.update_count != len(ins.updates):
            raise AggregationError(
                f"partial sums hold {total.update_count} updates, but {len(ins.updates)} were acknowledged"
            )
        _latest, previous = self.rounds.store.latest()
        return await trio.to_thread.run_sync(finalize, total, previous)

    async def _collect_from(self, follower: _Follower, iteration: int) -> PartialSum:
        send, receive = trio.open_memory_channel[tuple[PartialSums, bytes]](1)
        follower.partials[iteration] = send
        try:
            with trio.fail_after(COLLECT_TIMEOUT):
                await follower.link.send(CollectPartial(iteration=iteration))
                msg, payload = await receive.receive()
        except trio.EndOfChannel:
            raise AggregationError(
                f"Server {follower.node_id!r} left before sending its partial sums"
            ) from None
        finally:
            follower.partials.pop(iteration, None)
        self._visits.get_total += msg.get_model_total
        self._visits.get_accept += msg.get_model_accept
        return PartialSum.from_bytes(payload, self.rounds.spec)

    async def _publish(self, iteration: int, payload: bytes) -> None:
        followers = list(self._followers.values())
        for follower in followers:
            follower.installs[iteration] = trio.Event()
        try:
            with trio.fail_after(COLLECT_TIMEOUT):
                for follower in followers:
                    await follower.link.send(PublishModel(iteration=iteration), payload)
                for follower in followers:
                    await follower.installs[iteration].wait()
        finally:
            for follower in followers:
                follower.installs.pop(iteration, None)

    def _save_checkpoint(self, iteration: int, weights: Any) -> None:
        save_checkpoint(
            self.options.checkpoint_dir,
            self.options.fl_name,
            iteration,
            weights,
            self.rounds.spec,
            keep=self.options.checkpoint_keep,
        )

    # ------------------------------------------------------------------------------ followers

    def status(self) -> IterationStatus:
        """The iteration status as followers are told it."""
        m = self.machine
        return IterationStatus(
            iteration=m.current_iteration,
            phase=m.phase.value,
            instance_state=m.state.value,
            next_req_time_ms=m.next_req_time_ms(self.clock.now_ms()),
        )

    def _push_status(self) -> None:
        status = self.status()
        previous = self._status
        self._status = status
        self.rounds.apply_view(view_of(status))
        if previous is None or attrs.evolve(previous, next_req_time_ms=0) != attrs.evolve(
            status, next_req_time_ms=0
        ):
            self._broadcast(status)

    def _broadcast(self, msg: Any) -> None:
        for follower in list(self._followers.values()):
            follower.post(msg)

    async def serve_follower(self, link: FramedLink, node_id: str, rank: int) -> None:
        """Serve one follower's peer link (after its hello) until it closes.

        The follower is first brought in step: the iteration status and the current model.
        """
        follower = _Follower(node_id, rank, link)
        self._followers[node_id] = follower

        async def read() -> None:
            while True:
                try:
                    msg, payload = await link.receive()
                except MessageError as exc:
                    follower.post(ErrorReply(reason=str(exc)))
                    continue
                match msg:
                    case LeaderCall(call_id=call_id, op=op):
                        if op not in OPS:
                            follower.post(ErrorReply(reason=f"unknown leader call {op!r}"))
                            continue
                        request = CountRequest(
                            op, msg.fl_id, msg.data_size, msg.iteration, msg.upload_loss, msg.upload_accuracy
                        )
                        follower.post(answer_of(call_id, self.call(request)))
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
                        follower.post(ErrorReply(reason=f"unexpected {msg.TYPE!r} on a peer link"))

        try:
            iteration, weights = self.rounds.store.latest()
            await link.send(self.status())
            await link.send(PublishModel(iteration=iteration), weights_to_bytes(weights, self.rounds.spec))
            lost = await run_session(follower.write, read)
            log.info("follower %r left: %s", node_id, lost or "its queue was closed")
        except (LinkClosed, FrameError) as exc:
            log.info("follower %r left: %s", node_id, exc)
        finally:
            follower.outbox.close()
            for waiting in follower.partials.values():
                waiting.close()  # an aggregation waiting for this follower fails now, not at its timeout
            if self._followers.get(node_id) is follower:
                del self._followers[node_id]


def view_of(status: IterationStatus) -> IterationView:
    """The :class:`IterationView` a status message describes."""
    return IterationView(
        iteration=status.iteration,
        phase=Phase(status.phase),
        instance_state=InstanceState(status.instance_state),
        next_req_time_ms=status.next_req_time_ms,
    )


def answer_of(call_id: int, reply: LeaderReply) -> LeaderAnswer:
    """The wire form of a leader reply."""
    match reply:
        case Accepted(iteration=it, data_size=size, next_req_time_ms=next_ms, reason=reason):
            return LeaderAnswer(call_id, "accepted", int(ResponseCode.SUCCEED), reason, it, size, next_ms, "")
        case Rejected(retcode=retcode, reason=reason, next_req_time_ms=next_ms):
            return LeaderAnswer(call_id, "rejected", int(retcode), reason, 0, 0, next_ms, "")
        case PlainText(text=text):
            return LeaderAnswer(call_id, "plain", 0, "", 0, 0, 0, text)


def reply_of(answer: LeaderAnswer) -> LeaderReply:
    """The leader reply a wire answer carries (a malformed one reads as safemode: retry later)."""
    match answer.kind:
        case "accepted":
            return Accepted(answer.iteration, answer.data_size, answer.next_req_time_ms, answer.reason)
        case "rejected" if answer.retcode in ResponseCode._value2member_map_:
            return Rejected(ResponseCode(answer.retcode), answer.reason, answer.next_req_time_ms)
        case "plain":
            return PlainText(answer.text)
    return PlainText(SAFEMODE_TEXT)


class LocalLeaderChannel:
    """The leader's own Server reaches the counters by a direct call."""

    def __init__(self, leader: Leader) -> None:
        self._leader = leader

    async def call(self, request: CountRequest) -> LeaderReply:
        """Count at the leader, in this process."""
        return self._leader.call(request)


class FollowerSession:
    """A follower's side of its peer link: pipelined calls out, leader pushes in."""

    def __init__(self, link: FramedLink, rounds: RoundService) -> None:
        self._link = link
        self._rounds = rounds
        self._ids = itertools.count()
        self._waiting: dict[int, trio.MemorySendChannel[LeaderReply]] = {}
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
            r = request
            await self._link.send(
                LeaderCall(call_id, r.op, r.fl_id, r.data_size, r.iteration, r.upload_loss, r.upload_accuracy)
            )
            return await receive.receive()
        except (LinkClosed, trio.EndOfChannel):
            return PlainText(SAFEMODE_TEXT)
        finally:
            self._waiting.pop(call_id, None)

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
                        case IterationStatus():
                            self._rounds.apply_view(view_of(msg))
                            got_status = True
                        case PublishModel(iteration=iteration):
                            self._rounds.install_model(
                                iteration, weights_from_bytes(payload, self._rounds.spec)
                            )
                            got_model = True
                            await self._link.send(ModelInstalled(iteration=iteration))
                        case CollectPartial(iteration=iteration):
                            nursery.start_soon(self._send_partial, iteration)
                        case DropPartials(iteration=iteration):
                            self._rounds.drop_partials(iteration)
                        case ErrorReply(reason=reason):
                            log.warning("the leader reports an error: %s", reason)
                        case _:
                            pass
                    if got_status and got_model:
                        self._synced.set()
        finally:
            self._closed = True
            for channel in list(self._waiting.values()):
                channel.close()

    async def _send_partial(self, iteration: int) -> None:
        partial = await self._rounds.collect_partial(iteration)
        total_get, accepted_get = self._rounds.take_get_model_counts()
        msg = PartialSums(iteration, partial.update_count, total_get, accepted_get)
        await self._link.send(msg, partial.to_bytes())


__all__ = [
    "EpochClock",
    "FollowerSession",
    "Leader",
    "LeaderOptions",
    "LocalLeaderChannel",
    "answer_of",
    "reply_of",
    "view_of",
]
