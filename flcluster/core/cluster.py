"""The Scheduler's cluster rules as a sans-IO state machine (spec/state-machines.md, "Cluster").

Theory of operation
-------------------
The Scheduler knows *who* is in the cluster and *whether they are alive*; it is not on the data path.
This module holds those rules and nothing else: it never touches a socket, a clock or a file. The trio
driver (:mod:`flcluster.runtime.scheduler`) turns what happens on the network and on its clock into
:data:`Event` records and calls :meth:`ClusterMachine.handle`, which returns an
:class:`~flcluster.core.outcome.Outcome`, the same result type :mod:`flcluster.core.iteration` returns:
the :data:`Reply` to the node that sent the event (the answer to a registration, None otherwise) and the
:data:`Instruction` records to carry out, in order (send the membership, log a state change, exit).
Every event carries a ``cause`` id and every reply and instruction repeats it (dask's ``stimulus_id``).

Identity and rank are kept apart on purpose: a node is known by its ``node_id`` (``MS_NODE_ID``), which
survives restarts, and it is *given* a rank. Ranks 0..N-1 are handed out in order of arrival; a node id
that registered before gets its old rank back. This is what lets a restarted node rejoin as itself, and
what scaling (which renumbers ranks) will change later without touching identity.

Time enters only through events, as ``now_ms``: **epoch milliseconds** (an ``int``), the unit and origin
:mod:`flcluster.core.iteration` uses, so both machines read alike. Epoch time, not the driver's clock,
because a :class:`ClusterSnapshot` outlives the process that took it: a last heartbeat persisted before a
SIGKILL still means something to the restarted Scheduler, whose trio clock has another origin. The driver
reads epoch milliseconds off trio's clock (so virtual time moves them too) and converts the configured
heartbeat timeout from seconds to milliseconds once, into :class:`ClusterConfig`. A node is alive while
``now_ms < last_heartbeat_ms + heartbeat_timeout_ms``; the driver asks
:meth:`ClusterMachine.next_liveness_deadline` when to come back and feeds :class:`LivenessCheck` then,
so a silent node becomes ``alive: false`` at exactly the timeout.

:meth:`ClusterMachine.snapshot` gives the whole state as a frozen :class:`ClusterSnapshot` of plain
records (membership with node ids, ranks and liveness, the total ``server_num``, the agreed
``fl_iteration_num``, the cluster state and the two flags), and :meth:`ClusterMachine.from_snapshot`
rebuilds a machine that is equal to the original and behaves exactly like it on every later event.

Illegal events raise :class:`~flcluster.errors.IllegalEvent` and change nothing (the h11 rule); a
registration that breaks a consistency rule is *not* illegal: it is refused with a reason, which the
driver sends back to that node.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TypeAlias, assert_never, final

import attrs

from flcluster.core import outcome as _outcome
from flcluster.core.scaling import (
    MAX_SERVER_NUM,
    MESSAGE_ALREADY_DISABLED,
    MESSAGE_DISABLED,
    MESSAGE_ENABLED,
    MESSAGE_NODE_IDS_EMPTY,
    MESSAGE_NOT_CONNECTED,
    MESSAGE_NOT_DISABLED,
    MESSAGE_NOT_READY,
    MESSAGE_NOT_READY_FOR_ROLLBACK,
    MESSAGE_NOT_SCALING_OUT,
    MESSAGE_ROLLED_BACK,
    MESSAGE_SCALE_IN,
    MESSAGE_SCALE_OUT,
    BarrierReached,
    DisableFLSRequested,
    EnableFLSRequested,
    InstanceOperationEnded,
    NewInstanceStarted,
    Operation,
    OperatorReply,
    ReleaseNodes,
    ScaleInRequested,
    ScaleKind,
    ScaleOutRequested,
    ScaleOutRollbackRequested,
    Scaling,
    ScalingDeadlinePassed,
    ScalingEnded,
    message_illegal_node_id,
    message_rank_zero,
    message_too_many_servers,
    message_zero_scale_out,
)
from flcluster.errors import IllegalEvent

__all__ = [
    "AcceptRegistration",
    "BarrierReached",
    "BeginShutdown",
    "ClusterConfig",
    "ClusterMachine",
    "ClusterSnapshot",
    "ClusterState",
    "DisableFLSRequested",
    "EnableFLSRequested",
    "Event",
    "ExitCluster",
    "Heartbeat",
    "InstanceOperationEnded",
    "Instruction",
    "LivenessCheck",
    "Member",
    "NewInstanceStarted",
    "NodeFinished",
    "NodeInfo",
    "NodeLivenessChanged",
    "NodeRecord",
    "Operation",
    "OperatorReply",
    "Outcome",
    "RefuseRegistration",
    "RegisterNode",
    "ReleaseNodes",
    "Reply",
    "Role",
    "ScaleInRequested",
    "ScaleKind",
    "ScaleOutRequested",
    "ScaleOutRollbackRequested",
    "Scaling",
    "ScalingDeadlinePassed",
    "ScalingEnded",
    "SendMembership",
    "SendShutdown",
    "ShutdownDeadlinePassed",
    "StartupDeadlinePassed",
    "StateChanged",
]


class ClusterState(enum.IntEnum):
    """The original's cluster states, with the original's numbers (reference §3.7)."""

    CLUSTER_STARTING = 0
    CLUSTER_READY = 1
    CLUSTER_EXIT = 2
    NODE_TIMEOUT = 3
    CLUSTER_SCALE_OUT = 4
    CLUSTER_SCALE_IN = 5
    CLUSTER_NEW_INSTANCE = 6
    CLUSTER_ENABLE_FLS = 7
    CLUSTER_DISABLE_FLS = 8
    CLUSTER_SCHEDULER_RECOVERY = 9
    CLUSTER_SCALE_OUT_ROLLBACK = 10


class Role(enum.StrEnum):
    """A node's role, spelled as the management API spells it."""

    SERVER = "SERVER"
    WORKER = "WORKER"
    SCHEDULER = "SCHEDULER"


