"""The Scheduler process: the trio driver of :class:`flcluster.core.cluster.ClusterMachine`.

Nursery tree (one ``trio.run`` per process)::

    scheduler ─┬ cluster listener (TCP, scheduler_port) ─ one task per connection
               │                                          ├ reader: frames → events
               │                                          └ writer: outbound queue → frames
               ├ liveness reaper (sleeps until the next heartbeat deadline → LivenessCheck)
               ├ start-up deadline (cluster_available_timeout → StartupDeadlinePassed)
               ├ scaling deadline (sleeps until the machine's scaling deadline → ScalingDeadlinePassed)
               ├ certificate watcher (enable_ssl only: expiry warnings every cert_check_interval_in_hour)
               └ management HTTP (hypercorn.trio.serve, quart-trio app, scheduler_manage_port)

The Scheduler is the only writer of the cluster machine, and every change goes through
:meth:`SchedulerNode.dispatch`, which feeds one event and carries out the instructions in order. Each
Server link has a bounded outbound queue drained by its own writer task, so a slow or stuck Server can
never stall the Scheduler: when its queue is full, its link is dropped and it reconnects.

The driver owns time. The cluster machine counts in epoch milliseconds (``now_ms``, spec
state-machines.md "Cluster"); an :class:`~flcluster.runtime.clock.EpochClock` reads them off trio's clock,
so ``autojump_clock`` tests see exact virtual times, and the configured ``heartbeat_timeout`` (seconds) is
converted to milliseconds once, here, into the machine's :class:`~flcluster.core.cluster.ClusterConfig`.
Cluster-wide timers that are not the machine's (``cluster_available_timeout``, ``finish_timeout``) stay
trio sleeps in seconds and come back as events.

A connection's first frame says what it is: ``register`` opens a Server link; ``finish_cluster`` is
the operator's ``flcluster finish`` (refused unless it carries the management token when one is set).
Anything else is answered with ``error`` and closed. With ``enable_ssl`` every connection first completes
a TLS handshake with a client certificate from the cluster's CA (spec/cluster-protocol.md §7); one that
fails is logged and closed before any frame is read, and the management port is HTTPS.

**Recovery** (spec/recovery.md §3.1, §5, §6). With a store (``config.json``'s ``recovery``: the
settings' ``store_path``; or one handed to :meth:`SchedulerNode.recover_from`), :meth:`SchedulerNode.serve`
opens it before it listens (a bad store stops the Scheduler with the store's message), and a store
that holds a membership rebuilds the machine from it
(:func:`~flcluster.runtime.scheduler_recovery.restored_machine`: every member gets one
``heartbeat_timeout`` from this start to re-register). From then on :meth:`SchedulerNode.dispatch`
is *handle, commit, carry out*, under one lock so events are committed in the order they were handled:
whenever the stored view (:func:`~flcluster.runtime.scheduler_recovery.stored_state`) changed, it is
committed before any reply or instruction of that event leaves the Scheduler; a failed commit puts the
machine back as it was before the event and raises, so nothing that depends on it is sent. The exit
(``CLUSTER_EXIT``) is not committed: a store keeps the last running membership, so a Scheduler started
again after a finish gives the Servers their old ranks.

**Operators** (spec/management-api.md, spec/cluster-protocol.md §8–§9). The management app calls
:meth:`SchedulerNode.scale_out`, :meth:`~SchedulerNode.scale_in`, :meth:`~SchedulerNode.scale_out_rollback`,
:meth:`~SchedulerNode.disable_fls`, :meth:`~SchedulerNode.enable_fls`, :meth:`~SchedulerNode.new_instance`
and :meth:`~SchedulerNode.query_instance`; each dispatches the machine's operator event (with the number
of registered Servers this Scheduler holds a link for) and, for the instance operations, sends one
``instance_call`` to the leader and waits up to :attr:`SchedulerNode.instance_timeout` for its
``instance_answer``. A scaling is never committed while it runs (the machine is not *settled*), so a
restarted Scheduler has rolled it back (spec/recovery.md §9). ``ReleaseNodes`` closes the links of the
Servers that left the membership, after the final membership has been queued to them.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import itertools
import json
import logging
import os
import uuid
from collections.abc import Callable
from functools import partial
from typing import assert_never

import attrs
import trio

from flcluster.core.cluster import (
    AcceptRegistration,
    BarrierReached,
    BeginShutdown,
    ClusterConfig,
    ClusterMachine,
    ClusterState,
    DisableFLSRequested,
    EnableFLSRequested,
    Event,
    ExitCluster,
    Heartbeat,
    InstanceOperationEnded,
    Instruction,
    LivenessCheck,
    Member,
    NewInstanceStarted,
    NodeFinished,
    NodeInfo,
    NodeLivenessChanged,
    OperatorReply,
    RefuseRegistration,
    RegisterNode,
    ReleaseNodes,
    Reply,
    Role,
    ScaleInRequested,
    ScaleOutRequested,
    ScaleOutRollbackRequested,
    ScalingDeadlinePassed,
    ScalingEnded,
    SendMembership,
    SendShutdown,
    ShutdownDeadlinePassed,
    StartupDeadlinePassed,
    StateChanged,
)
from flcluster.core.scaling import InstanceResult
from flcluster.crashpoints import crash_point
from flcluster.errors import FrameError, HandshakeFailed, IllegalEvent, MessageError, StoreError
from flcluster.http.management import create_management_app
from flcluster.http.serving import serve_app
from flcluster.runtime.clock import EpochClock
from flcluster.runtime.finish import ACCESS_REFUSED
from flcluster.runtime.links import FramedLink, LinkClosed, accept_stream, peer_name, run_session
from flcluster.runtime.scheduler_recovery import restored_machine, scheduler_identity, stored_state
from flcluster.store import RecoveryStore, SchedulerState, Transition, open_sqlite_store
from flcluster.tls import NodeTls, watch_certificates
from flcluster.wire.messages import (
    ErrorReply,
    FinishCluster,
    Finished,
    FinishReply,
    HeartbeatMsg,
    HeartbeatReply,
    InstanceAnswer,
    InstanceCall,
    InstanceOp,
    MemberRecord,
    Membership,
    Message,
    NodeProcess,
    Register,
    RegisterReply,
    ScalingBarrier,
    Shutdown,
)

log = logging.getLogger("flcluster.scheduler")

HANDSHAKE_TIMEOUT = 10.0
OUTBOUND_QUEUE = 64
#: Seconds an instance operation waits for the leader's answer (the original's message-track wait).
INSTANCE_TIMEOUT = 30.0


@attrs.frozen
class SchedulerSettings:
    """What a Scheduler process needs to run.

    Built from a validated :class:`flcluster.config.FLContext` by
    :func:`flcluster.settings.scheduler_settings`; no defaults and no rules of its own (the context's are the
    only ones).

    Attributes:
        node_id: The Scheduler's own node id (listed by ``/nodes``).
        fl_name: The job's name (the recovery store is bound to it).
        server_num: Servers that make up the cluster.
        bind_host: Address of the cluster TCP listener.
        port: Cluster TCP port (``scheduler_port``); 0 picks a free one.
        manage_host: Address of the management HTTP port (loopback by default).
        manage_port: Management HTTP port (``scheduler_manage_port``); 0 picks a free one.
        heartbeat_timeout: Seconds of silence before a node is not alive.
        cluster_available_timeout: Seconds the cluster may take to form before the Scheduler exits.
        finish_timeout: Seconds a graceful finish waits for the Servers before giving up on them.
        scaling_timeout: Seconds a scaling may take before it rolls back.
        max_message_size: Limit on cluster frames and management bodies, in bytes.
        store_path: The recovery store file (``config.json``'s ``recovery``, one file per node, see
            :func:`~flcluster.store.node_store_path`); ``""`` when recovery is off (nothing is written).
        tls: The TLS contexts (``enable_ssl``: the cluster listener and the management HTTPS port), or None.
        manage_token: The management access token (``config.json``'s ``manage_token``); ``""``: none.
    """

    node_id: str
    fl_name: str
    server_num: int
    bind_host: str
    port: int
    manage_host: str
    manage_port: int
    heartbeat_timeout: float
    cluster_available_timeout: float
    finish_timeout: float
    scaling_timeout: float
    max_message_size: int
    store_path: str
    tls: NodeTls | None
    manage_token: str = attrs.field(repr=False)


@attrs.frozen
class SchedulerAddresses:
    """Where a started Scheduler listens (reported by :meth:`SchedulerNode.serve`)."""

    port: int
    manage_urls: list[str]


class _ServerLink:
    """One registered Server's connection: the link and its bounded outbound queue."""

    def __init__(self, node_id: str, link: FramedLink) -> None:
        self.node_id = node_id
        self.link = link
        self.send_channel, self.receive_channel = trio.open_memory_channel[Message](OUTBOUND_QUEUE)

    def post(self, msg: Message) -> bool:
        """Queue a message; False when the Server is too slow (the caller drops the link)."""
        try:
            self.send_channel.send_nowait(msg)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True


class SchedulerNode:
    """A running Scheduler: the cluster machine, the Server links and the management view."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        # The one place seconds of configuration become the machine's milliseconds.
        self.machine = ClusterMachine(
            ClusterConfig(
                server_num=settings.server_num,
                heartbeat_timeout_ms=round(settings.heartbeat_timeout * 1000),
                scaling_timeout_ms=max(round(settings.scaling_timeout * 1000), 1),
            )
        )
        self.clock = EpochClock()
        self.store: RecoveryStore | None = None
        self._committed: SchedulerState | None = None
        self._dispatching = trio.Lock()
        self._links: dict[str, _ServerLink] = {}
        self._changed = trio.Event()
        self._exited = trio.Event()
        self._exit: ExitCluster | None = None
        self._finish_replied = trio.Event()
        self._finish_requested = False
        self._nursery: trio.Nursery | None = None
        #: Seconds an instance operation waits for the leader (tests shorten it).
        self.instance_timeout = INSTANCE_TIMEOUT
        self._calls: dict[int, trio.MemorySendChannel[InstanceAnswer]] = {}
        self._call_ids = itertools.count()
        self._operating = trio.Lock()
        #: Every scaling that ended, in order (for logs, tests and the time-to-ready measurement).
        self.scalings: list[ScalingEnded] = []

    # ----------------------------------------------------------------------- ClusterView (management)

    @property
    def state(self) -> ClusterState:
        """The current cluster state."""
        return self.machine.state

    @property
    def scheduler_node_id(self) -> str:
        """The Scheduler's own node id."""
        return self.settings.node_id

    def members(self) -> tuple[Member, ...]:
        """Every registered Server, by rank."""
        return self.machine.members()

    def connected(self) -> int:
        """Registered Servers this Scheduler holds an open link for (the original's connection check)."""
        return sum(1 for m in self.machine.members() if m.node_id in self._links)

    # ----------------------------------------------------------------------- operators (management)

    def _operator_reply(self, reply: Reply | None) -> OperatorReply:
        assert isinstance(reply, OperatorReply), f"an operator event got {reply!r}"
        if not reply.ok:
            log.info("operator request refused: %s", reply.message)
        return reply

    async def scale_out(self, server_num: int) -> OperatorReply:
        """``/scaleout``: add ``server_num`` Servers (spec/cluster-protocol.md §8)."""
        event = ScaleOutRequested("scaleout", server_num, self.connected(), self.clock.now_ms())
        return self._operator_reply(await self.dispatch_operator(event))

    async def scale_in(self, node_ids: tuple[str, ...]) -> OperatorReply:
        """``/scalein``: remove these Servers."""
        event = ScaleInRequested("scalein", node_ids, self.connected(), self.clock.now_ms())
        return self._operator_reply(await self.dispatch_operator(event))

    async def scale_out_rollback(self) -> OperatorReply:
        """``/scaleoutRollback``."""
        event = ScaleOutRollbackRequested("scaleoutRollback", self.clock.now_ms())
        return self._operator_reply(await self.dispatch_operator(event))

    async def disable_fls(self) -> tuple[OperatorReply, InstanceResult | None]:
        """``/disableFLS``: commit the disabled state, then tell the leader (None: refused)."""
        async with self._operating:
            reply = self._operator_reply(
                await self.dispatch_operator(DisableFLSRequested("disableFLS", self.connected()))
            )
            if not reply.ok:
                return reply, None
            return reply, await self._call_leader(InstanceOp.DISABLE, {})

    async def enable_fls(self) -> tuple[OperatorReply, InstanceResult | None]:
        """``/enableFLS``: through ENABLE_FLS, tell the leader, then READY."""
        async with self._operating:
            reply = self._operator_reply(
                await self.dispatch_operator(EnableFLSRequested("enableFLS", self.connected()))
            )
            if not reply.ok:
                return reply, None
            result = await self._call_leader(InstanceOp.ENABLE, {})
            disabled = result.answered and result.result.get("instance_state") == "disable"
            await self.dispatch(InstanceOperationEnded("enableFLS ended", disabled))
            return reply, result

    async def new_instance(self, params: dict[str, object]) -> tuple[OperatorReply, InstanceResult | None]:
        """``/newInstance``: NEW_INSTANCE while the leader is asked; its answer settles the state."""
        async with self._operating:
            reply = self._operator_reply(
                await self.dispatch_operator(NewInstanceStarted("newInstance", self.connected()))
            )
            if not reply.ok:
                return reply, None
            result = await self._call_leader(InstanceOp.NEW_INSTANCE, params)
            disabled = (
                result.result.get("instance_state") == "disable" if result.answered else self.machine.disabled
            )
            await self.dispatch(InstanceOperationEnded("newInstance ended", disabled))
            return reply, result

    async def query_instance(self) -> tuple[str | None, InstanceResult | None]:
        """``/queryInstance``: the refusal (or None) and the leader's answer."""
        refusal = self.machine.ready_refusal(self.connected(), disabled_too=True)
        if refusal is not None:
            return refusal, None
        return None, await self._call_leader(InstanceOp.QUERY_INSTANCE, {})

    async def dispatch_operator(self, event: Event) -> Reply | None:
        """Feed one event, commit what changed, carry out its instructions; return the machine's reply.

        :meth:`dispatch` is this with the reply turned into its wire message.
        """
        async with self._dispatching:
            before = self.machine.snapshot() if self.store is not None else None
            outcome = self.machine.handle(event)
            try:
                await self._persist()
            except StoreError:
                assert before is not None
                self.machine = ClusterMachine.from_snapshot(self.machine.config, before)
                raise
            for ins in outcome.instructions:
                self._carry_out(ins)
            self._changed.set()
            self._changed = trio.Event()
            return outcome.reply

    async def _call_leader(self, op: InstanceOp, params: dict[str, object]) -> InstanceResult:
        """Send one ``instance_call`` to the leader and wait for its answer (``answered=False``: none)."""
        leader = self.machine.leader_id()
        link = self._links.get(leader) if leader is not None else None
        if link is None:
            log.warning("instance operation %s: the leader %r has no link", op.value, leader)
            return InstanceResult(answered=False)
        call_id = next(self._call_ids)
        send, receive = trio.open_memory_channel[InstanceAnswer](1)
        self._calls[call_id] = send
        try:
            self._post(link, InstanceCall(call_id=call_id, op=op, params=json.dumps(params)))
            with trio.move_on_after(self.instance_timeout):
                answer = await receive.receive()
                try:
                    result = json.loads(answer.result) if answer.result else {}
                except json.JSONDecodeError:
                    result = {}
                return InstanceResult(
                    answered=True,
                    ok=answer.ok,
                    message=answer.message,
                    result=result if isinstance(result, dict) else {},
                )
            log.warning("instance operation %s: the leader %r did not answer in time", op.value, leader)
            return InstanceResult(answered=False)
        finally:
            del self._calls[call_id]

    # --------------------------------------------------------------------------------- recovery

    async def recover_from(self, store: RecoveryStore) -> None:
        """Keep the cluster's state in ``store`` from now on; rebuild the machine from what it holds.

        Called once, before :meth:`serve` (which calls it itself for ``settings.store_path``). The
        caller owns the store (opens and closes it).

        Raises:
            StoreCorrupt: the store holds a scheduler state no Scheduler writes.
            StoreError: the store cannot be read or written.
        """
        contents = await store.load()
        self.store = store
        self._committed = contents.scheduler
        if contents.scheduler is not None:
            self.machine = restored_machine(
                self.machine.config, contents.scheduler, now_ms=self.clock.now_ms(), location=store.location
            )
            members = ", ".join(f"{m.rank}={m.node_id}@{m.host}:{m.port}" for m in contents.scheduler.members)
            log.info(
                "Scheduler %s recovered from its store: was %s, %d of server_num=%d Servers (%s); each has "
                "%.0f s to register again; cluster state %s",
                self.settings.node_id,
                contents.scheduler.cluster_state,
                len(contents.scheduler.members),
                contents.scheduler.server_num,
                members or "none",
                self.settings.heartbeat_timeout,
                self.machine.state.name,
            )
            await self._persist()

    async def _persist(self) -> None:
        """Commit the stored view if it changed (see the module docstring); nothing without a store."""
        if self.store is None or not self.machine.settled:
            return  # a scaling is committed when it has completed or rolled back (spec/recovery.md §9)
        state = stored_state(self.machine.snapshot())
        if state == self._committed or state.cluster_state == ClusterState.CLUSTER_EXIT.name:
            return
        await self.store.commit(Transition(scheduler=state))
        self._committed = state
        if self.machine.state is ClusterState.CLUSTER_STARTING:
            crash_point("scheduler.forming")

    # ---------------------------------------------------------------------------------- running

    async def serve(
        self,
        *,
        with_management: bool = True,
        task_status: trio.TaskStatus[SchedulerAddresses] = trio.TASK_STATUS_IGNORED,
    ) -> ExitCluster:
        """Run the Scheduler until the cluster exits; report its addresses once listening.

        With ``settings.store_path`` (and no store attached by :meth:`recover_from`), the recovery
        store is opened first and kept open while the Scheduler runs.

        Returns:
            The exit instruction (reason and nodes that did not finish).

        Raises:
            StoreOpenError: the recovery store was refused (the message names the file and the way out).
        """
        if self.store is None and self.settings.store_path:
            identity = scheduler_identity(
                self.settings.node_id, self.settings.fl_name, self.settings.server_num
            )
            async with open_sqlite_store(self.settings.store_path, identity) as store:
                log.info(
                    "Scheduler %s recovery store: %s (%s)",
                    self.settings.node_id,
                    store.location,
                    "created" if store.created else "existing",
                )
                await self.recover_from(store)
                return await self._serve(with_management, task_status)
        return await self._serve(with_management, task_status)

    async def _serve(
        self, with_management: bool, task_status: trio.TaskStatus[SchedulerAddresses]
    ) -> ExitCluster:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            listeners = await nursery.start(
                partial(trio.serve_tcp, self.handle_stream, self.settings.port, host=self.settings.bind_host)
            )
            port = listeners[0].socket.getsockname()[1]
            urls: list[str] = []
            tls = self.settings.tls
            if tls is not None:
                nursery.start_soon(watch_certificates, tls)
            if with_management:
                app = create_management_app(
                    self, max_body=self.settings.max_message_size, token=self.settings.manage_token
                )
                urls = await nursery.start(
                    partial(
                        serve_app,
                        app,
                        self.settings.manage_host,
                        self.settings.manage_port,
                        ssl_context=None if tls is None else tls.https,
                    )
                )
                if not self.settings.manage_token and not _is_loopback(self.settings.manage_host):
                    log.warning(
                        "the management port is bound to %r, not loopback, and has no access token: anyone "
                        "who reaches it can read and drive the cluster; set manage_token in config.json "
                        "(spec/management-api.md)",
                        self.settings.manage_host,
                    )
            nursery.start_soon(self._reap_silent_nodes)
            nursery.start_soon(self._startup_deadline)
            nursery.start_soon(self._scaling_deadlines)
            log.info("Scheduler %s listening on port %d, management %s", self.settings.node_id, port, urls)
            task_status.started(SchedulerAddresses(port=port, manage_urls=urls))
            await self._exited.wait()
            if self._finish_requested:
                with trio.move_on_after(2):
                    await self._finish_replied.wait()
            nursery.cancel_scope.cancel()
        assert self._exit is not None
        return self._exit

    async def dispatch(self, event: Event) -> RegisterReply | None:
        """Feed one event to the cluster machine, commit what changed, carry out its instructions.

        With a store, the new stored view is committed before any instruction is carried out and
        before the reply is returned (spec/recovery.md §3.1: acknowledged after the commit).

        Returns:
            The answer for the connection that caused the event (a registration's), else None.

        Raises:
            IllegalEvent: the event was illegal; nothing changed.
            StoreError: the commit failed; the machine is as it was before the event and nothing
                was sent.
        """
        return self._wire_reply(await self.dispatch_operator(event))

    def _wire_reply(self, reply: Reply | None) -> RegisterReply | None:
        match reply:
            case None:
                return None
            case AcceptRegistration(rank=rank):
                return RegisterReply(accepted=True, rank=rank, reason="")
            case RefuseRegistration(node_id=node_id, reason=reason):
                log.warning("refused registration of %r: %s", node_id, reason)
                return RegisterReply(accepted=False, rank=-1, reason=reason)
            case OperatorReply():
                return None  # the management app takes it from dispatch_operator
            case _:
                assert_never(reply)

    def _carry_out(self, ins: Instruction) -> None:
        match ins:
            case SendMembership(state=state, members=members):
                msg = Membership(state=state, members=tuple(MemberRecord(**attrs.asdict(m)) for m in members))
                for server_link in list(self._links.values()):
                    self._post(server_link, msg)
            case StateChanged(old=old, new=new, reason=reason):
                log.info("cluster state %s -> %s (%s)", old.name, new.name, reason)
            case NodeLivenessChanged(node_id=node_id, alive=alive):
                log.info("node %r is %s", node_id, "alive" if alive else "not alive (heartbeat timeout)")
            case SendShutdown(node_ids=node_ids):
                for node_id in node_ids:
                    target = self._links.get(node_id)
                    if target is not None:
                        self._post(target, Shutdown(reason="the operator asked the cluster to finish"))
                assert self._nursery is not None
                self._nursery.start_soon(self._shutdown_deadline)
            case ExitCluster(reason=reason):
                log.info("Scheduler exits: %s", reason)
                self._exit = ins
                self._exited.set()
            case ReleaseNodes(node_ids=node_ids, reason=reason):
                for node_id in node_ids:
                    released = self._links.pop(node_id, None)
                    if released is not None:
                        # The writer sends what is queued (the final membership), then closes the link.
                        released.send_channel.close()
                    log.info("Server %r left the membership (%s)", node_id, reason)
            case ScalingEnded(kind=kind, completed=completed, took_ms=took, reason=reason):
                self.scalings.append(ins)
                log.info(
                    "scale %s %s after %.3f s: %s",
                    kind.value,
                    "completed" if completed else "rolled back",
                    took / 1000,
                    reason,
                )
            case _:
                assert_never(ins)

    def _post(self, link: _ServerLink, msg: Message) -> None:
        if not link.post(msg):
            log.warning("Server %r is not reading its link; dropping it", link.node_id)
            link.send_channel.close()
            if self._links.get(link.node_id) is link:
                del self._links[link.node_id]

    # -------------------------------------------------------------------------------- timers

    async def _reap_silent_nodes(self) -> None:
        await self._on_deadlines(
            self.machine.next_liveness_deadline,
            lambda now_ms: LivenessCheck(cause=f"liveness@{now_ms}", now_ms=now_ms),
        )

    async def _scaling_deadlines(self) -> None:
        await self._on_deadlines(
            self.machine.next_scaling_deadline,
            lambda now_ms: ScalingDeadlinePassed(cause=f"scaling_timeout@{now_ms}", now_ms=now_ms),
        )

    async def _on_deadlines(
        self, next_deadline: Callable[[], int | None], event_at: Callable[[int], Event]
    ) -> None:
        """Dispatch ``event_at(now)`` whenever the machine's ``next_deadline()`` (epoch ms) has passed;
        re-read it after every change of the machine."""
        while True:
            deadline_ms = next_deadline()
            changed = self._changed
            if deadline_ms is None:
                await changed.wait()
                continue
            with trio.move_on_at(self.clock.trio_time(deadline_ms)):
                await changed.wait()
            now_ms = self.clock.now_ms()
            deadline_ms = next_deadline()
            if deadline_ms is not None and now_ms >= deadline_ms:
                await self.dispatch(event_at(now_ms))

    async def _startup_deadline(self) -> None:
        await trio.sleep(self.settings.cluster_available_timeout)
        await self.dispatch(StartupDeadlinePassed(cause="cluster_available_timeout"))

    async def _shutdown_deadline(self) -> None:
        await trio.sleep(self.settings.finish_timeout)
        await self.dispatch(ShutdownDeadlinePassed(cause="finish_timeout"))

    # ---------------------------------------------------------------------------- connections

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one incoming connection (a Server link or an operator request) until it closes."""
        where = peer_name(stream)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                stream = await accept_stream(
                    stream, None if self.settings.tls is None else self.settings.tls.listener
                )
        except HandshakeFailed as exc:
            log.warning("refused a cluster connection from %s: %s", where, exc)
            return
        except trio.TooSlowError:
            log.warning(
                "refused a cluster connection from %s: no TLS handshake within %.0f s",
                where,
                HANDSHAKE_TIMEOUT,
            )
            await trio.aclose_forcefully(stream)
            return
        link = FramedLink(stream, max_frame=self.settings.max_message_size)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                msg, _payload = await link.receive()
            match msg:
                case Register():
                    await self._serve_server_link(link, msg)
                case FinishCluster(token=token):
                    if self._token_accepted(token):
                        await self._serve_finish(link)
                    else:
                        log.warning(
                            "refused a finish_cluster from %s: wrong or missing management token", where
                        )
                        await link.send(ErrorReply(reason=ACCESS_REFUSED))
                case _:
                    await link.send(
                        ErrorReply(reason=f"expected 'register' or 'finish_cluster', got {msg.TYPE!r}")
                    )
        except FrameError as exc:
            log.warning("dropping a connection that sent a bad frame: %s", exc)
            with trio.move_on_after(1):
                with contextlib.suppress(LinkClosed):
                    await link.send(ErrorReply(reason=str(exc)))
        except (LinkClosed, trio.TooSlowError):
            pass
        except StoreError as exc:
            # Nothing that depended on the failed commit was sent; the node retries on a new link.
            log.error("dropping a connection: the recovery store failed: %s", exc)
        except Exception:
            # One connection's failure must never take the Scheduler down (a bug, not bad input:
            # bad input is answered above). Logged with its traceback; the link is dropped.
            log.exception("dropping a connection after an unexpected error")
        finally:
            await link.aclose()

    async def _serve_server_link(self, link: FramedLink, msg: Register) -> None:
        info = NodeInfo(
            node_id=msg.node_id,
            role=msg.role,
            host=msg.host,
            port=msg.port,
            device_port=msg.device_port,
            pid=msg.pid,
        )
        server_link = _ServerLink(msg.node_id, link)
        previous = self._links.get(msg.node_id)
        event = RegisterNode(
            cause=f"register:{msg.node_id}",
            info=info,
            server_num=msg.server_num,
            fl_iteration_num=msg.fl_iteration_num,
            recovering=msg.recovering,
            holder_connected=previous is not None,
            now_ms=self.clock.now_ms(),
        )
        # Register the link before dispatching, so a membership broadcast caused by this very
        # registration reaches the new node too (after its register reply, queued first).
        self._links[msg.node_id] = server_link
        try:
            reply = await self.dispatch(event)
        except BaseException:
            if self._links.get(msg.node_id) is server_link:
                del self._links[msg.node_id]
                if previous is not None:
                    self._links[msg.node_id] = previous
            raise
        assert reply is not None, "a registration is always answered"
        if not reply.accepted:
            del self._links[msg.node_id]
            if previous is not None:
                self._links[msg.node_id] = previous
            await link.send(reply)
            return
        if previous is not None:
            previous.send_channel.close()
        log.info(
            "Server %r registered%s from %s:%d (pid %d) with rank %d",
            msg.node_id,
            " again (recovering)" if msg.recovering else "",
            msg.host,
            msg.port,
            msg.pid,
            reply.rank,
        )
        await link.send(reply)
        try:
            lost = await run_session(
                partial(self._write_link, server_link), partial(self._read_link, server_link)
            )
            if lost is not None:
                log.info("link of Server %r closed: %s", msg.node_id, lost)
        finally:
            if self._links.get(msg.node_id) is server_link:
                del self._links[msg.node_id]

    async def _write_link(self, server_link: _ServerLink) -> None:
        async with server_link.receive_channel:
            async for msg in server_link.receive_channel:
                await server_link.link.send(msg)
        # The queue was closed: this link was replaced or dropped.
        await server_link.link.aclose()

    async def _read_link(self, server_link: _ServerLink) -> None:
        link = server_link.link
        while True:
            try:
                msg, _payload = await link.receive()
            except MessageError as exc:
                server_link.post(ErrorReply(reason=str(exc)))
                continue
            try:
                match msg:
                    case HeartbeatMsg(node_id=node_id) if node_id == server_link.node_id:
                        await self.dispatch(
                            Heartbeat(cause=f"hb:{node_id}", node_id=node_id, now_ms=self.clock.now_ms())
                        )
                        if self.machine.state is ClusterState.CLUSTER_READY:
                            crash_point("scheduler.iterating")
                        server_link.post(HeartbeatReply(state=self.machine.state))
                    case Finished(node_id=node_id) if node_id == server_link.node_id:
                        await self.dispatch(NodeFinished(cause=f"finished:{node_id}", node_id=node_id))
                    case ScalingBarrier(node_id=node_id, iteration=iteration) if (
                        node_id == server_link.node_id
                    ):
                        await self.dispatch(
                            BarrierReached(f"barrier:{node_id}", node_id, iteration, self.clock.now_ms())
                        )
                    case InstanceAnswer(call_id=call_id):
                        waiting = self._calls.get(call_id)
                        if waiting is not None:
                            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                                waiting.send_nowait(msg)
                    case _:
                        server_link.post(
                            ErrorReply(
                                reason=f"unexpected {msg.TYPE!r} on the link of {server_link.node_id!r}"
                            )
                        )
            except IllegalEvent as exc:
                server_link.post(ErrorReply(reason=str(exc)))

    def _token_accepted(self, token: str) -> bool:
        """Whether an operator request's token is the management token (any, when none is set)."""
        expected = self.settings.manage_token
        return not expected or hmac.compare_digest(token.encode(), expected.encode())

    async def _serve_finish(self, link: FramedLink) -> None:
        self._finish_requested = True
        try:
            await self.dispatch(BeginShutdown(cause="flcluster finish"))
        except IllegalEvent as exc:
            await link.send(ErrorReply(reason=str(exc)))
            return
        await self._exited.wait()
        nodes = [
            NodeProcess(
                node_id=m.node_id,
                role=Role.SERVER,
                host=info.host,
                pid=info.pid,
                finished=self.machine.is_finished(m.node_id),
            )
            for m in self.machine.members()
            if (info := self.machine.node_info(m.node_id)) is not None
        ]
        nodes.append(
            NodeProcess(
                node_id=self.settings.node_id, role=Role.SCHEDULER, host="", pid=os.getpid(), finished=True
            )
        )
        try:
            await link.send(FinishReply(nodes=tuple(nodes)))
        finally:
            self._finish_replied.set()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_node_id() -> str:
    """A random node id, the original's fallback when neither MS_NODE_ID nor config.json sets one."""
    return str(uuid.uuid4())


async def run_scheduler(settings: SchedulerSettings) -> ExitCluster:
    """Run one Scheduler until the cluster exits (the body of ``flcluster scheduler``)."""
    node = SchedulerNode(settings)
    return await node.serve()
