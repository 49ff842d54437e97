"""The leader's iteration driver: the trio side of the sans-IO iteration machine.

Theory of operation
-------------------
Server rank 0 runs a :class:`Leader`: the trio driver of the sans-IO
:class:`~flcluster.core.iteration.IterationMachine`. It is the only place where device requests are
counted, so the counters are exact however requests are spread over Servers. Everything reaches the
machine through :meth:`Leader.feed`, which applies one event and carries out its instructions in order
(:meth:`Leader._carry_out` is a ``match`` over the :data:`~flcluster.core.iteration.Instruction`
union that ends in ``assert_never``, so a new instruction cannot go unhandled):

- ``ArmWindow`` / ``DisarmWindow``: a window is a task in the leader's nursery sleeping in its own
  cancel scope until the deadline (on trio's clock, so tests run on ``autojump_clock``), then feeding
  ``WindowClosed``; disarming cancels the scope.
- ``AggregateIteration``: one task runs the :class:`~flcluster.runtime.aggregation.Aggregator` and
  feeds ``AggregationDone`` or ``AggregationFailed`` with the getModel counts it collected.
- ``DiscardPartials``: every Server drops the sums of the failed iteration and carries the model over.
- ``IterationCompleted`` / ``IterationFailed``: the iteration's metrics.json line, from the
  :class:`~flcluster.core.iteration.Visits` the instruction carries; :meth:`Leader.wait_ended` wakes.
- ``InstanceStateChanged``: logged (the status push below tells the followers).
- ``InstanceRenewed``: a new instance applies: this Server's latest model becomes model 0, the new FLPlan
  values go to every follower (``instance_renewed`` with ``reset``), and the status push says iteration 1.

**Scaling barrier** (spec/cluster-protocol.md §8). While the Server sets :attr:`Leader.hold` (the
cluster is scaling), a startFLJob that would start a new iteration is answered the safemode text without
reaching the machine; :meth:`Leader.at_rest` says when nothing is in flight, and :attr:`Leader.changed`
wakes whoever waits for it. :meth:`Leader.follow` aligns the instance with the Scheduler's state
(``CLUSTER_DISABLE_FLS`` disables, ``CLUSTER_READY`` enables, spec/cluster-protocol.md §9).

After every event, a change of iteration, phase or instance state is pushed to every follower as
``iteration_status`` (through the :class:`~flcluster.runtime.peer_leader.PeerHub`).

Everything that recovery must keep (the counters, the windows, the completed and failed iterations
and the current iteration's metrics visits) is in the machine and its snapshot; the driver holds only
what a restart rebuilds: its timers, the aggregation task and the followers' links. On (re)start,
:meth:`Leader.run` feeds ``Resumed``, which re-arms the machine's windows and restarts a pending
aggregation.

Nursery tree (inside the Server's role scope)::

    leader ──┬ window tasks (one per armed window, each in its own cancel scope)
             └ aggregation task (at most one at a time)
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import assert_never

import attrs
import trio

from flcluster.aggregation.metrics import ClientVisitedInfo, IterationMetrics, MetricsWriter
from flcluster.core.cluster import ClusterState
from flcluster.core.device_rows import header_json, record_json
from flcluster.core.iteration import (
    Accepted,
    AggregateIteration,
    AggregationDone,
    AggregationFailed,
    ArmWindow,
    DisableRequested,
    DisarmWindow,
    DiscardPartials,
    EnableRequested,
    Event,
    InstanceRenewed,
    InstanceState,
    InstanceStateChanged,
    Instruction,
    IterationCompleted,
    IterationFailed,
    IterationMachine,
    Phase,
    PlainText,
    Rejected,
    Reply,
    Resumed,
    ServerResynced,
    StartFLJobReceived,
    UpdateModelReceived,
    UpdatesConfirmed,
    Visits,
    WindowClosed,
    WindowKind,
)
from flcluster.crashpoints import crash_point
from flcluster.errors import CipherInputError, IllegalEvent
from flcluster.http.device import DeviceAnswer
from flcluster.runtime.aggregation import Aggregator
from flcluster.runtime.cipher_leader import (
    cipher_event,
    decode_request,
    encode_refusal,
    encode_reply,
    field_prime,
)
from flcluster.runtime.clock import EpochClock
from flcluster.runtime.links import FramedLink
from flcluster.runtime.options import LeaderOptions
from flcluster.runtime.peer_leader import PeerHub
from flcluster.runtime.peer_wire import view_of
from flcluster.runtime.rounds import CountRequest, LeaderReply, RoundService
from flcluster.store import DeviceRows, RecoveryStore, ServerState, StoredModel, Transition
from flcluster.verify import ClientVerifier, PublicKey, VerificationFailed
from flcluster.verify.lists import signs_client_list
from flcluster.wire.cipher_records import ExchangeKeysRequest, FetchRequest, ListSignRequest, SharesRequest
from flcluster.wire.cipher_server_codec import CipherRequest, encode_cipher_error
from flcluster.wire.codes import SAFEMODE_TEXT, CipherRound, ResponseCode
from flcluster.wire.messages import CountOp, DropPartials, HeldUpdates, InstanceRenewedMsg, IterationStatus
from flcluster.wire.model_bytes import weights_to_bytes

log = logging.getLogger("flcluster.leader")


def visited_info(visits: Visits) -> ClientVisitedInfo:
    """metrics.json's ``clientVisitedInfo`` for an iteration's visits (reference §3.9)."""
    v = visits
    return ClientVisitedInfo(
        start_fl_job_total=v.start_fl_job_total,
        start_fl_job_accept=v.start_fl_job_accept,
        start_fl_job_reject=v.start_fl_job_total - v.start_fl_job_accept,
        update_model_total=v.update_model_total,
        update_model_accept=v.update_model_accept,
        update_model_reject=v.update_model_total - v.update_model_accept,
        get_model_total=v.get_model_total,
        get_model_accept=v.get_model_accept,
        get_model_reject=v.get_model_total - v.get_model_accept,
        participation_time_level1=v.participation[0],
        participation_time_level2=v.participation[1],
        participation_time_level3=v.participation[2],
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
        store: RecoveryStore | None = None,
        verifier: ClientVerifier | None = None,
    ) -> None:
        """Drive ``machine`` for this Server's ``rounds``; ``members`` lists (rank, node id) now.

        With ``store``, the machine's snapshot is committed (group commit) before any accepted count
        is answered, and model N with the move to N+1 in one transaction before it is published
        (spec/recovery.md §3.3). With ``verifier`` (``pki_verify``), every counted request is first
        checked by it and an accepted startFLJob's device key is kept there
        (spec/device-protocol.md, "Client verification").
        """
        self.verifier = verifier
        self.machine = machine
        self.rounds = rounds
        self.clock = clock
        self.options = options
        self.store = store
        self.self_id = self_id
        self.peers = PeerHub(rounds)
        self._aggregator = Aggregator(
            rounds,
            self.peers,
            self.options,
            self_id=self_id,
            members=members,
            holdings=lambda server: self.machine.holdings(server),
            holders=lambda: self.machine.servers_holding(),
            confirm=self.confirm,
        )
        self._changes = 0
        self._durable = 0
        self._dirty = trio.Event()
        self._durable_event = trio.Event()
        self._publishing = False
        self._aggregation: tuple[int, trio.CancelScope] | None = None
        self._windows: dict[WindowKind, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._status: IterationStatus | None = None
        self._causes = itertools.count()
        self._ended = trio.Event()
        #: While True (the cluster is scaling) no new iteration starts (module docstring).
        self.hold = False
        #: Set (and replaced) whenever the machine or the publication changed: :meth:`at_rest` may differ.
        self.changed = trio.Event()
        self._metrics = MetricsWriter(self.options.metrics_path) if self.options.metrics_path else None
        self._instance_name = self.options.instance_name or f"instance_{time.strftime('%Y%m%d_%H%M%S')}"
        self._prime: int | None = None
        #: A new instance's ``instance_renewed`` (reset) for the followers, held until the commit that
        #: starts the stored history over is done (spec/cluster-protocol.md §9 rule 1).
        self._renewal_announcement: InstanceRenewedMsg | None = None

    @property
    def completed(self) -> tuple[int, ...]:
        """The iterations that completed (the machine's record)."""
        return self.machine.completed

    @property
    def failed(self) -> tuple[int, ...]:
        """The iterations that failed (the machine's record)."""
        return self.machine.failed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the leader's nursery (windows, aggregation) until cancelled.

        Feeds ``Resumed`` first, so a machine that already ran (a restarted role, a restored
        snapshot) gets its windows and any pending aggregation back.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.store is not None:
                    nursery.start_soon(self._persist)
                # This Server's own sum, as restored or as it stands (spec/recovery.md §5.3).
                await self.rounds.settle()
                iteration, fl_ids = self.rounds.held_updates()
                self.feed(
                    ServerResynced(
                        self._cause("resync"), self.self_id, iteration, fl_ids, self.clock.now_ms()
                    )
                )
                self.feed(Resumed(self._cause("resumed"), self.clock.now_ms()))
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._windows.clear()
            self.peers.close()

    async def wait_ended(self, iteration: int) -> bool:
        """Wait until ``iteration`` has ended; True when it completed, False when it failed."""
        while not self.machine.has_ended(iteration):
            await self._ended.wait()
        return iteration in self.machine.completed

    async def serve_follower(self, link: FramedLink, node_id: str, rank: int, held: HeldUpdates) -> None:
        """Serve one follower's peer link (after its hello) until it closes or this leader stops."""
        await self.peers.serve_follower(link, node_id, rank, self, held)

    # ------------------------------------------------------------------------------ feeding

    def _cause(self, what: str) -> str:
        return f"{what}#{next(self._causes)}"

    def feed(self, event: Event) -> Reply | None:
        """Apply one event to the machine and carry out its instructions; return its reply."""
        outcome = self.machine.handle(event)
        self._changed()
        for ins in outcome.instructions:
            self._carry_out(ins)
        self._push_status()
        self._signal()
        return outcome.reply

    def _signal(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def at_rest(self) -> bool:
        """No iteration is running, aggregating or being published (the scaling barrier, §8)."""
        return self.machine.phase is Phase.WAITING and not self._publishing

    def follow(self, state: ClusterState) -> None:
        """Align the instance with the Scheduler's state (spec/cluster-protocol.md §9)."""
        instance = self.machine.state
        if state is ClusterState.CLUSTER_DISABLE_FLS and instance is InstanceState.RUNNING:
            log.info("the cluster is CLUSTER_DISABLE_FLS: disabling the instance")
            self.feed(DisableRequested(self._cause("follow:disable"), self.clock.now_ms()))
        elif (
            state in (ClusterState.CLUSTER_READY, ClusterState.CLUSTER_ENABLE_FLS)
            and instance is InstanceState.DISABLED
        ):
            log.info("the cluster is %s: enabling the instance", state.name)
            self.feed(EnableRequested(self._cause("follow:enable"), self.clock.now_ms()))

    def plan_message(self) -> InstanceRenewedMsg | None:
        """The FLPlan values a new instance set, for a follower that links (None: the job's own)."""
        client = self.machine.client
        if client is None:
            return None
        return InstanceRenewedMsg(client.epochs, client.mini_batch, client.lr, reset=False)

    def _changed(self) -> None:
        self._changes += 1
        self._dirty.set()

    async def _persist(self) -> None:
        """Commit the machine's snapshot whenever it changed: everything changed while one commit is
        in flight goes in the next (group commit one level up: one snapshot per transaction)."""
        store = self.store
        assert store is not None
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            changes = self._changes
            crash_point("leader.counting")
            announcement, self._renewal_announcement = self._renewal_announcement, None
            await store.commit(self._machine_transition())
            if announcement is not None:
                self._announce_renewal(announcement)
            self._durable = max(self._durable, changes)
            self._durable_event.set()
            self._durable_event = trio.Event()

    def _machine_transition(
        self, *, model: StoredModel | None = None, keep_models: int | None = None, new_history: bool = False
    ) -> Transition:
        """The machine as it is now, for the store: its header, and the rows of the devices changed since
        the last such transition (spec/recovery.md §3.3). Submit it to the store before anything else is
        taken from the machine: the store applies the rows in the order transitions are submitted.

        After a new instance applied between iterations, the first such transition also starts the
        stored history over with model 0 (spec/cluster-protocol.md §9 rule 1)."""
        m = self.machine
        if self.rounds.new_history:
            assert model is None, "a new instance applies only between iterations"
            iteration, weights = self.rounds.store.latest()
            model = StoredModel(iteration, weights_to_bytes(weights, self.rounds.spec))
            keep_models, new_history = self.rounds.store.keep, True
            self.rounds.history_committed()
        changes = m.take_device_changes()
        rows = DeviceRows(
            rewrite=changes.rewrite,
            rows=tuple((r.fl_id, record_json(r)) for r in changes.records if not r.empty),
            deleted=tuple(r.fl_id for r in changes.records if r.empty),
        )
        state = ServerState(0, m.current_iteration, m.state.value, header_json(m.snapshot_without_devices()))
        return Transition(
            server=state, devices=rows, model=model, keep_models=keep_models, new_history=new_history
        )

    def _announce_renewal(self, announcement: InstanceRenewedMsg) -> None:
        """Tell the followers a new instance applies, its history committed here (§9 rules 1-2)."""
        crash_point("leader.new_instance")
        self.peers.broadcast(announcement)

    async def wait_durable(self) -> None:
        """Wait until the machine as it is now is committed (no wait without a store)."""
        if self.store is None:
            return
        wanted = self._changes
        while self._durable < wanted:
            await self._durable_event.wait()

    def confirm(self, server: str, iteration: int, fl_ids: tuple[str, ...]) -> None:
        """Server ``server`` committed the folds of ``fl_ids`` (spec/recovery.md §4)."""
        self.feed(
            UpdatesConfirmed(self._cause(f"confirm:{server}"), server, iteration, fl_ids, self.clock.now_ms())
        )

    def resync(self, server: str, iteration: int, fl_ids: tuple[str, ...]) -> None:
        """Server ``server`` (re)linked holding ``fl_ids`` of ``iteration`` (spec/recovery.md §5.1)."""
        self.feed(
            ServerResynced(self._cause(f"resync:{server}"), server, iteration, fl_ids, self.clock.now_ms())
        )

    async def call(self, request: CountRequest, server: str) -> LeaderReply:
        """The counting part of one device request that landed on Server ``server``.

        An accepted count is answered once the machine's state with it is committed.
        """
        if self._publishing:
            # Between iterations: the model of the one that ended is on its way to the followers.
            return PlainText(SAFEMODE_TEXT)
        if self.hold and request.op is CountOp.START_FL_JOB and self.machine.phase is Phase.WAITING:
            # The scaling barrier: no new iteration starts until the scaling is done (cluster-protocol §8).
            return PlainText(SAFEMODE_TEXT)
        key = None
        if self.verifier is not None:
            try:
                key = self._verify(self.verifier, request)
            except VerificationFailed as exc:
                # Refused before the machine sees it: nothing changes (spec "Client verification").
                retcode = ResponseCode.OutOfTime if exc.retry_later else ResponseCode.RequestError
                return Rejected(retcode, exc.reason, self.machine.next_req_time_ms(self.clock.now_ms()))
        reply = self._count(request, server)
        if isinstance(reply, Accepted):
            if key is not None and self.verifier is not None:
                self.verifier.keep_key(request.fl_id, key, iteration=reply.iteration)
            await self.wait_durable()
        return reply

    async def cipher(self, round_: CipherRound, body: bytes, server: str) -> DeviceAnswer:
        """One cipher-round request that landed on Server ``server`` (spec/secure-aggregation.md §R5, §R6).

        Decoded again here, its signatures checked with ``pki_verify`` (spec §R8.1, §R8.3, §R8.6, §R8.7), fed
        to the machine, answered once the machine with its effect is committed. A body refused before the
        machine sees it (or a round this job does not run) gets the round's RequestError (or, for a signature
        check that may pass later, OutOfTime) and changes nothing.
        """
        now = self.clock.now_ms()
        m = self.machine
        if self._publishing:
            return SAFEMODE_TEXT
        try:
            if self._prime is None:
                self._prime = field_prime(self.rounds.plan.pw_prime)
            request = decode_request(round_, body)
            signed_keys, signs_u3 = self._verify_cipher(round_, request, now)
            event = cipher_event(
                round_,
                request,
                cause=self._cause(f"{round_.value}@{server}"),
                now_ms=now,
                prime=self._prime,
                signed_keys=signed_keys,
                signs_u3=signs_u3,
            )
            reply = self.feed(event)
        except (IllegalEvent, CipherInputError) as exc:
            return encode_refusal(
                round_, str(exc), iteration=m.current_iteration, next_req_time_ms=m.next_req_time_ms(now)
            )
        except VerificationFailed as exc:
            # Refused before the machine sees it: nothing changes (spec/secure-aggregation.md §R8.3).
            retcode = ResponseCode.OutOfTime if exc.retry_later else ResponseCode.RequestError
            return encode_cipher_error(
                round_,
                retcode=int(retcode),
                reason=exc.reason,
                iteration=m.current_iteration,
                next_req_time=str(m.next_req_time_ms(now)),
            )
        await self.wait_durable()
        return encode_reply(reply)

    def _verify_cipher(self, round_: CipherRound, request: CipherRequest, now: int) -> tuple[bool, bool]:
        """With ``pki_verify`` (a verifier and a cipher job, PW_ENCRYPT or STABLE_PW_ENCRYPT;
        spec/secure-aggregation.md §R8): check the request's signatures, every round's (exchangeKeys: its
        keys' signature and certificates, §R8.1; the others: the request signature over
        ``timestamp + str(iteration)``, §R8.3, §R8.6, §R8.7). The list signature itself (pushListSign) is
        judged only with the list signatures (PW_ENCRYPT): STABLE_PW has no U3 to sign.

        Returns:
            (exchangeKeys: keep the keys' signature and certificates for getKeys to relay; pushListSign: the
            list signature verifies over U3 as the machine holds it now).

        Raises:
            VerificationFailed: a request signature (or exchangeKeys' certificates) fails.
        """
        cipher = self.machine.config.cipher
        verifier = self.verifier
        if verifier is None or cipher is None:
            return False, False
        match request:
            case ExchangeKeysRequest(keys=k):
                verifier.admit_exchange_keys(
                    k.fl_id,
                    request.iteration,
                    request.timestamp,
                    k.c_pk,
                    k.s_pk,
                    request.signature,
                    request.certificate_chain,
                    now_ms=now,
                )
                return True, False
            case ListSignRequest():
                key = verifier.admit_cipher_request(
                    round_,
                    request.fl_id,
                    request.iteration,
                    request.timestamp,
                    request.req_signature,
                    now_ms=now,
                )
                u3 = self.machine.client_list() if cipher.list_sign else None
                return False, u3 is not None and signs_client_list(key, u3, request.signature)
            case FetchRequest() | SharesRequest():
                # getKeys, shareSecrets, getSecrets, getClientList, getListSign, reconstructSecrets (§R8.6).
                verifier.admit_cipher_request(
                    round_,
                    request.fl_id,
                    request.iteration,
                    request.timestamp,
                    request.signature,
                    now_ms=now,
                )
            case _:
                assert_never(request)
        return False, False

    def _verify(self, verifier: ClientVerifier, request: CountRequest) -> PublicKey | None:
        """The leader's client verification of one request; a startFLJob's device key to keep."""
        r, now = request, self.clock.now_ms()
        match r.op:
            case CountOp.START_FL_JOB:
                return verifier.admit_start_fl_job(r.fl_id, r.timestamp, r.device_key, now_ms=now)
            case CountOp.UPDATE_MODEL:
                verifier.admit_update_model(r.fl_id, r.iteration, r.timestamp, r.signature, now_ms=now)
                return None
            case _:
                assert_never(r.op)

    def _count(self, request: CountRequest, server: str) -> LeaderReply:
        now = self.clock.now_ms()
        r = request
        event: Event
        match r.op:
            case CountOp.START_FL_JOB:
                event = StartFLJobReceived(self._cause(f"startFLJob:{r.fl_id}"), r.fl_id, r.data_size, now)
            case CountOp.UPDATE_MODEL:
                event = UpdateModelReceived(
                    self._cause(f"updateModel:{r.fl_id}"),
                    r.fl_id,
                    r.iteration,
                    now,
                    r.upload_loss,
                    r.upload_accuracy,
                    server,
                )
            case _:
                assert_never(r.op)
        reply = self.feed(event)
        match reply:
            case Accepted() | Rejected() | PlainText():
                return reply
            case _:
                raise AssertionError(f"a device request got {reply!r}; expected a device reply")

    def _carry_out(self, ins: Instruction) -> None:
        nursery = self._nursery
        assert nursery is not None, "the leader must be running"
        match ins:
            case ArmWindow(kind=kind, iteration=iteration, deadline_ms=deadline):
                old = self._windows.pop(kind, None)
                if old is not None:
                    old.cancel()
                scope = trio.CancelScope()
                self._windows[kind] = scope
                nursery.start_soon(self._window, scope, kind, iteration, deadline)
            case DisarmWindow(kind=kind):
                armed = self._windows.pop(kind, None)
                if armed is not None:
                    armed.cancel()
            case AggregateIteration():
                scope = trio.CancelScope(
                    deadline=math.inf if ins.deadline_ms is None else self.clock.trio_time(ins.deadline_ms)
                )
                self._aggregation = (ins.iteration, scope)
                nursery.start_soon(self._aggregate, ins, scope)
            case DiscardPartials(iteration=iteration):
                self.rounds.drop_partials(iteration)
                self.peers.broadcast(DropPartials(iteration=iteration))
            case IterationCompleted(iteration=iteration):
                # Its metrics line was written with its commit (see _aggregate).
                log.info("iteration %d completed", iteration)
                self._wake_ended()
            case IterationFailed(
                iteration=iteration, reason=reason, started_at_ms=start, ended_at_ms=end, visits=visits
            ):
                log.info("iteration %d failed: %s", iteration, reason)
                if self._aggregation is not None and self._aggregation[0] == iteration:
                    self._aggregation[1].cancel()
                self._write_metrics(iteration, end if start is None else start, end, visits, succeeded=False)
                self._wake_ended()
            case InstanceStateChanged(old=old_state, new=new_state):
                log.info("instance %s -> %s", old_state.value, new_state.value)
            case InstanceRenewed(config=config, client=client):
                self.rounds.set_client(client)
                self.rounds.renew()
                plan = self.rounds.client()
                announcement = InstanceRenewedMsg(plan.epochs, plan.mini_batch, plan.lr, reset=True)
                if self.store is None:
                    self.peers.broadcast(announcement)
                else:  # after the commit that starts the stored history over (spec/cluster-protocol.md §9)
                    self._renewal_announcement = announcement
                log.info(
                    "a new instance applies: iteration 1 of %d, startFLJob threshold %d, FLPlan %s",
                    config.fl_iteration_num,
                    config.start_fl_job_threshold,
                    plan,
                )
            case _:
                assert_never(ins)

    def _write_metrics(
        self, iteration: int, start_ms: int, end_ms: int, visits: Visits, *, succeeded: bool
    ) -> None:
        """Write the iteration's metrics.json line (when configured)."""
        if self._metrics is not None:
            config = self.machine.config
            line = IterationMetrics(
                instance_name=self._instance_name,
                start_time_ms=start_ms,
                end_time_ms=end_ms,
                fl_name=self.options.fl_name,
                instance_status=self.machine.state.value,
                fl_iteration_num=config.fl_iteration_num,
                current_iteration=iteration,
                metrics_auc=visits.accuracy_sum / max(visits.update_model_accept, 1),
                metrics_loss=visits.loss_sum / config.update_model_threshold,
                iteration_execution_time_ms=max(end_ms - start_ms, 0),
                client_visited_info=visited_info(visits),
                iteration_result=succeeded,
            )
            try:
                self._metrics.write(line)
            except OSError as exc:
                log.error("cannot write %s: %s", self._metrics.path, exc)

    def _wake_ended(self) -> None:
        """An iteration ended: wake :meth:`wait_ended`."""
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

    def _aggregating(self, iteration: int) -> bool:
        m = self.machine
        return m.phase is Phase.AGGREGATING and m.current_iteration == iteration

    async def _aggregate(self, ins: AggregateIteration, scope: trio.CancelScope) -> None:
        """Collect and combine (waiting for Servers that are down until ``ins.deadline_ms``), then
        commit model N with the move to N+1, publish it, and only then let devices see N+1."""
        iteration = ins.iteration
        result = None
        with scope:
            result = await self._aggregator.aggregate(ins)
        if not self._aggregating(iteration):
            return  # the iteration failed meanwhile (a Server came back without its updates)
        cause, now = self._cause("aggregation"), self.clock.now_ms()
        if result is None or result.error is not None or result.weights is None:
            reason = (
                f"Aggregation of iteration {iteration} waited for Servers holding its updates until "
                "its windows closed. This iteration is invalid. Proceed to next iteration."
                if result is None
                else str(result.error)
            )
            total, accept = (0, 0) if result is None else (result.get_model_total, result.get_model_accept)
            self.feed(AggregationFailed(cause, iteration, reason, now, total, accept))
            return
        weights = result.weights
        outcome = self.machine.handle(
            AggregationDone(cause, iteration, now, result.get_model_total, result.get_model_accept)
        )
        # A pending new instance applies with this iteration's end: model N is its model 0.
        renewed = any(isinstance(ins, InstanceRenewed) for ins in outcome.instructions)
        self._changes += 1
        self._publishing = True
        try:
            payload = weights_to_bytes(weights, self.rounds.spec)
            if self.store is not None:
                # Model N and the move to N+1 in one transaction, before anyone sees either (with a
                # new instance: model 0 of a new history and iteration 1, spec/cluster-protocol.md §9).
                await self.store.commit(
                    self._machine_transition(
                        model=StoredModel(0 if renewed else iteration, payload),
                        keep_models=self.rounds.store.keep,
                        new_history=renewed,
                    )
                )
            # The metrics line goes with the commit that completes the iteration (a leader that dies
            # while publishing must not lose it); wait_ended wakes only once every Server has the model.
            for done in outcome.instructions:
                if isinstance(done, IterationCompleted):
                    self._write_metrics(
                        done.iteration, done.started_at_ms, done.ended_at_ms, done.visits, succeeded=True
                    )
            crash_point("leader.publishing")
            self.rounds.install_model(iteration, weights)
            await self.peers.publish(iteration, payload)
            if self.options.checkpoint_dir:
                try:
                    await trio.to_thread.run_sync(self._aggregator.save_checkpoint, iteration, weights)
                except OSError as exc:
                    log.error("cannot write the checkpoint of iteration %d: %s", iteration, exc)
        finally:
            self._publishing = False
        for instruction in outcome.instructions:
            self._carry_out(instruction)
        if renewed and self.store is not None:  # its new history went with the commit above
            self.rounds.history_committed()
            announcement, self._renewal_announcement = self._renewal_announcement, None
            assert announcement is not None
            self._announce_renewal(announcement)
        self._push_status()
        self._signal()

    # ------------------------------------------------------------------------------ followers

    def status(self) -> IterationStatus:
        """The iteration status as followers are told it."""
        m = self.machine
        return IterationStatus(
            iteration=m.current_iteration,
            phase=m.phase,
            instance_state=m.state,
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
            self.peers.broadcast(status)


class LocalLeaderChannel:
    """The leader's own Server reaches the counters by a direct call."""

    def __init__(self, leader: Leader) -> None:
        self._leader = leader

    async def call(self, request: CountRequest) -> LeaderReply:
        """Count at the leader, in this process."""
        return await self._leader.call(request, self._leader.self_id)

    async def confirm(self, iteration: int, fl_ids: tuple[str, ...]) -> None:
        """Confirm this Server's committed folds at the leader, in this process."""
        self._leader.confirm(self._leader.self_id, iteration, fl_ids)

    async def cipher(self, round_: CipherRound, body: bytes) -> DeviceAnswer:
        """A cipher-round request at the leader, in this process."""
        return await self._leader.cipher(round_, body, self._leader.self_id)


__all__ = ["EpochClock", "Leader", "LeaderOptions", "LocalLeaderChannel", "visited_info"]