@attrs.frozen
class NodeInfo:
    """What a node tells the Scheduler about itself when it registers.

    Attributes:
        node_id: Stable identity (``MS_NODE_ID``); survives restarts.
        role: The node's role; only Servers take part in cross-device FL.
        host: The IPv4 address the node advertises to its peers.
        port: The node's cluster TCP port (peer links).
        device_port: The node's device HTTP port (``fl_server_port + i``).
        pid: The node's process id on its host, so ``flcluster finish`` can report it.
    """

    node_id: str
    role: Role = attrs.field(converter=Role)
    host: str
    port: int
    device_port: int
    pid: int


@attrs.frozen
class Member:
    """One row of the membership the Scheduler sends to every Server."""

    rank: int
    node_id: str
    host: str
    port: int
    device_port: int
    alive: bool


# ---------------------------------------------------------------------------------------------- events


def _epoch_ms(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    """A time on an event: epoch milliseconds, an ``int >= 0`` (a float of seconds is refused)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{attribute.name} must be epoch milliseconds (an int >= 0), got {value!r}")


@attrs.frozen
class RegisterNode:
    """A node asks to join (or rejoin) the cluster.

    Attributes:
        holder_connected: whether the link of the node id's current holder is still open (the driver
            knows its links; the machine knows heartbeats): a live holder that is another process makes
            this registration refused (spec/recovery.md §6).
    """

    cause: str
    info: NodeInfo
    server_num: int
    fl_iteration_num: int
    recovering: bool
    holder_connected: bool
    now_ms: int = attrs.field(validator=_epoch_ms)


@attrs.frozen
class Heartbeat:
    """A heartbeat arrived from a registered node."""

    cause: str
    node_id: str
    now_ms: int = attrs.field(validator=_epoch_ms)


@attrs.frozen
class LivenessCheck:
    """The driver's clock reached a liveness deadline (or any later time)."""

    cause: str
    now_ms: int = attrs.field(validator=_epoch_ms)


@attrs.frozen
class StartupDeadlinePassed:
    """``cluster_available_timeout`` ran out; exits the cluster unless it became ready in time."""

    cause: str


@attrs.frozen
class BeginShutdown:
    """An operator asked the whole cluster to finish (``flcluster finish``)."""

    cause: str


@attrs.frozen
class NodeFinished:
    """A node reports that it has stopped serving and is about to exit."""

    cause: str
    node_id: str


@attrs.frozen
class ShutdownDeadlinePassed:
    """Some nodes did not report finishing in time; the cluster exits without them."""

    cause: str


Event = (
    RegisterNode
    | Heartbeat
    | LivenessCheck
    | StartupDeadlinePassed
    | BeginShutdown
    | NodeFinished
    | ShutdownDeadlinePassed
    | ScaleOutRequested
    | ScaleInRequested
    | ScaleOutRollbackRequested
    | BarrierReached
    | ScalingDeadlinePassed
    | DisableFLSRequested
    | EnableFLSRequested
    | NewInstanceStarted
    | InstanceOperationEnded
)

# --------------------------------------------------------------------------------------------- replies


@attrs.frozen
class AcceptRegistration:
    """Reply to the registering node: you are in, with this rank."""

    cause: str
    node_id: str
    rank: int


@attrs.frozen
class RefuseRegistration:
    """Reply to the registering node: refused, and why (the node exits with this message)."""

    cause: str
    node_id: str
    reason: str


Reply = AcceptRegistration | RefuseRegistration | OperatorReply

# ---------------------------------------------------------------------------------------- instructions


@attrs.frozen
class SendMembership:
    """Send the current membership and state to every registered node."""

    cause: str
    state: ClusterState
    members: tuple[Member, ...]


@attrs.frozen
class StateChanged:
    """The cluster state changed (the driver logs it; recovery will persist it)."""

    cause: str
    old: ClusterState
    new: ClusterState
    reason: str


@attrs.frozen
class NodeLivenessChanged:
    """A node was marked alive or not alive."""

    cause: str
    node_id: str
    alive: bool


@attrs.frozen
class SendShutdown:
    """Tell these nodes to finish: stop serving, report :class:`NodeFinished`, exit."""

    cause: str
    node_ids: tuple[str, ...]


@attrs.frozen
class ExitCluster:
    """The Scheduler should exit; ``unfinished`` lists nodes that never reported finishing."""

    cause: str
    reason: str
    unfinished: tuple[str, ...]


Instruction = (
    SendMembership
    | StateChanged
    | NodeLivenessChanged
    | SendShutdown
    | ExitCluster
    | ReleaseNodes
    | ScalingEnded
)

#: What one event produced: the registration answer (None for any other event) and the instructions,
#: in order (the outcome type every core machine shares, :class:`flcluster.core.outcome.Outcome`).
Outcome: TypeAlias = _outcome.Outcome[Reply, Instruction]


# ------------------------------------------------------------------------------------- configuration


@final
@attrs.frozen
class ClusterConfig:
    """The numbers the Scheduler holds every registration against.

    Attributes:
        server_num: How many Servers a new cluster is made of (``--server_num``).
        heartbeat_timeout_ms: Milliseconds without a heartbeat before a node is not alive (the driver
            converts the configured seconds once).
        scaling_timeout_ms: Milliseconds a scaling may take before it rolls back (``scaling_timeout``).
    """

    server_num: int = attrs.field(validator=[attrs.validators.instance_of(int), attrs.validators.ge(1)])
    heartbeat_timeout_ms: int = attrs.field(
        validator=[attrs.validators.instance_of(int), attrs.validators.ge(1)]
    )
    scaling_timeout_ms: int = attrs.field(
        default=300_000, validator=[attrs.validators.instance_of(int), attrs.validators.ge(1)]
    )


