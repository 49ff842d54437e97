"""The Server process: joins the cluster, links to its peers, serves devices over HTTP.

Nursery tree (one ``trio.run`` per process)::

    server ────┬ peer listener (TCP, ephemeral port; followers' links to the leader land here)
               │   └ one task per follower (leader role only; cancelled when that role ends):
               │       reader + ordered writer (flcluster.runtime.peer_leader)
               ├ scheduler link (register, heartbeats, membership; reconnects forever)
               │   ├ heartbeat sender (every heartbeat_interval)
               │   └ reader (membership, heartbeat replies, shutdown)
               ├ role supervisor: restarts the role whenever the membership changes it
               │   └ role scope (a cancel scope around its own nursery), one of:
               │       ├ leader (rank 0): round windows, aggregation (flcluster.runtime.driver)
               │       └ link to the leader (followers; reconnects forever)
               │           ├ FollowerSession reader (answers, status, partial-sum requests, models)
               │           └ keep-alive pings
               │     plus a watcher that cancels the role scope when the role changes
               ├ certificate watcher (enable_ssl only: expiry warnings every cert_check_interval_in_hour)
               └ device HTTP (hypercorn.trio.serve, quart-trio app, fl_server_port) → RoundService

Start-up order is the guide's: register with the Scheduler (retrying every ``connect_interval`` until it
is up), wait for the membership that makes the cluster ``CLUSTER_READY``, start the leader (rank 0) or
open the link to it and take its iteration status and model (followers), open the device port, and
only then log exactly ``Server started successfully.``.

**The role can change** (spec/cluster-protocol.md, "Role scope"). The role (leader or follower of a
given leader) is a function of the membership: this Server's rank and the rank-0 member's identity
and address. It runs in a child scope that the supervisor cancels and restarts whenever a new
membership changes that :class:`RoleKey`; the device HTTP port stays up throughout and answers the
safemode text while no role is attached to the :class:`~flcluster.runtime.rounds.LeaderLine`. A
Server that leads again keeps its :class:`~flcluster.core.iteration.IterationMachine` and resumes it.

With ``enable_ssl`` (spec/cluster-protocol.md §7) the links to the Scheduler and to the leader are TLS with
this Server's client certificate, the peer listener takes only followers with a certificate from the
cluster's CA (a refused handshake is logged and closed), and the device port is HTTPS.

**Scaling** (spec/cluster-protocol.md §8). A Server starts its role on the first membership that lists it
in a state a formed cluster has (:data:`FORMED_STATES`), so a Server that joins for a scale-out (or restarts
during one) is not kept waiting for ``CLUSTER_READY``. While the state is ``CLUSTER_SCALE_OUT`` or
``CLUSTER_SCALE_IN`` the leader *holds* (no new iteration starts, :attr:`Leader.hold`); a barrier task on
the Scheduler link sends ``scaling_barrier`` once the leader is at rest, again on every new link. A
membership that no longer lists this Server (scaled in, or a scale-out rolled back) *retires* it: the
role stops, every device request gets the safemode text (devices move on), the Scheduler link is not
opened again, and the process waits for SIGTERM (:func:`run_server` exits 0 on it).

**Instance operations** (spec/cluster-protocol.md §9). The leader answers ``instance_call`` with
:func:`~flcluster.runtime.instance_ops.answer_call` and follows the Scheduler's state on every membership
(:meth:`Leader.follow`).

The Server keeps serving when the Scheduler goes away (the Scheduler is not on the data path): the
scheduler link just reconnects and registers again with ``recovering=True``, and the Scheduler gives
the same node id its old rank back. A ``shutdown`` from the Scheduler (``flcluster finish``) makes the
Server answer ``finished`` and leave its root scope.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from functools import partial
from typing import Final

import attrs
import torch
import trio

from flcluster.aggregation import ModelSpec, ModelWeights
from flcluster.core.cluster import ClusterState, Role
from flcluster.core.device_rows import snapshot_from_rows
from flcluster.core.iteration import IterationConfig, IterationMachine
from flcluster.errors import (
    ClusterError,
    ConfigError,
    FrameError,
    HandshakeFailed,
    MessageError,
    RegistrationRefused,
)
from flcluster.http.device import create_device_app
from flcluster.http.serving import serve_app
from flcluster.runtime.addresses import advertised_address
from flcluster.runtime.driver import EpochClock, Leader, LocalLeaderChannel
from flcluster.runtime.instance_ops import answer_call
from flcluster.runtime.links import FramedLink, LinkClosed, accept_stream, open_stream, peer_name, run_session
from flcluster.runtime.options import LeaderOptions
from flcluster.runtime.peer_follower import FollowerSession
from flcluster.runtime.rounds import LeaderLine, RoundService
from flcluster.store import NodeIdentity, RecoveryStore, StoreRole, open_sqlite_store
from flcluster.tls import NodeTls, watch_certificates
from flcluster.verify import ClientVerification, ClientVerifier
from flcluster.wire.messages import (
    ErrorReply,
    Finished,
    HeartbeatMsg,
    HeartbeatReply,
    HeldUpdates,
    InstanceCall,
    MemberRecord,
    Membership,
    PeerHello,
    PeerHelloReply,
    PeerPing,
    Register,
    RegisterReply,
    ScalingBarrier,
    Shutdown,
)
from flcluster.wire.records import FLPlanParams

log = logging.getLogger("flcluster.server")

STARTED_MESSAGE = "Server started successfully."
#: The states a formed cluster has: a Server listed in a membership in one of them starts its role.
FORMED_STATES: Final = frozenset(
    {
        ClusterState.CLUSTER_READY,
        ClusterState.CLUSTER_SCALE_OUT,
        ClusterState.CLUSTER_SCALE_IN,
        ClusterState.CLUSTER_NEW_INSTANCE,
        ClusterState.CLUSTER_ENABLE_FLS,
        ClusterState.CLUSTER_DISABLE_FLS,
    }
)
#: The states in which the leader holds at the scaling barrier.
SCALING_STATES: Final = frozenset({ClusterState.CLUSTER_SCALE_OUT, ClusterState.CLUSTER_SCALE_IN})
HANDSHAKE_TIMEOUT = 10.0


@attrs.frozen
class ServerSettings:
    """What a Server process needs to run.

    Built from a validated :class:`flcluster.config.FLContext` by :func:`flcluster.settings.server_settings`;
    no defaults and no rules of its own (the context's are the only ones).

    Attributes:
        node_id: Stable identity (``MS_NODE_ID``).
        server_num: Servers that make up the cluster.
        fl_iteration_num: Iterations of the job; every Server must agree.
        scheduler_host: The Scheduler's address (``scheduler_ip``).
        scheduler_port: The Scheduler's cluster TCP port.
        device_port: This Server's device HTTP port (``fl_server_port``).
        device_host: Bind address of the device HTTP port.
        url_prefix: ``http_url_prefix`` before every round path.
        advertise_host: The address peers reach this Server at; empty = the first usable IPv4 address
            towards the Scheduler (loopback when the Scheduler is on loopback).
        heartbeat_interval: Seconds between heartbeats to the Scheduler and pings to the leader.
        connect_interval: Seconds between attempts to reach the Scheduler or the leader.
        max_message_size: Limit on cluster frames, in bytes.
        max_device_body: Limit on device HTTP bodies, in bytes.
        store_path: This Server's recovery store file (spec/recovery.md §2); empty: no recovery.
        tls: The TLS contexts (``enable_ssl``: cluster listener and connector, device HTTPS), or None.
    """

    node_id: str
    server_num: int
    fl_iteration_num: int
    scheduler_host: str
    scheduler_port: int
    device_port: int
    device_host: str
    url_prefix: str
    advertise_host: str
    heartbeat_interval: float
    connect_interval: float
    max_message_size: int
    max_device_body: int
    store_path: str
    tls: NodeTls | None


@attrs.frozen
class JobSettings:
    """The federated job a Server serves: the model, the iteration rules and what devices are told.

    Built from a validated :class:`flcluster.config.FLContext` and the training script's model by
    :func:`flcluster.settings.job_settings`; no defaults of its own.

    Attributes:
        spec: The model's tensors (names and shapes), in model order.
        initial: The initial model (iteration 0); followers take the leader's instead when they join.
        iteration: Thresholds and windows (used by the leader).
        plan: The FLPlan sent to devices at startFLJob.
        device: The torch device the running sums live on.
        model_keep: Models kept in memory for getModel.
        leader: What the leader does besides counting (checkpoints).
        client_verification: With ``pki_verify``, the trust anchors and the replay window
            (spec/device-protocol.md, "Client verification"); ``None`` without.
    """

    spec: ModelSpec
    initial: ModelWeights
    iteration: IterationConfig
    plan: FLPlanParams
    device: torch.device
    model_keep: int
    leader: LeaderOptions
    client_verification: ClientVerification | None


@attrs.frozen
class RoleKey:
    """What decides a Server's role: its rank and who (and where) the leader is.

    Attributes:
        rank: This Server's rank (0: it leads).
        leader_id: The rank-0 member's node id ("" while unknown).
        leader_host: Where the leader's peer listener is.
        leader_port: Its port.
    """

    rank: int
    leader_id: str
    leader_host: str
    leader_port: int


@attrs.frozen
class ServerStarted:
    """Reported by :meth:`ServerNode.serve` once the Server is fully up."""

    rank: int
    peer_port: int
    device_urls: list[str]


class ServerNode:
    """A running Server: its link to the Scheduler, its peer links and its device port."""

    def __init__(
        self, settings: ServerSettings, job: JobSettings, *, store: RecoveryStore | None = None
    ) -> None:
        """A Server for ``settings`` and ``job``.

        Args:
            settings: the process's settings (``store_path`` opens the recovery store at :meth:`serve`).
            job: the federated job.
            store: a recovery store already open (tests); it overrides ``settings.store_path`` and is
                not closed by this Server.
        """
        self.settings = settings
        self.job = job
        self.recovery: RecoveryStore | None = store
        self._given_store = store is not None
        self.line = LeaderLine()
        #: This Server's epoch clock: the device rounds and, while it leads, the leader read the same one.
        self.clock = EpochClock()
        self.rounds = RoundService(
            spec=job.spec,
            initial=job.initial,
            plan=job.plan,
            device=job.device,
            line=self.line,
            keep=job.model_keep,
            verification=job.client_verification,
            now_ms=self.clock.now_ms,
        )
        #: With pki_verify, the leader's device keys and replay memory (kept across role restarts).
        self.client_verifier = (
            None
            if job.client_verification is None
            else ClientVerifier(job.client_verification.replay_attack_time_diff)
        )
        #: The iteration machine, made the first time this Server leads and kept across role restarts.
        self.machine: IterationMachine | None = None
        #: The leader role's driver while this Server leads, else None.
        self.leader: Leader | None = None
        #: The roles this Server has started, in order (for logs and tests).
        self.roles: list[RoleKey] = []
        self._role_changed = trio.Event()
        self.host = settings.advertise_host or advertised_address(settings.scheduler_host)
        self.rank: int | None = None
        self.cluster_state = ClusterState.CLUSTER_STARTING
        self.members: tuple[MemberRecord, ...] = ()
        self.peer_port = 0
        self._ready = trio.Event()
        self._started = trio.Event()
        self._membership_changed = trio.Event()
        self._shutdown = trio.Event()
        self._recovered = False
        #: Set once a membership no longer lists this Server (scaled in, or its scale-out rolled back).
        self.retired = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[ServerStarted] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the Server until the cluster finishes it (or the surrounding scope is cancelled).

        Raises:
            RegistrationRefused: the Scheduler refused this Server (the message says why).
            StoreError: the recovery store cannot be opened (the message names the file and why).
        """
        async with contextlib.AsyncExitStack() as stack:
            if self.recovery is None and self.settings.store_path:
                identity = NodeIdentity(
                    StoreRole.SERVER, self.settings.node_id, self.job.leader.fl_name, self.settings.server_num
                )
                self.recovery = await stack.enter_async_context(
                    open_sqlite_store(self.settings.store_path, identity)
                )
            if self.recovery is not None:
                await self._restore(self.recovery)
            await self._serve(task_status=task_status)

    async def _restore(self, store: RecoveryStore) -> None:
        """Take back the models, the running sum and (on a leader) the machine the store holds."""
        contents = await store.load()
        log.info(
            "recovery store %s (%s)", store.location, "created" if store.created else "recovered from it"
        )
        self.rounds.recovery = store
        self.rounds.restore(contents)
        self._recovered = not store.created
        if contents.server is not None:
            self.rounds.rank = contents.server.rank
            if contents.server.machine is not None:
                snapshot = snapshot_from_rows(contents.server.machine, contents.devices)
                self.machine = IterationMachine.from_snapshot(snapshot)
                log.info("recovered the iteration machine: %r", self.machine)

    async def _serve(self, *, task_status: trio.TaskStatus[ServerStarted]) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, self._handle_peer, 0, host=self.host))
            self.peer_port = listeners[0].socket.getsockname()[1]
            tls = self.settings.tls
            if tls is not None:
                nursery.start_soon(watch_certificates, tls)
            await nursery.start(self._run_scheduler_link)
            await self._ready.wait()
            await nursery.start(self._supervise_role)
            assert self.rank is not None
            app = create_device_app(
                self.rounds, url_prefix=self.settings.url_prefix, max_body=self.settings.max_device_body
            )
            host, port = self.settings.device_host, self.settings.device_port
            try:
                urls = await nursery.start(
                    partial(serve_app, app, host, port, ssl_context=None if tls is None else tls.https)
                )
            except* OSError as group:
                # The operator's port is taken (or the address is not this host's): a clear refusal.
                raise ConfigError(
                    f"fl_server_port={port!r} cannot be opened on {host!r}: {group.exceptions[0]}; "
                    "give this Server a free port"
                ) from None
            log.info(STARTED_MESSAGE)
            self._started.set()
            task_status.started(ServerStarted(rank=self.rank, peer_port=self.peer_port, device_urls=urls))
            await self._shutdown.wait()
            nursery.cancel_scope.cancel()

    async def wait_started(self) -> None:
        """Wait until this Server has logged ``Server started successfully.``."""
        await self._started.wait()

    async def wait_role(self, key: RoleKey) -> None:
        """Wait until the role last started is ``key`` (the leader running, or the follower synced)."""
        while not (self.roles and self.roles[-1] == key):
            await self._role_changed.wait()

    # -------------------------------------------------------------------------- scheduler link

    async def _connect(self, host: str, port: int, what: str) -> trio.abc.Stream:
        """Connect (TLS with ``enable_ssl``), retrying every ``connect_interval`` until it works.

        Start-up order is free; a refused TLS handshake is retried like a peer that is down (the reason is
        logged: spec/cluster-protocol.md §7.4).
        """
        tls = None if self.settings.tls is None else self.settings.tls.connector
        attempt = 0
        while True:
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    return await open_stream(host, port, tls)
            except (OSError, HandshakeFailed, trio.TooSlowError) as exc:
                attempt += 1
                if attempt == 1 or attempt % 10 == 0:
                    level = logging.WARNING if isinstance(exc, HandshakeFailed) else logging.INFO
                    log.log(level, "waiting for the %s at %s:%d (%s); retrying", what, host, port, exc)
                await trio.sleep(self.settings.connect_interval)

    async def _run_scheduler_link(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        registered = False
        while True:
            stream = await self._connect(
                self.settings.scheduler_host, self.settings.scheduler_port, "Scheduler"
            )
            link = FramedLink(stream, max_frame=self.settings.max_message_size)
            try:
                reply = await self._register(link, recovering=registered or self._recovered)
                if not registered:
                    registered = True
                    task_status.started()
                log.info("registered with the Scheduler as %r, rank %d", self.settings.node_id, reply.rank)
                lost = await run_session(
                    partial(self._send_heartbeats, link),
                    partial(self._read_scheduler, link),
                    partial(self._report_barrier, link),
                )
                if self._shutdown.is_set() or self.retired.is_set():
                    return
                log.warning("lost the Scheduler link (%s); reconnecting", lost)
            except (LinkClosed, FrameError, trio.TooSlowError) as exc:
                if self._shutdown.is_set() or self.retired.is_set():
                    return
                log.warning("lost the Scheduler link (%s); reconnecting", exc)
            finally:
                await link.aclose()
            await trio.sleep(self.settings.connect_interval)

    async def _register(self, link: FramedLink, *, recovering: bool) -> RegisterReply:
        s = self.settings
        await link.send(
            Register(
                node_id=s.node_id,
                role=Role.SERVER,
                host=self.host,
                port=self.peer_port,
                device_port=s.device_port,
                pid=os.getpid(),
                server_num=s.server_num,
                fl_iteration_num=s.fl_iteration_num,
                recovering=recovering,
            )
        )
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            msg, _ = await link.receive()
        if isinstance(msg, ErrorReply):
            raise RegistrationRefused(f"the Scheduler refused the registration: {msg.reason}")
        if not isinstance(msg, RegisterReply):
            raise ClusterError(f"expected a register reply from the Scheduler, got {msg.TYPE!r}")
        if not msg.accepted:
            raise RegistrationRefused(msg.reason)
        self.rank = msg.rank
        self.rounds.rank = msg.rank
        return msg

    async def _send_heartbeats(self, link: FramedLink) -> None:
        while True:
            await link.send(HeartbeatMsg(node_id=self.settings.node_id))
            await trio.sleep(self.settings.heartbeat_interval)

    async def _read_scheduler(self, link: FramedLink) -> None:
        while True:
            try:
                msg, _ = await link.receive()
            except MessageError as exc:
                log.warning("ignoring a bad message from the Scheduler: %s", exc)
                continue
            match msg:
                case Membership():
                    self._apply_membership(msg)
                    if self.retired.is_set():
                        return  # this Server left the membership: the link closes, never reopened
                case InstanceCall():
                    await link.send(await answer_call(self.leader, msg))
                case HeartbeatReply(state=state):
                    self.cluster_state = state
                case Shutdown(reason=reason):
                    log.info("the Scheduler asked this Server to finish: %s", reason)
                    await link.send(Finished(node_id=self.settings.node_id))
                    self._shutdown.set()
                    return
                case ErrorReply(reason=reason):
                    log.warning("the Scheduler reports an error: %s", reason)
                case _:
                    log.warning("ignoring an unexpected %r from the Scheduler", msg.TYPE)

    async def _report_barrier(self, link: FramedLink) -> None:
        """Send ``scaling_barrier`` once per scaling on this link, when this Server leads and is at rest."""
        reported = False
        while True:
            leader = self.leader
            # Taken before any await, so a change while the barrier is being sent wakes the next wait.
            waits = [self._membership_changed, self._role_changed]
            if leader is not None:
                waits.append(leader.changed)
            if self.cluster_state not in SCALING_STATES:
                reported = False
            elif not reported and leader is not None and leader.hold and leader.at_rest():
                iteration = leader.machine.current_iteration
                log.info("at the scaling barrier: holding at iteration %d", iteration)
                await link.send(ScalingBarrier(node_id=self.settings.node_id, iteration=iteration))
                reported = True
            await _wait_any(*waits)

    def _apply_membership(self, msg: Membership) -> None:
        self.cluster_state = msg.state
        self.members = msg.members
        listed = next((m for m in msg.members if m.node_id == self.settings.node_id), None)
        if listed is None:
            self._retire(msg)
            return
        self.rank = listed.rank
        self.rounds.rank = listed.rank
        log.info(
            "membership: %s, %s",
            msg.state.name,
            ", ".join(
                f"{m.rank}={m.node_id}@{m.host}:{m.port}{'' if m.alive else ' (down)'}" for m in msg.members
            ),
        )
        if self.cluster_state in FORMED_STATES:
            self._ready.set()
        leader = self.leader
        if leader is not None:
            leader.hold = self.cluster_state in SCALING_STATES
            leader.follow(self.cluster_state)
        self._membership_changed.set()
        self._membership_changed = trio.Event()

    def _retire(self, msg: Membership) -> None:
        """No longer a member: stop serving, wait for SIGTERM (spec/cluster-protocol.md §8)."""
        if self.retired.is_set():
            return
        self.rounds.retired = True
        self.retired.set()
        log.info(
            "Server %s was scaled in (the membership in %s lists %s); it stays up until it gets SIGTERM.",
            self.settings.node_id,
            msg.state.name,
            ", ".join(m.node_id for m in msg.members) or "no Server",
        )
        self._membership_changed.set()
        self._membership_changed = trio.Event()

    def leader_member(self) -> MemberRecord | None:
        """The rank-0 member, once the membership is known."""
        return next((m for m in self.members if m.rank == 0), None)

    def role_key(self) -> RoleKey:
        """The role the current membership gives this Server."""
        assert self.rank is not None, "the rank is known once registered"
        leader = self.leader_member()
        if leader is None:
            return RoleKey(self.rank, "", "", 0)
        return RoleKey(self.rank, leader.node_id, leader.host, leader.port)

    # ------------------------------------------------------------------------------- role scope

    async def _supervise_role(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the role the membership gives; cancel and restart it whenever that changes.

        Reports started once the first role is up (the leader running, or a follower synced), so the
        device port opens on a Server that can count. Spec: cluster-protocol.md, "Role scope".
        """
        started = False
        while True:
            if self.retired.is_set():
                log.info("the role of Server %s ended: it is no longer a member", self.settings.node_id)
                await trio.sleep_forever()
            key = self.role_key()
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as role:
                    role.start_soon(self._watch_role, key, scope)
                    await role.start(self._run_role, key)
                    self.roles.append(key)
                    self._role_changed.set()
                    self._role_changed = trio.Event()
                    if not started:
                        started = True
                        task_status.started()
            log.info("the membership changed this Server's role (was %s); restarting it", key)

    async def _watch_role(self, key: RoleKey, scope: trio.CancelScope) -> None:
        while self.role_key() == key and not self.retired.is_set():
            await self._membership_changed.wait()
        scope.cancel()

    async def _run_role(
        self, key: RoleKey, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if key.rank == 0:
            await self._lead(task_status=task_status)
        else:
            await self._run_leader_link(key, task_status=task_status)

    async def _lead(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The leader role: drive the iteration machine and count for the whole cluster."""
        if self.machine is None:
            self.machine = IterationMachine(
                self.job.iteration, participation_levels=self.job.leader.participation_levels
            )
        await self.rounds.adopt_history()
        leader = Leader(
            self.machine,
            self.rounds,
            self.clock,
            self_id=self.settings.node_id,
            members=lambda: [(m.rank, m.node_id) for m in self.members],
            options=self.job.leader,
            store=self.recovery,
            verifier=self.client_verifier,
        )
        # Hold from the start if the cluster is scaling (a leader restarted during a scaling, §8).
        leader.hold = self.cluster_state in SCALING_STATES
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(leader.run)
                self.leader = leader
                leader.follow(self.cluster_state)
                with self.line.attach(LocalLeaderChannel(leader)):
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            if self.leader is leader:
                self.leader = None

    # ------------------------------------------------------------------------------ peer links

    async def _run_leader_link(
        self, key: RoleKey, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The follower role: keep this follower's link to the leader; reconnect when it breaks.

        Reports started once the leader has sent the iteration status and the current model, so the
        device port never opens on a Server that cannot count.
        """
        started = False
        while True:
            stream = await self._connect(key.leader_host, key.leader_port, "leader (rank 0)")
            link = FramedLink(stream, max_frame=self.settings.max_message_size)
            try:
                await link.send(PeerHello(node_id=self.settings.node_id, rank=key.rank))
                # The hello's second frame: what this Server's committed sum holds (recovery §5.1),
                # once folds in flight have settled (none can start: no channel is attached).
                await self.rounds.settle()
                held_iteration, held_ids = self.rounds.held_updates()
                await link.send(HeldUpdates(iteration=held_iteration, fl_ids=held_ids))
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    reply, _ = await link.receive()
                if not isinstance(reply, PeerHelloReply):
                    # Not fatal: the leader may not know this Server yet. Retry like a lost link.
                    raise LinkClosed(f"the leader answered the peer hello with {reply!r:.200}")
                session = FollowerSession(link, self.rounds)

                async def synced(session: FollowerSession = session) -> None:
                    nonlocal started
                    await session.wait_synced()
                    with self.line.attach(session):
                        if not started:
                            started = True
                            task_status.started()
                        await trio.sleep_forever()

                lost = await run_session(session.run, synced, partial(self._ping, link))
                log.warning("lost the link to the leader (%s); reconnecting", lost or "closed")
            except (LinkClosed, FrameError, trio.TooSlowError) as exc:
                log.warning("lost the link to the leader (%s); reconnecting", exc)
            finally:
                await link.aclose()
            await trio.sleep(self.settings.connect_interval)

    async def _ping(self, link: FramedLink) -> None:
        """Keep the peer link alive while nothing else flows on it."""
        seq = 0
        while True:
            await link.send(PeerPing(seq=seq))
            seq += 1
            await trio.sleep(self.settings.heartbeat_interval)

    async def _handle_peer(self, stream: trio.abc.Stream) -> None:
        """Serve one incoming peer link: a follower connecting to this leader."""
        where = peer_name(stream)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                stream = await accept_stream(
                    stream, None if self.settings.tls is None else self.settings.tls.listener
                )
        except (HandshakeFailed, trio.TooSlowError) as exc:
            log.warning("refused a peer connection from %s: %s", where, exc or "no TLS handshake in time")
            await trio.aclose_forcefully(stream)
            return
        link = FramedLink(stream, max_frame=self.settings.max_message_size)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                msg, _ = await link.receive()
                if not isinstance(msg, PeerHello):
                    await link.send(ErrorReply(reason="a peer link must start with a peer hello"))
                    return
                held, _ = await link.receive()
                if not isinstance(held, HeldUpdates):
                    await link.send(ErrorReply(reason="a peer hello is followed by held_updates"))
                    return
                # The follower may have its membership before this leader has (the Scheduler sends
                # it to each Server in turn): wait for it, within the handshake deadline.
                while self.leader is None:
                    await self._role_changed.wait()
                while not any(m.node_id == msg.node_id for m in self.members):
                    await self._membership_changed.wait()
            leader = self.leader
            if leader is None or self.rank is None:
                return  # the leader role ended during the handshake: the follower retries
            await link.send(PeerHelloReply(node_id=self.settings.node_id, rank=self.rank))
            await leader.serve_follower(link, msg.node_id, msg.rank, held)
        except (LinkClosed, FrameError, trio.TooSlowError):
            pass
        finally:
            await link.aclose()


async def _wait_any(*events: trio.Event) -> None:
    """Return once any of ``events`` is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


async def run_server(
    settings: ServerSettings,
    job: JobSettings,
    *,
    task_status: trio.TaskStatus[ServerStarted] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one Server until the cluster finishes it or SIGTERM comes (the body of ``flcluster server``).

    SIGTERM (``kill -15``, how the guide recycles a scaled-in Server) ends the Server cleanly: its scopes
    are cancelled, its recovery store closed, and the process exits with status 0.
    """
    node = ServerNode(settings, job)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_sigterm() -> None:
                async for _ in signals:
                    log.info(
                        "Server %s got SIGTERM%s; exiting",
                        settings.node_id,
                        " (scaled in)" if node.retired.is_set() else "",
                    )
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(on_sigterm)
            await node.serve(task_status=task_status)
            nursery.cancel_scope.cancel()
