"""The operator's records of the cluster machine: scaling and instance operations (spec/state-machines.md,
"Scaling").

Theory of operation
-------------------
:class:`~flcluster.core.cluster.ClusterMachine` takes the management API's requests as events
(:class:`ScaleOutRequested`, :class:`ScaleInRequested`, :class:`ScaleOutRollbackRequested`,
:class:`DisableFLSRequested`, :class:`EnableFLSRequested`, :class:`NewInstanceStarted`,
:class:`InstanceOperationEnded`) and the leader's report that its iteration is at rest
(:class:`BarrierReached`); the driver feeds :class:`ScalingDeadlinePassed` when the machine's scaling
deadline has come. Every operator event is answered with an :class:`OperatorReply` carrying the
management API's exact message (spec/management-api.md), so the HTTP edge only maps ``ok`` to a status.

A scaling in progress is one :class:`Scaling` record in the machine's snapshot: the old and new totals,
the node ids it removes (scale-in) or that joined for it (scale-out), its deadline and whether the
leader reached the barrier. The machine completes it (:class:`ScalingEnded` with ``completed=True``) or
rolls it back (``completed=False``), and tells the driver which nodes leave the membership
(:class:`ReleaseNodes`).

This module holds the records only (frozen attrs, validated); the rules are the machine's. It imports
nothing but attrs, so both the machine and the wire layer can use it.
"""

from __future__ import annotations

import enum
from typing import final

import attrs

__all__ = [
    "MAX_SERVER_NUM",
    "MESSAGE_ALREADY_DISABLED",
    "MESSAGE_DISABLED",
    "MESSAGE_ENABLED",
    "MESSAGE_NODE_IDS_EMPTY",
    "MESSAGE_NOT_CONNECTED",
    "MESSAGE_NOT_DISABLED",
    "MESSAGE_NOT_READY",
    "MESSAGE_NOT_READY_FOR_ROLLBACK",
    "MESSAGE_NOT_SCALING_OUT",
    "MESSAGE_ROLLED_BACK",
    "MESSAGE_SCALE_IN",
    "MESSAGE_SCALE_OUT",
    "BarrierReached",
    "DisableFLSRequested",
    "EnableFLSRequested",
    "InstanceOperationEnded",
    "InstanceResult",
    "NewInstanceStarted",
    "Operation",
    "OperatorReply",
    "ReleaseNodes",
    "ScaleInRequested",
    "ScaleKind",
    "ScaleOutRequested",
    "ScaleOutRollbackRequested",
    "Scaling",
    "ScalingDeadlinePassed",
    "ScalingEnded",
    "message_illegal_node_id",
    "message_rank_zero",
    "message_too_many_servers",
    "message_zero_scale_out",
]

#: The most Servers a cluster may have (the ranks' and the device ports' range).
MAX_SERVER_NUM = 65535

# The original's answers (reference §4), spelled as it spells them.
MESSAGE_SCALE_OUT = "Cluster begin to scale out."
MESSAGE_SCALE_IN = "Cluster begin to scale in."
MESSAGE_ROLLED_BACK = "Cluster scale out rollback success."
MESSAGE_NOT_READY = "The cluster is not ready."
MESSAGE_NOT_CONNECTED = (
    "The Scheduler's connections are not equal with total node num, Maybe this is because some server "
    "nodes are drop out or scale in nodes has not been recycled."
)
MESSAGE_NODE_IDS_EMPTY = "The node ids should not be empty."
MESSAGE_DISABLED = "start disabling FL-Server successful."
MESSAGE_ENABLED = "start enabling FL-Server successful."
MESSAGE_ALREADY_DISABLED = "The cluster state is already in CLUSTER_DISABLE_FLS."
MESSAGE_NOT_DISABLED = "The cluster state is not CLUSTER_DISABLE_FLS, does not need to enable fls."
# flcluster's own, where the original's exact text is not on record or the original has no rule.
MESSAGE_NOT_SCALING_OUT = "The cluster state is not CLUSTER_SCALE_OUT, there is no scale out to roll back."
MESSAGE_NOT_READY_FOR_ROLLBACK = "Cluster servers are not ready for scaling rollback, please retry later."


def message_illegal_node_id(node_id: str) -> str:
    """``/scalein`` names an id that is not a registered Server (the original's text)."""
    return f"The node id:{node_id} is illegal."


def message_rank_zero(node_id: str) -> str:
    """``/scalein`` names the leader (the original's text)."""
    return f"The node id:{node_id} is rank 0 of server, should not be scale in."


def message_zero_scale_out() -> str:
    """``/scaleout`` asks for no Server at all (flcluster's; the original starts an empty scaling)."""
    return "The server_num to scale out should be at least 1, got 0."


def message_too_many_servers(total: int) -> str:
    """``/scaleout`` would make more Servers than a cluster may have."""
    return f"The server_num to scale out makes {total} Servers; at most {MAX_SERVER_NUM} are supported."