# ------------------------------------------------------------------------------------------ snapshot


@final
@attrs.frozen(kw_only=True)
class NodeRecord:
    """One registered node in a :class:`ClusterSnapshot`.

    Attributes:
        info: What the node registered with (its latest registration).
        rank: The rank it was given.
        last_heartbeat_ms: Epoch milliseconds of its latest heartbeat or registration.
        alive: Whether it is alive (not timed out).
        finished: Whether it reported finishing.
    """

    info: NodeInfo
    rank: int
    last_heartbeat_ms: int
    alive: bool
    finished: bool


@final
@attrs.frozen(kw_only=True)
class ClusterSnapshot:
    """The whole state of a :class:`ClusterMachine` as plain records, for the recovery store.

    ``nodes`` is in rank order, which is also the order the nodes registered in, so equal machines have
    equal snapshots and a rebuilt machine lists nodes (in refusals, shutdowns, exits) as the original.

    Attributes:
        server_num: The total number of Servers the cluster is made of now.
        state: The cluster state.
        fl_iteration_num: The ``fl_iteration_num`` every Server agreed on; None before the first
            accepted registration.
        ever_ready: Whether the cluster has been ``CLUSTER_READY`` (then it never goes back to
            ``CLUSTER_STARTING`` and outlives ``cluster_available_timeout``).
        shutting_down: Whether a finish was requested (registrations are refused from then on).
        nodes: Every registered node, by rank.
        scaling: The scaling in progress, or None.
        disabled: Whether ``/disableFLS`` is in force.
        operation: The transient instance operation the Scheduler waits on, or None.
    """

    server_num: int
    state: ClusterState = attrs.field(converter=ClusterState)
    fl_iteration_num: int | None
    ever_ready: bool
    shutting_down: bool
    nodes: tuple[NodeRecord, ...]
    scaling: Scaling | None = None
    disabled: bool = False
    operation: Operation | None = attrs.field(default=None, converter=attrs.converters.optional(Operation))


# ------------------------------------------------------------------------------------------- machine


@attrs.define
class _Node:
    info: NodeInfo
    rank: int
    last_heartbeat_ms: int
    alive: bool = True
    finished: bool = False


