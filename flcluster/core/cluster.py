"""The Scheduler's cluster rules as a sans-IO state machine (spec/state-machines.md, "Cluster").

Theory of operation
-------------------
The Scheduler knows *who* is in the cluster and *whether they are alive*; it is not on the data path.
This module holds those rules and nothing else: it never touches a socket, a clock or a file. The trio
driver (:mod:`flcluster.runtime.scheduler`) turns what happens on the network and on its clock into
:data:`Event` records, calls :meth:`ClusterMachine.handle`, and carries out the :data:`Instruction`
records it gets back (reply to a registration, send the membership, log a state change, exit).

Identity and rank are kept apart on purpose: a node is known by its ``node_id`` (``MS_NODE_ID``), which
survives restarts, and it is *given* a rank. Ranks 0..N-1 are handed out in order of arrival; a node id
that registered before gets its old rank back. This is what lets a restarted node rejoin as itself, and
what scaling (which renumbers ranks) will change later without touching identity.

Time enters only through events: every event that depends on time carries ``now`` (seconds on the
driver's clock). A node is alive while ``now < last_heartbeat + heartbeat_timeout``; the driver asks
:meth:`ClusterMachine.next_liveness_deadline` when to come back and feeds :class:`LivenessCheck` then,
so a silent node becomes ``alive: false`` at exactly the timeout.

Illegal events raise :class:`~flcluster.errors.IllegalEvent` and change nothing (the h11 rule); a
registration that breaks a consistency rule is *not* illegal: it is refused with a reason, which the
driver sends back to that node.
"""

from __future__ import annotations

import enum
import math
from typing import assert_never

import attrs

from flcluster.errors import IllegalEvent


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
    role: Role
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


@attrs.frozen
class RegisterNode:
    """A node asks to join (or rejoin) the cluster."""

    cause: str
    info: NodeInfo
    server_num: int
    fl_iteration_num: int
    recovering: bool
    now: float


@attrs.frozen
class Heartbeat:
    """A heartbeat arrived from a registered node."""

    cause: str
    node_id: str
    now: float


@attrs.frozen
class LivenessCheck:
    """The driver's clock reached a liveness deadline (or any later time)."""

    cause: str
    now: float


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
)

# ---------------------------------------------------------------------------------------- instructions


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
    AcceptRegistration
    | RefuseRegistration
    | SendMembership
    | StateChanged
    | NodeLivenessChanged
    | SendShutdown
    | ExitCluster
)

# ----------------------------------------------------------------------------------------------- state


@attrs.define
class _NodeRecord:
    info: NodeInfo
    rank: int
    last_heartbeat: float
    alive: bool = True
    finished: bool = False


@attrs.frozen
class ClusterConfig:
    """The numbers the Scheduler holds every registration against.

    Attributes:
        server_num: How many Servers make up the cluster (``--server_num``).
        heartbeat_timeout: Seconds without a heartbeat before a node is not alive.
    """

    server_num: int = attrs.field(validator=attrs.validators.ge(1))
    heartbeat_timeout: float = attrs.field(validator=attrs.validators.gt(0))