def _epoch_ms(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{attribute.name} must be epoch milliseconds (an int >= 0), got {value!r}")


def _count(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{attribute.name} must be an int >= 0, got {value!r}")


def _ids(values: object) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, tuple | list):
        raise TypeError(f"node ids must be a list of str, got {values!r:.80}")
    if not all(isinstance(v, str) for v in values):
        raise TypeError(f"node ids must be str, got {values!r:.80}")
    return tuple(values)


class ScaleKind(enum.StrEnum):
    """Which way a scaling goes."""

    OUT = "out"
    IN = "in"


class Operation(enum.StrEnum):
    """A transient instance operation (the Scheduler asks the leader and waits for its answer)."""

    NEW_INSTANCE = "new_instance"
    ENABLE_FLS = "enable"


@final
@attrs.frozen(kw_only=True)
class Scaling:
    """A scaling in progress (part of :class:`~flcluster.core.cluster.ClusterSnapshot`).

    Attributes:
        kind: out or in.
        old_server_num: the total before the scaling (restored by a rollback).
        new_server_num: the total it makes.
        removed: the node ids a scale-in removes (in the order asked, repeats dropped).
        joined: the node ids that registered for a scale-out, in order of arrival.
        started_at_ms: when it was accepted (epoch ms).
        deadline_ms: when it rolls back unless complete (``started_at_ms + scaling_timeout_ms``).
        barrier: whether the leader reported its iteration at rest.
    """

    kind: ScaleKind = attrs.field(converter=ScaleKind)
    old_server_num: int = attrs.field(validator=_count)
    new_server_num: int = attrs.field(validator=_count)
    removed: tuple[str, ...] = attrs.field(default=(), converter=_ids)
    joined: tuple[str, ...] = attrs.field(default=(), converter=_ids)
    started_at_ms: int = attrs.field(default=0, validator=_epoch_ms)
    deadline_ms: int = attrs.field(default=0, validator=_epoch_ms)
    barrier: bool = False


# ---------------------------------------------------------------------------------------- events


@final
@attrs.frozen
class ScaleOutRequested:
    """``/scaleout``: add ``server_num`` Servers (an increment).

    Attributes:
        connected: registered Servers the driver holds an open link for (the original's connection check).
    """

    cause: str
    server_num: int = attrs.field(validator=_count)
    connected: int = attrs.field(validator=_count)
    now_ms: int = attrs.field(validator=_epoch_ms)


@final
@attrs.frozen
class ScaleInRequested:
    """``/scalein``: remove the Servers ``node_ids``."""

    cause: str
    node_ids: tuple[str, ...] = attrs.field(converter=_ids)
    connected: int = attrs.field(validator=_count)
    now_ms: int = attrs.field(validator=_epoch_ms)


@final
@attrs.frozen
class ScaleOutRollbackRequested:
    """``/scaleoutRollback``: undo the scale-out in progress."""

    cause: str
    now_ms: int = attrs.field(validator=_epoch_ms)


@final
@attrs.frozen
class BarrierReached:
    """The leader (rank 0) reports its iteration at rest: it holds at ``iteration``."""

    cause: str
    node_id: str
    iteration: int = attrs.field(validator=_count)
    now_ms: int = attrs.field(validator=_epoch_ms)


@final
@attrs.frozen
class ScalingDeadlinePassed:
    """The driver's clock reached the scaling deadline (or any later time)."""

    cause: str
    now_ms: int = attrs.field(validator=_epoch_ms)


@final
@attrs.frozen
class DisableFLSRequested:
    """``/disableFLS``."""

    cause: str
    connected: int = attrs.field(validator=_count)


@final
@attrs.frozen
class EnableFLSRequested:
    """``/enableFLS``."""

    cause: str
    connected: int = attrs.field(validator=_count)


@final
@attrs.frozen
class NewInstanceStarted:
    """``/newInstance``: the Scheduler is about to ask the leader (the state is NEW_INSTANCE meanwhile)."""

    cause: str
    connected: int = attrs.field(validator=_count)


@final
@attrs.frozen
class InstanceOperationEnded:
    """The leader answered (or did not, in time) the transient operation; ``disabled``: its instance is
    disabled now (for a timeout: the cluster's flag as it was)."""

    cause: str
    disabled: bool


# --------------------------------------------------------------------------- replies, instructions


@final
@attrs.frozen
class OperatorReply:
    """The answer to an operator event: accepted (``ok``) or refused, with the management API's message."""

    cause: str
    ok: bool
    message: str


@final
@attrs.frozen
class ReleaseNodes:
    """These nodes left the membership (scaled in, or joined a scale-out that rolled back): send them the
    final membership (they are absent from it), then close their links."""

    cause: str
    node_ids: tuple[str, ...]
    reason: str


@final
@attrs.frozen
class ScalingEnded:
    """A scaling completed (``completed``) or rolled back (``reason`` says why) ``took_ms`` after it began.

    ``old_server_num`` is the total before it, ``new_server_num`` the total in force after it.
    """

    cause: str
    kind: ScaleKind
    completed: bool
    old_server_num: int
    new_server_num: int
    took_ms: int
    reason: str


@final
@attrs.frozen
class InstanceResult:
    """How an instance operation ended at the leader, for the management API (the driver builds it).

    Attributes:
        answered: the leader answered in time (else the operation timed out).
        ok: the leader did what was asked.
        message: the leader's message (why not, when not ``ok``).
        result: the leader's result (``/queryInstance``'s values), a JSON object.
    """

    answered: bool
    ok: bool = False
    message: str = ""
    result: dict[str, object] = attrs.Factory(dict)