class ClusterMachine:
    """Membership, ranks, liveness and cluster state of one Scheduler.

    Feed it events with :meth:`handle`; send the outcome's reply and carry out its instructions, in
    order. Two machines are equal when their configs and :meth:`snapshot` records are equal.
    """

    def __init__(self, config: ClusterConfig) -> None:
        """Start a cluster with no nodes, in ``CLUSTER_STARTING``."""
        self._config = config
        self._server_num = config.server_num
        # Insertion order is registration order is rank order: nodes are never removed, and a
        # re-registration updates its node in place (from_snapshot rebuilds in rank order).
        self._nodes: dict[str, _Node] = {}
        self._state = ClusterState.CLUSTER_STARTING
        self._fl_iteration_num: int | None = None
        self._ever_ready = False
        self._shutting_down = False
        self._scaling: Scaling | None = None
        self._disabled = False
        self._operation: Operation | None = None

    # ------------------------------------------------------------------------------------ queries

    @property
    def config(self) -> ClusterConfig:
        """The numbers this machine was started with."""
        return self._config

    @property
    def server_num(self) -> int:
        """The total number of Servers the cluster is made of (the config's, or the snapshot's)."""
        return self._server_num

    @property
    def state(self) -> ClusterState:
        """The current cluster state."""
        return self._state

    @property
    def fl_iteration_num(self) -> int | None:
        """The ``fl_iteration_num`` every Server agreed on (None before the first registration)."""
        return self._fl_iteration_num

    def members(self) -> tuple[Member, ...]:
        """Every registered node, ordered by rank."""
        rows = [
            Member(
                rank=rec.rank,
                node_id=node_id,
                host=rec.info.host,
                port=rec.info.port,
                device_port=rec.info.device_port,
                alive=rec.alive,
            )
            for node_id, rec in self._nodes.items()
        ]
        return tuple(sorted(rows, key=lambda m: m.rank))

    def node_info(self, node_id: str) -> NodeInfo | None:
        """What the node registered with, or None for an unknown node id."""
        rec = self._nodes.get(node_id)
        return None if rec is None else rec.info

    def is_finished(self, node_id: str) -> bool:
        """Whether the node reported finishing during a shutdown."""
        rec = self._nodes.get(node_id)
        return rec is not None and rec.finished

    @property
    def scaling(self) -> Scaling | None:
        """The scaling in progress, or None."""
        return self._scaling

    @property
    def disabled(self) -> bool:
        """Whether ``/disableFLS`` is in force."""
        return self._disabled

    @property
    def operation(self) -> Operation | None:
        """The transient instance operation in progress, or None."""
        return self._operation

    @property
    def settled(self) -> bool:
        """No scaling and no transient operation is in progress (what the store keeps is settled)."""
        return self._scaling is None and self._operation is None

    def leader_id(self) -> str | None:
        """The node id of the rank-0 member, or None before it registered."""
        return next((node_id for node_id, rec in self._nodes.items() if rec.rank == 0), None)

    def ready_refusal(self, connected: int, *, disabled_too: bool = False) -> str | None:
        """Why an operator request cannot run now (the original's ``CheckIfClusterReady``), or None.

        Args:
            connected: registered Servers the driver holds an open link for.
            disabled_too: also accept ``CLUSTER_DISABLE_FLS`` (``/newInstance``, ``/queryInstance``).
        """
        states = {ClusterState.CLUSTER_READY}
        if disabled_too:
            states.add(ClusterState.CLUSTER_DISABLE_FLS)
        if self._shutting_down or self._state not in states:
            return MESSAGE_NOT_READY
        if connected != len(self._nodes):
            return MESSAGE_NOT_CONNECTED
        return None

    def next_scaling_deadline(self) -> int | None:
        """The epoch millisecond at which the scaling in progress rolls back (None when none is)."""
        return None if self._scaling is None else self._scaling.deadline_ms

    def next_liveness_deadline(self) -> int | None:
        """The earliest epoch millisecond at which a live node would time out (None when none is live)."""
        deadlines = [
            rec.last_heartbeat_ms + self._config.heartbeat_timeout_ms
            for rec in self._nodes.values()
            if rec.alive
        ]
        return min(deadlines, default=None)

    # ----------------------------------------------------------------------------------- snapshot

    def snapshot(self) -> ClusterSnapshot:
        """The whole state, as plain records (see :meth:`from_snapshot`)."""
        return ClusterSnapshot(
            server_num=self._server_num,
            state=self._state,
            fl_iteration_num=self._fl_iteration_num,
            ever_ready=self._ever_ready,
            shutting_down=self._shutting_down,
            nodes=tuple(
                NodeRecord(
                    info=rec.info,
                    rank=rec.rank,
                    last_heartbeat_ms=rec.last_heartbeat_ms,
                    alive=rec.alive,
                    finished=rec.finished,
                )
                for rec in sorted(self._nodes.values(), key=lambda r: r.rank)
            ),
            scaling=self._scaling,
            disabled=self._disabled,
            operation=self._operation,
        )

    @classmethod
    def from_snapshot(cls, config: ClusterConfig, snapshot: ClusterSnapshot) -> ClusterMachine:
        """Rebuild the machine a snapshot was taken from, with this config's heartbeat timeout.

        The total ``server_num`` is the snapshot's (the total in force when it was taken), not the
        config's: the original's Scheduler recovery restores the persisted totals too.

        Raises:
            ValueError: The snapshot breaks a rule no run of the machine can break (a corrupt store);
                the message names every broken rule and the values.
        """
        _check_snapshot(snapshot)
        machine = cls(config)
        machine._server_num = snapshot.server_num
        machine._state = snapshot.state
        machine._fl_iteration_num = snapshot.fl_iteration_num
        machine._ever_ready = snapshot.ever_ready
        machine._shutting_down = snapshot.shutting_down
        machine._scaling = snapshot.scaling
        machine._disabled = snapshot.disabled
        machine._operation = snapshot.operation
        machine._nodes = {
            n.info.node_id: _Node(
                info=n.info,
                rank=n.rank,
                last_heartbeat_ms=n.last_heartbeat_ms,
                alive=n.alive,
                finished=n.finished,
            )
            for n in snapshot.nodes
        }
        return machine

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClusterMachine):
            return NotImplemented
        return (self._config, self.snapshot()) == (other._config, other.snapshot())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        alive = sum(rec.alive for rec in self._nodes.values())
        return (
            f"<ClusterMachine state={self._state.name} nodes={len(self._nodes)}/{self._server_num} "
            f"alive={alive}>"
        )

    # ------------------------------------------------------------------------------------ events

    def handle(self, event: Event) -> Outcome:
        """Apply one event; return the reply to its sender and the instructions, in order.

        Only :class:`RegisterNode` has a reply (:class:`AcceptRegistration` or
        :class:`RefuseRegistration`); every other outcome's reply is None.

        Raises:
            IllegalEvent: the event is not legal now; the machine is unchanged.
        """
        if self._state is ClusterState.CLUSTER_EXIT:
            raise IllegalEvent(f"the cluster has exited; event {type(event).__name__} is not accepted")
        match event:
            case RegisterNode():
                return self._register(event)
            case Heartbeat():
                return Outcome(None, tuple(self._heartbeat(event)))
            case LivenessCheck():
                return Outcome(None, tuple(self._liveness_check(event)))
            case StartupDeadlinePassed():
                return Outcome(None, tuple(self._startup_deadline(event)))
            case BeginShutdown():
                return Outcome(None, tuple(self._begin_shutdown(event)))
            case NodeFinished():
                return Outcome(None, tuple(self._node_finished(event)))
            case ShutdownDeadlinePassed():
                return Outcome(None, tuple(self._shutdown_deadline(event)))
            case ScaleOutRequested():
                return self._scale_out(event)
            case ScaleInRequested():
                return self._scale_in(event)
            case ScaleOutRollbackRequested():
                return self._rollback_requested(event)
            case BarrierReached():
                return Outcome(None, tuple(self._barrier_reached(event)))
            case ScalingDeadlinePassed():
                return Outcome(None, tuple(self._scaling_deadline(event)))
            case DisableFLSRequested():
                return self._disable(event)
            case EnableFLSRequested():
                return self._enable(event)
            case NewInstanceStarted():
                return self._new_instance(event)
            case InstanceOperationEnded():
                return Outcome(None, tuple(self._operation_ended(event)))
            case _:
                assert_never(event)

    def _register(self, event: RegisterNode) -> Outcome:
        info = event.info
        refusal = self._registration_refusal(event)
        if refusal is not None:
            return Outcome(RefuseRegistration(event.cause, info.node_id, refusal))
        if self._fl_iteration_num is None:
            self._fl_iteration_num = event.fl_iteration_num
        known = self._nodes.get(info.node_id)
        revived = known is not None and not known.alive
        out: list[Instruction] = []
        if known is not None:
            # A known node id gets its old rank back (spec: "Ranks"): a restart, a reconnect.
            known.info = info
            known.last_heartbeat_ms = event.now_ms
            known.finished = False
            if not known.alive:
                known.alive = True
                out.append(NodeLivenessChanged(event.cause, info.node_id, True))
            rank = known.rank
        else:
            rank = len(self._nodes)
            self._nodes[info.node_id] = _Node(info=info, rank=rank, last_heartbeat_ms=event.now_ms)
            if self._scaling is not None:
                # Only a scale-out takes new node ids (a scale-in's total is below the nodes held).
                self._scaling = attrs.evolve(self._scaling, joined=(*self._scaling.joined, info.node_id))
        completion = self._complete_scaling(event.cause, event.now_ms)
        if completion:
            out.extend(completion)
        elif len(self._nodes) == self._server_num or revived or self._scaling is not None:
            reason = f"node {info.node_id!r} registered again" if revived else "every Server has registered"
            out.extend(self._settle_state(event.cause, reason))
            out.append(self._membership(event.cause))
        return Outcome(AcceptRegistration(event.cause, info.node_id, rank), tuple(out))

    def _registration_refusal(self, event: RegisterNode) -> str | None:
        info = event.info
        if self._shutting_down:
            return f"The cluster is finishing; node {info.node_id!r} cannot register now."
        if info.role is not Role.SERVER:
            return (
                f"Node {info.node_id!r} registers as {info.role.value}, but this cluster has no Workers "
                "(cross-device FL, worker_num=0); only SERVER nodes may register."
            )
        if info.node_id not in self._nodes and event.server_num != self._server_num:
            # A known node id is not held to the total: scaling changes it, the membership tells it.
            return (
                f"Node {info.node_id!r} was started with server_num={event.server_num!r}, but the Scheduler "
                f"expects server_num={self._server_num!r}; every process must be started with the "
                "same --server_num."
            )
        if self._fl_iteration_num is not None and event.fl_iteration_num != self._fl_iteration_num:
            return (
                f"Node {info.node_id!r} was started with fl_iteration_num={event.fl_iteration_num!r}, but "
                f"the Servers already registered use fl_iteration_num={self._fl_iteration_num!r}; every "
                "Server must be started with the same --fl_iteration_num."
            )
        holder = self._nodes.get(info.node_id)
        if (
            holder is not None
            and event.holder_connected
            and holder.alive
            and event.now_ms < holder.last_heartbeat_ms + self._config.heartbeat_timeout_ms
            and (holder.info.pid, holder.info.host) != (info.pid, info.host)
        ):
            # One identity, one process (spec/recovery.md §6): the same process reconnecting (same pid
            # and host) takes its id back; another process waits until the holder's link is closed.
            return (
                f"Node id {info.node_id!r} is held by a live Server at {holder.info.host}:{holder.info.port} "
                f"(pid {holder.info.pid}); this process (pid {info.pid} on {info.host}) cannot take it "
                "while that one is connected and heartbeating: stop it first, or give this Server its "
                "own MS_NODE_ID."
            )
        if info.node_id not in self._nodes and len(self._nodes) >= self._server_num:
            return (
                f"Node {info.node_id!r} is refused: all server_num={self._server_num!r} Servers have "
                "already registered (node ids: "
                f"{', '.join(repr(n) for n in self._nodes)}); a Server must use a unique MS_NODE_ID."
            )
        return None

    def _heartbeat(self, event: Heartbeat) -> list[Instruction]:
        rec = self._nodes.get(event.node_id)
        if rec is None:
            raise IllegalEvent(f"heartbeat from node {event.node_id!r}, which has not registered")
        rec.last_heartbeat_ms = max(rec.last_heartbeat_ms, event.now_ms)
        if rec.alive:
            return []
        rec.alive = True
        out: list[Instruction] = [NodeLivenessChanged(event.cause, event.node_id, True)]
        out.extend(self._settle_state(event.cause, f"node {event.node_id!r} is alive again"))
        out.append(self._membership(event.cause))
        return out

    def _liveness_check(self, event: LivenessCheck) -> list[Instruction]:
        silent: list[str] = []
        for node_id, rec in self._nodes.items():
            if rec.alive and event.now_ms >= rec.last_heartbeat_ms + self._config.heartbeat_timeout_ms:
                rec.alive = False
                silent.append(node_id)
        if not silent:
            return []
        out: list[Instruction] = [NodeLivenessChanged(event.cause, node_id, False) for node_id in silent]
        out.extend(self._settle_state(event.cause, f"no heartbeat from {', '.join(map(repr, silent))}"))
        out.append(self._membership(event.cause))
        return out

    def _startup_deadline(self, event: StartupDeadlinePassed) -> list[Instruction]:
        if self._ever_ready:
            return []
        reason = (
            f"only {len(self._nodes)} of server_num={self._server_num} Servers registered within "
            "cluster_available_timeout"
        )
        return self._exit(event.cause, reason)

    def _begin_shutdown(self, event: BeginShutdown) -> list[Instruction]:
        if self._shutting_down:
            return []
        self._shutting_down = True
        pending = tuple(n for n, rec in self._nodes.items() if rec.alive and not rec.finished)
        if not pending:
            return self._exit(event.cause, "finish requested and no node is running")
        return [SendShutdown(event.cause, pending)]

    def _node_finished(self, event: NodeFinished) -> list[Instruction]:
        rec = self._nodes.get(event.node_id)
        if rec is None:
            raise IllegalEvent(f"node {event.node_id!r} reports finishing, but it has not registered")
        rec.finished = True
        if not self._shutting_down:
            # A node that finishes on its own (its job is done) counts as finished; the cluster exits
            # when every node has (reference §3.7, EXIT).
            if all(r.finished for r in self._nodes.values()) and len(self._nodes) == self._server_num:
                return self._exit(event.cause, "every node has finished")
            return []
        if all(r.finished or not r.alive for r in self._nodes.values()):
            return self._exit(event.cause, "every node has finished")
        return []

    def _shutdown_deadline(self, event: ShutdownDeadlinePassed) -> list[Instruction]:
        if not self._shutting_down:
            raise IllegalEvent("shutdown deadline passed, but no shutdown was requested")
        return self._exit(event.cause, "finish deadline passed")

    # ------------------------------------------------------------------------------------ helpers

    def _exit(self, cause: str, reason: str) -> list[Instruction]:
        unfinished = tuple(n for n, rec in self._nodes.items() if not rec.finished)
        old, self._state = self._state, ClusterState.CLUSTER_EXIT
        self._scaling = self._operation = None
        return [StateChanged(cause, old, self._state, reason), ExitCluster(cause, reason, unfinished)]

    def _settle_state(self, cause: str, reason: str) -> list[Instruction]:
        """Set the state derived from membership, liveness and the operator's flags (spec "Cluster")."""
        new = _derived_state(
            complete=len(self._nodes) == self._server_num,
            all_alive=all(rec.alive for rec in self._nodes.values()),
            ever_ready=self._ever_ready,
            scaling=self._scaling,
            operation=self._operation,
            disabled=self._disabled,
        )
        if new is ClusterState.CLUSTER_READY:
            self._ever_ready = True
        if new is self._state:
            return []
        old, self._state = self._state, new
        return [StateChanged(cause, old, new, reason)]

    # ------------------------------------------------------------------ scaling (spec "Scaling")

    def _refused(self, cause: str, message: str) -> Outcome:
        return Outcome(OperatorReply(cause, False, message))

    def _scale_out(self, event: ScaleOutRequested) -> Outcome:
        total = self._server_num + event.server_num
        refusal = self.ready_refusal(event.connected)
        if refusal is None and event.server_num == 0:
            refusal = message_zero_scale_out()
        if refusal is None and total > MAX_SERVER_NUM:
            refusal = message_too_many_servers(total)
        if refusal is not None:
            return self._refused(event.cause, refusal)
        old = self._server_num
        self._scaling = Scaling(
            kind=ScaleKind.OUT,
            old_server_num=old,
            new_server_num=total,
            started_at_ms=event.now_ms,
            deadline_ms=event.now_ms + self._config.scaling_timeout_ms,
        )
        self._server_num = total
        out = self._settle_state(event.cause, f"scale out from {old} to {total} Servers requested")
        out.append(self._membership(event.cause))
        return Outcome(OperatorReply(event.cause, True, MESSAGE_SCALE_OUT), tuple(out))

    def _scale_in(self, event: ScaleInRequested) -> Outcome:
        refusal = self.ready_refusal(event.connected)
        if refusal is None and not event.node_ids:
            refusal = MESSAGE_NODE_IDS_EMPTY
        for node_id in event.node_ids if refusal is None else ():
            rec = self._nodes.get(node_id)
            if rec is None:
                refusal = message_illegal_node_id(node_id)
            elif rec.rank == 0:
                refusal = message_rank_zero(node_id)
            if refusal is not None:
                break
        if refusal is not None:
            return self._refused(event.cause, refusal)
        removed = tuple(dict.fromkeys(event.node_ids))
        old = self._server_num
        self._scaling = Scaling(
            kind=ScaleKind.IN,
            old_server_num=old,
            new_server_num=old - len(removed),
            removed=removed,
            started_at_ms=event.now_ms,
            deadline_ms=event.now_ms + self._config.scaling_timeout_ms,
        )
        self._server_num = old - len(removed)
        out = self._settle_state(
            event.cause,
            f"scale in of {', '.join(map(repr, removed))} ({old} to {self._server_num}) requested",
        )
        out.append(self._membership(event.cause))
        return Outcome(OperatorReply(event.cause, True, MESSAGE_SCALE_IN), tuple(out))

    def _rollback_requested(self, event: ScaleOutRollbackRequested) -> Outcome:
        scaling = self._scaling
        if scaling is None or scaling.kind is not ScaleKind.OUT:
            return self._refused(event.cause, MESSAGE_NOT_SCALING_OUT)
        if not scaling.barrier:
            return self._refused(event.cause, MESSAGE_NOT_READY_FOR_ROLLBACK)
        out = self._roll_back(event.cause, event.now_ms, "the operator asked for /scaleoutRollback")
        return Outcome(OperatorReply(event.cause, True, MESSAGE_ROLLED_BACK), tuple(out))

    def _barrier_reached(self, event: BarrierReached) -> list[Instruction]:
        if self._scaling is None:
            return []  # stale: the scaling ended (a rollback) before the report arrived
        leader = self.leader_id()
        if event.node_id != leader:
            raise IllegalEvent(
                f"node {event.node_id!r} reports the scaling barrier, but only the leader (rank 0, node "
                f"{leader!r}) holds the iteration"
            )
        if self._scaling.barrier:
            return []
        self._scaling = attrs.evolve(self._scaling, barrier=True)
        return self._complete_scaling(event.cause, event.now_ms)

    def _scaling_deadline(self, event: ScalingDeadlinePassed) -> list[Instruction]:
        scaling = self._scaling
        if scaling is None or event.now_ms < scaling.deadline_ms:
            return []  # stale: it completed, or the clock has not come yet
        missing = []
        if not scaling.barrier:
            missing.append("the leader's iteration did not come to rest (barrier not reached)")
        if scaling.kind is ScaleKind.OUT and len(self._nodes) < scaling.new_server_num:
            missing.append(
                f"{len(self._nodes) - scaling.old_server_num} of "
                f"{scaling.new_server_num - scaling.old_server_num} new Servers registered"
            )
        took = self._config.scaling_timeout_ms
        return self._roll_back(
            event.cause, event.now_ms, f"scaling_timeout ({took} ms) passed: {'; '.join(missing)}"
        )

    def _complete_scaling(self, cause: str, now_ms: int) -> list[Instruction]:
        """Finish the scaling if it can be finished now (spec "Scaling": Complete); else nothing."""
        scaling = self._scaling
        if scaling is None or not scaling.barrier:
            return []
        if scaling.kind is ScaleKind.OUT and len(self._nodes) != scaling.new_server_num:
            return []
        released: tuple[str, ...] = ()
        if scaling.kind is ScaleKind.IN:
            released = scaling.removed
            for node_id in released:
                del self._nodes[node_id]
            for rank, rec in enumerate(self._nodes.values()):  # rank order: ranks compacted
                rec.rank = rank
        self._scaling = None
        reason = f"scale {scaling.kind.value} to {self._server_num} Servers completed"
        out = self._settle_state(cause, reason)
        out.append(self._membership(cause))
        if released:
            out.append(ReleaseNodes(cause, released, "scaled in"))
        out.append(
            ScalingEnded(
                cause,
                scaling.kind,
                True,
                scaling.old_server_num,
                self._server_num,
                max(now_ms - scaling.started_at_ms, 0),
                reason,
            )
        )
        return out

    def _roll_back(self, cause: str, now_ms: int, why: str) -> list[Instruction]:
        scaling = self._scaling
        assert scaling is not None
        self._server_num = scaling.old_server_num
        if scaling.kind is ScaleKind.OUT:
            for node_id in scaling.joined:
                del self._nodes[node_id]  # the last ranks: the others keep 0..old-1
        self._scaling = None
        reason = f"scale {scaling.kind.value} rolled back to {self._server_num} Servers: {why}"
        out = self._settle_state(cause, reason)
        out.append(self._membership(cause))
        if scaling.kind is ScaleKind.OUT and scaling.joined:
            out.append(ReleaseNodes(cause, scaling.joined, "the scale-out they joined was rolled back"))
        out.append(
            ScalingEnded(
                cause,
                scaling.kind,
                False,
                scaling.old_server_num,
                self._server_num,
                max(now_ms - scaling.started_at_ms, 0),
                reason,
            )
        )
        return out

    # ----------------------------------------------------------------------- instance operations

    def _disable(self, event: DisableFLSRequested) -> Outcome:
        if self._disabled:
            return self._refused(event.cause, MESSAGE_ALREADY_DISABLED)
        refusal = self.ready_refusal(event.connected)
        if refusal is not None:
            return self._refused(event.cause, refusal)
        self._disabled = True
        out = self._settle_state(event.cause, "the operator disabled the instance (/disableFLS)")
        out.append(self._membership(event.cause))
        return Outcome(OperatorReply(event.cause, True, MESSAGE_DISABLED), tuple(out))

    def _enable(self, event: EnableFLSRequested) -> Outcome:
        if self._state is not ClusterState.CLUSTER_DISABLE_FLS or self._shutting_down:
            return self._refused(event.cause, MESSAGE_NOT_DISABLED)
        self._disabled = False
        self._operation = Operation.ENABLE_FLS
        out = self._settle_state(event.cause, "the operator enables the instance (/enableFLS)")
        out.append(self._membership(event.cause))
        return Outcome(OperatorReply(event.cause, True, MESSAGE_ENABLED), tuple(out))

    def _new_instance(self, event: NewInstanceStarted) -> Outcome:
        refusal = self.ready_refusal(event.connected, disabled_too=True)
        if refusal is not None:
            return self._refused(event.cause, refusal)
        self._operation = Operation.NEW_INSTANCE
        out = self._settle_state(event.cause, "the operator asks for a new instance (/newInstance)")
        out.append(self._membership(event.cause))
        return Outcome(OperatorReply(event.cause, True, ""), tuple(out))

    def _operation_ended(self, event: InstanceOperationEnded) -> list[Instruction]:
        if self._operation is None:
            raise IllegalEvent("an instance operation ended, but none is in progress")
        what = self._operation.value
        self._operation = None
        self._disabled = event.disabled
        out = self._settle_state(event.cause, f"the instance operation {what!r} ended")
        out.append(self._membership(event.cause))
        return out

    def _membership(self, cause: str) -> SendMembership:
        return SendMembership(cause, self._state, self.members())