class ClusterMachine:
    """Membership, ranks, liveness and cluster state of one Scheduler.

    Feed it events with :meth:`handle`; carry out the instructions it returns, in order.
    """

    def __init__(self, config: ClusterConfig) -> None:
        self._config = config
        self._nodes: dict[str, _NodeRecord] = {}
        self._state = ClusterState.CLUSTER_STARTING
        self._fl_iteration_num: int | None = None
        self._ever_ready = False
        self._shutting_down = False

    # ------------------------------------------------------------------------------------ queries

    @property
    def config(self) -> ClusterConfig:
        """The numbers this machine holds registrations against."""
        return self._config

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

    def next_liveness_deadline(self) -> float:
        """The earliest time at which a live node would time out (``inf`` when there is none)."""
        deadlines = [
            rec.last_heartbeat + self._config.heartbeat_timeout for rec in self._nodes.values() if rec.alive
        ]
        return min(deadlines, default=math.inf)

    # ------------------------------------------------------------------------------------ events

    def handle(self, event: Event) -> list[Instruction]:
        """Apply one event and return what the driver must do, in order.

        Raises:
            IllegalEvent: the event is not legal now; the machine is unchanged.
        """
        if self._state is ClusterState.CLUSTER_EXIT:
            raise IllegalEvent(f"the cluster has exited; event {type(event).__name__} is not accepted")
        match event:
            case RegisterNode():
                return self._register(event)
            case Heartbeat():
                return self._heartbeat(event)
            case LivenessCheck():
                return self._liveness_check(event)
            case StartupDeadlinePassed():
                return self._startup_deadline(event)
            case BeginShutdown():
                return self._begin_shutdown(event)
            case NodeFinished():
                return self._node_finished(event)
            case ShutdownDeadlinePassed():
                return self._shutdown_deadline(event)
            case _:
                assert_never(event)

    def _register(self, event: RegisterNode) -> list[Instruction]:
        info = event.info
        refusal = self._registration_refusal(event)
        if refusal is not None:
            return [RefuseRegistration(event.cause, info.node_id, refusal)]
        if self._fl_iteration_num is None:
            self._fl_iteration_num = event.fl_iteration_num
        known = self._nodes.get(info.node_id)
        revived = known is not None and not known.alive
        out: list[Instruction] = []
        if known is not None:
            # A known node id gets its old rank back (spec: "Ranks"): a restart, a reconnect.
            known.info = info
            known.last_heartbeat = event.now
            known.finished = False
            if not known.alive:
                known.alive = True
                out.append(NodeLivenessChanged(event.cause, info.node_id, True))
            rank = known.rank
        else:
            rank = len(self._nodes)
            self._nodes[info.node_id] = _NodeRecord(info=info, rank=rank, last_heartbeat=event.now)
        out.append(AcceptRegistration(event.cause, info.node_id, rank))
        if len(self._nodes) == self._config.server_num or revived:
            reason = f"node {info.node_id!r} registered again" if revived else "every Server has registered"
            out.extend(self._settle_state(event.cause, reason))
            out.append(self._membership(event.cause))
        return out

    def _registration_refusal(self, event: RegisterNode) -> str | None:
        info = event.info
        if self._shutting_down:
            return f"The cluster is finishing; node {info.node_id!r} cannot register now."
        if info.role is not Role.SERVER:
            return (
                f"Node {info.node_id!r} registers as {info.role.value}, but this cluster has no Workers "
                "(cross-device FL, worker_num=0); only SERVER nodes may register."
            )
        if event.server_num != self._config.server_num:
            return (
                f"Node {info.node_id!r} was started with server_num={event.server_num!r}, but the Scheduler "
                f"expects server_num={self._config.server_num!r}; every process must be started with the "
                "same --server_num."
            )
        if self._fl_iteration_num is not None and event.fl_iteration_num != self._fl_iteration_num:
            return (
                f"Node {info.node_id!r} was started with fl_iteration_num={event.fl_iteration_num!r}, but "
                f"the Servers already registered use fl_iteration_num={self._fl_iteration_num!r}; every "
                "Server must be started with the same --fl_iteration_num."
            )
        if info.node_id not in self._nodes and len(self._nodes) >= self._config.server_num:
            return (
                f"Node {info.node_id!r} is refused: all server_num={self._config.server_num!r} Servers have "
                "already registered (node ids: "
                f"{', '.join(repr(n) for n in self._nodes)}); a Server must use a unique MS_NODE_ID."
            )
        return None

    def _heartbeat(self, event: Heartbeat) -> list[Instruction]:
        rec = self._nodes.get(event.node_id)
        if rec is None:
            raise IllegalEvent(f"heartbeat from node {event.node_id!r}, which has not registered")
        rec.last_heartbeat = max(rec.last_heartbeat, event.now)
        if rec.alive:
            return []
        rec.alive = True
        out: list[Instruction] = [NodeLivenessChanged(event.cause, event.node_id, True)]
        out.extend(self._settle_state(event.cause, f"node {event.node_id!r} is alive again"))
        out.append(self._membership(event.cause))
        return out

    def _liveness_check(self, event: LivenessCheck) -> list[Instruction]:
        out: list[Instruction] = []
        for node_id, rec in self._nodes.items():
            if rec.alive and event.now >= rec.last_heartbeat + self._config.heartbeat_timeout:
                rec.alive = False
                out.append(NodeLivenessChanged(event.cause, node_id, False))
        if not out:
            return out
        silent = ", ".join(repr(i.node_id) for i in out if isinstance(i, NodeLivenessChanged))
        out.extend(self._settle_state(event.cause, f"no heartbeat from {silent}"))
        out.append(self._membership(event.cause))
        return out

    def _startup_deadline(self, event: StartupDeadlinePassed) -> list[Instruction]:
        if self._ever_ready:
            return []
        reason = (
            f"only {len(self._nodes)} of server_num={self._config.server_num} Servers registered within "
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
            if all(r.finished for r in self._nodes.values()) and len(self._nodes) == self._config.server_num:
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
        return [StateChanged(cause, old, self._state, reason), ExitCluster(cause, reason, unfinished)]

    def _settle_state(self, cause: str, reason: str) -> list[Instruction]:
        """Derive READY / NODE_TIMEOUT / STARTING from membership and liveness."""
        complete = len(self._nodes) == self._config.server_num
        all_alive = all(rec.alive for rec in self._nodes.values())
        if not all_alive:
            new = ClusterState.NODE_TIMEOUT
        elif complete or self._ever_ready:
            new = ClusterState.CLUSTER_READY
        else:
            new = ClusterState.CLUSTER_STARTING
        if new is ClusterState.CLUSTER_READY:
            self._ever_ready = True
        if new is self._state:
            return []
        old, self._state = self._state, new
        return [StateChanged(cause, old, new, reason)]

    def _membership(self, cause: str) -> SendMembership:
        return SendMembership(cause, self._state, self.members())