#: The states this machine never enters (a restarted Scheduler is READY or STARTING at once; a rollback is
#: immediate, spec "Cluster").
_NEVER = frozenset({ClusterState.CLUSTER_SCHEDULER_RECOVERY, ClusterState.CLUSTER_SCALE_OUT_ROLLBACK})


def _derived_state(
    *,
    complete: bool,
    all_alive: bool,
    ever_ready: bool,
    scaling: Scaling | None,
    operation: Operation | None,
    disabled: bool,
) -> ClusterState:
    """The state the membership, the liveness and the operator's flags give, in the spec's order."""
    if scaling is not None:
        return (
            ClusterState.CLUSTER_SCALE_OUT if scaling.kind is ScaleKind.OUT else ClusterState.CLUSTER_SCALE_IN
        )
    if operation is Operation.NEW_INSTANCE:
        return ClusterState.CLUSTER_NEW_INSTANCE
    if operation is Operation.ENABLE_FLS:
        return ClusterState.CLUSTER_ENABLE_FLS
    if disabled:
        return ClusterState.CLUSTER_DISABLE_FLS
    if not all_alive:
        return ClusterState.NODE_TIMEOUT
    if complete or ever_ready:
        return ClusterState.CLUSTER_READY
    return ClusterState.CLUSTER_STARTING


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_snapshot(s: ClusterSnapshot) -> None:
    """Refuse a snapshot that no run of the machine can produce (spec "Cluster", "Snapshot")."""
    problems: list[str] = []

    def rule(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    rule(_is_int(s.server_num) and s.server_num >= 1, f"server_num must be an int >= 1, got {s.server_num!r}")
    n = len(s.nodes)
    sc = s.scaling
    most = s.server_num if sc is None or sc.kind is ScaleKind.OUT else sc.old_server_num
    rule(n <= most, f"{n} nodes are registered, more than server_num={most!r}")
    ranks = [node.rank for node in s.nodes]
    rule(ranks == list(range(n)), f"the nodes' ranks must be 0..{n - 1} in order, got {ranks!r}")
    node_ids = [node.info.node_id for node in s.nodes]
    rule(len(set(node_ids)) == n, f"a node id is registered twice: {node_ids!r}")
    for node in s.nodes:
        rule(
            node.info.role is Role.SERVER,
            f"node {node.info.node_id!r} has role {node.info.role.value!r}, but only SERVER nodes register",
        )
        rule(
            _is_int(node.last_heartbeat_ms) and node.last_heartbeat_ms >= 0,
            f"node {node.info.node_id!r} has last_heartbeat_ms {node.last_heartbeat_ms!r}, "
            "expected epoch milliseconds (an int >= 0)",
        )
    rule(
        (s.fl_iteration_num is None) == (n == 0),
        f"fl_iteration_num is {s.fl_iteration_num!r} with {n} nodes registered; it is fixed by the "
        "first accepted registration, so it is None exactly when no node is registered",
    )
    rule(s.state not in _NEVER, f"state {s.state.name} is not one this machine enters")
    settled_total = (
        s.server_num
        if sc is None
        else (sc.old_server_num + len(sc.joined) if sc.kind is ScaleKind.OUT else sc.old_server_num)
    )
    rule(
        not s.ever_ready or n == settled_total,
        f"the cluster was ready once, so all server_num={settled_total!r} Servers registered, got {n}",
    )
    if sc is not None:
        _check_scaling(s, sc, rule)
    rule(
        (sc is None and s.operation is None and not s.disabled) or s.ever_ready,
        "scaling, a disabled instance or an instance operation need a cluster that was ready once",
    )
    rule(
        s.operation is not Operation.ENABLE_FLS or not s.disabled,
        "an enable in progress has already cleared the disabled flag",
    )
    rule(sc is None or (s.operation is None and not s.disabled), "a scaling starts only from CLUSTER_READY")
    if s.state is not ClusterState.CLUSTER_EXIT:
        some_dead = not all(node.alive for node in s.nodes)
        derived = _derived_state(
            complete=n == s.server_num,
            all_alive=not some_dead,
            ever_ready=s.ever_ready,
            scaling=sc,
            operation=s.operation,
            disabled=s.disabled,
        )
        if s.state is not derived:
            if ClusterState.NODE_TIMEOUT in (s.state, derived):
                problems.append(
                    f"state {s.state.name} does not fit the liveness of the nodes "
                    "(NODE_TIMEOUT exactly while some node is not alive)"
                )
            elif s.state is ClusterState.CLUSTER_STARTING and s.ever_ready:
                problems.append(
                    "state CLUSTER_STARTING, but the cluster was ready once (it never goes back to starting)"
                )
            elif s.state is ClusterState.CLUSTER_READY and not s.ever_ready:
                problems.append("state CLUSTER_READY, but ever_ready is False")
            else:
                problems.append(
                    f"state {s.state.name} does not fit the snapshot, which gives {derived.name} "
                    f"(scaling {sc!r}, operation {s.operation!r}, disabled {s.disabled!r})"
                )
    if problems:
        raise ValueError("refused cluster snapshot: " + "; ".join(problems))


def _check_scaling(s: ClusterSnapshot, sc: Scaling, rule: Callable[[bool, str], None]) -> None:
    """A scaling record must fit the nodes it is about (spec "Snapshot")."""
    ids = [node.info.node_id for node in s.nodes]
    rule(
        sc.new_server_num == s.server_num,
        f"scaling {sc!r} makes {sc.new_server_num}, but server_num is {s.server_num}",
    )
    rule(sc.deadline_ms >= sc.started_at_ms, f"scaling {sc!r} has its deadline before its start")
    if sc.kind is ScaleKind.OUT:
        rule(
            sc.new_server_num > sc.old_server_num and not sc.removed,
            f"a scale-out adds Servers and removes none: {sc!r}",
        )
        rule(
            list(sc.joined) == ids[sc.old_server_num :] and len(ids) == sc.old_server_num + len(sc.joined),
            f"the Servers that joined the scale-out {sc.joined!r} must be the nodes after rank "
            f"{sc.old_server_num - 1}, got {ids!r}",
        )
    else:
        rule(
            not sc.joined
            and 1 <= len(sc.removed) < sc.old_server_num
            and len(set(sc.removed)) == len(sc.removed)
            and sc.new_server_num == sc.old_server_num - len(sc.removed),
            f"a scale-in removes distinct Servers, fewer than it has, and joins none: {sc!r}",
        )
        rule(
            n_ok := len(ids) == sc.old_server_num,
            f"a scale-in holds its {sc.old_server_num} nodes, got {len(ids)}",
        )
        if n_ok:
            rule(
                set(sc.removed) <= set(ids) and ids[0] not in sc.removed,
                f"a scale-in removes members other than rank 0: {sc.removed!r} of {ids!r}",
            )
