"""Typed cluster messages carried in frames (spec/cluster-protocol.md, "Messages").

Each message is a small frozen attrs record registered under its wire name. :func:`to_frame` turns one
into a frame header; :func:`from_frame` turns a received header back into a record, checking that every
field is present, of the declared type, and that there are no extra fields. A frame that fails these
checks raises :class:`~flcluster.errors.MessageError` and changes nothing: the receiver answers with
:class:`ErrorReply` (or drops the connection) and carries on.

Field types are limited to ``str``, ``int``, ``bool``, ``float``, enums (sent as their value; a value
that is not one of the enum's, or not of its type, is refused: ``1.0`` is not ``ClusterState.CLUSTER_READY``)
and tuples of a nested message record, which is all the
cluster protocol needs and keeps the checker small. What a field can only take from a closed set
(an operation, an answer's kind, a phase) is an enum, never a free string.
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Any, ClassVar, TypeVar

import attrs

from flcluster.core.cluster import ClusterState, Role
from flcluster.core.iteration import InstanceState, Phase
from flcluster.errors import MessageError
from flcluster.wire.codes import CipherRound
from flcluster.wire.frames import Frame

MAX_STRING = 4096
MAX_ITEMS = 100_000

M = TypeVar("M")
_REGISTRY: dict[str, type[Any]] = {}


def register(cls: type[M]) -> type[M]:
    """Class decorator: register an attrs message record under its wire name ``cls.TYPE``."""
    name: str = getattr(cls, "TYPE")  # noqa: B009 - TYPE is a ClassVar every message declares
    if name in _REGISTRY:
        raise RuntimeError(f"message type {name!r} registered twice")
    _REGISTRY[name] = cls
    return cls


# ------------------------------------------------------------------------------------- enums


class CountOp(enum.StrEnum):
    """The device request a :class:`LeaderCall` counts (the round's name on the device API)."""

    START_FL_JOB = "startFLJob"
    UPDATE_MODEL = "updateModel"


class InstanceOp(enum.StrEnum):
    """What an :class:`InstanceCall` asks the leader (spec/cluster-protocol.md §9)."""

    NEW_INSTANCE = "new_instance"
    QUERY_INSTANCE = "query_instance"
    ENABLE = "enable"
    DISABLE = "disable"


class AnswerKind(enum.StrEnum):
    """What a :class:`LeaderAnswer` carries: an acceptance, a rejection, or a plain-text body."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    PLAIN = "plain"


# ----------------------------------------------------------------------------------- records


@attrs.frozen
class MemberRecord:
    """A membership row on the wire (see :class:`flcluster.core.cluster.Member`)."""

    rank: int
    node_id: str
    host: str
    port: int
    device_port: int
    alive: bool


@attrs.frozen
class NodeProcess:
    """A node's process, as reported to ``flcluster finish``."""

    node_id: str
    role: Role
    host: str
    pid: int
    finished: bool


# -------------------------------------------------------------------- Server <-> Scheduler


@register
@attrs.frozen
class Register:
    """Server → Scheduler: join the cluster (first frame on a Server's Scheduler link)."""

    TYPE: ClassVar[str] = "register"
    node_id: str
    role: Role
    host: str
    port: int
    device_port: int
    pid: int
    server_num: int
    fl_iteration_num: int
    recovering: bool


@register
@attrs.frozen
class RegisterReply:
    """Scheduler → Server: accepted with ``rank``, or refused with ``reason``."""

    TYPE: ClassVar[str] = "register_reply"
    accepted: bool
    rank: int
    reason: str


@register
@attrs.frozen
class HeartbeatMsg:
    """Server → Scheduler: I am alive."""

    TYPE: ClassVar[str] = "heartbeat"
    node_id: str


@register
@attrs.frozen
class HeartbeatReply:
    """Scheduler → Server: the cluster state (sent as the original's number, reference §3.7)."""

    TYPE: ClassVar[str] = "heartbeat_reply"
    state: ClusterState


@register
@attrs.frozen
class Membership:
    """Scheduler → every Server: the cluster state and every member."""

    TYPE: ClassVar[str] = "membership"
    state: ClusterState
    members: tuple[MemberRecord, ...]


@register
@attrs.frozen
class Shutdown:
    """Scheduler → Server: stop serving, answer :class:`Finished`, exit."""

    TYPE: ClassVar[str] = "shutdown"
    reason: str


@register
@attrs.frozen
class Finished:
    """Server → Scheduler: I have stopped serving and am exiting."""

    TYPE: ClassVar[str] = "finished"
    node_id: str


@register
@attrs.frozen
class ScalingBarrier:
    """Leader → Scheduler: its iteration is at rest for the scaling in progress; it holds at ``iteration``."""

    TYPE: ClassVar[str] = "scaling_barrier"
    node_id: str
    iteration: int


@register
@attrs.frozen
class InstanceCall:
    """Scheduler → leader: an instance operation (``params``: a JSON object as text)."""

    TYPE: ClassVar[str] = "instance_call"
    call_id: int
    op: InstanceOp
    params: str


@register
@attrs.frozen
class InstanceAnswer:
    """Leader → Scheduler: the answer to :class:`InstanceCall` ``call_id`` (``result``: JSON object text)."""

    TYPE: ClassVar[str] = "instance_answer"
    call_id: int
    ok: bool
    message: str
    result: str


# --------------------------------------------------------------------- operator tool <-> Scheduler


@register
@attrs.frozen
class FinishCluster:
    """Operator tool → Scheduler: finish the whole cluster gracefully.

    ``token`` is the management access token (``""`` when the cluster has none; spec/management-api.md).
    """

    TYPE: ClassVar[str] = "finish_cluster"
    token: str = attrs.field(repr=False)


@register
@attrs.frozen
class FinishReply:
    """Scheduler → operator tool: every process of the cluster, and whether it finished."""

    TYPE: ClassVar[str] = "finish_reply"
    nodes: tuple[NodeProcess, ...]


# ---------------------------------------------------------------------------- Server <-> Server


@register
@attrs.frozen
class PeerHello:
    """Follower → leader: the first frame on a peer link."""

    TYPE: ClassVar[str] = "peer_hello"
    node_id: str
    rank: int


@register
@attrs.frozen
class PeerHelloReply:
    """Leader → follower: the link is open."""

    TYPE: ClassVar[str] = "peer_hello_reply"
    node_id: str
    rank: int


@register
@attrs.frozen
class PeerPing:
    """Either side of a peer link: keep-alive."""

    TYPE: ClassVar[str] = "peer_ping"
    seq: int


# ------------------------------------------------------------- iteration traffic on peer links
# spec/device-protocol.md "How the Servers share an iteration": followers forward the counting part of
# device requests to the leader (pipelined, matched by call_id); the leader pushes the iteration status,
# asks for partial sums and publishes models (raw little-endian float32 payload in model order).


@register
@attrs.frozen
class LeaderCall:
    """Follower → leader: the counting part of a device request."""

    TYPE: ClassVar[str] = "leader_call"
    call_id: int
    op: CountOp
    fl_id: str
    data_size: int
    iteration: int
    upload_loss: float
    upload_accuracy: float
    # pki_verify (spec/device-protocol.md "Client verification"); "" without it. Base64 for bytes.
    timestamp: str = ""
    signature: str = ""
    device_key: str = ""


@register
@attrs.frozen
class LeaderAnswer:
    """Leader → follower: the answer to :class:`LeaderCall` ``call_id``.

    ``kind`` is ``accepted``, ``rejected`` or ``plain`` (then ``text`` is the body to send).
    """

    TYPE: ClassVar[str] = "leader_answer"
    call_id: int
    kind: AnswerKind
    retcode: int
    reason: str
    iteration: int
    data_size: int
    next_req_time_ms: int
    text: str


@register
@attrs.frozen
class CipherCall:
    """Follower → leader: a device's cipher-round request (payload: its body, already decoded once by the
    follower; spec/secure-aggregation.md §R6)."""

    TYPE: ClassVar[str] = "cipher_call"
    call_id: int
    round: CipherRound


@register
@attrs.frozen
class CipherReply:
    """Leader → follower: the answer to :class:`CipherCall` ``call_id``: the response table (payload), or
    the plain text ``text`` when ``plain``."""

    TYPE: ClassVar[str] = "cipher_answer"
    call_id: int
    plain: bool
    text: str


@register
@attrs.frozen
class IterationStatus:
    """Leader → followers: the iteration devices are in, its phase and the instance state."""

    TYPE: ClassVar[str] = "iteration_status"
    iteration: int
    phase: Phase
    instance_state: InstanceState
    next_req_time_ms: int


@register
@attrs.frozen
class CollectPartial:
    """Leader → follower: send your partial sums of ``iteration`` (answer :class:`PartialSums`)."""

    TYPE: ClassVar[str] = "collect_partial"
    iteration: int


@register
@attrs.frozen
class PartialSums:
    """Follower → leader: the partial sums of ``iteration`` (payload: ``PartialSum.to_bytes()``).

    ``fl_ids`` are the devices whose updates the sum holds (spec/recovery.md §4, checked at collection).
    """

    TYPE: ClassVar[str] = "partial_sums"
    iteration: int
    update_count: int
    get_model_total: int
    get_model_accept: int
    fl_ids: tuple[str, ...]


@register
@attrs.frozen
class DropPartials:
    """Leader → followers: ``iteration`` failed; drop its partial sums."""

    TYPE: ClassVar[str] = "drop_partials"
    iteration: int


@register
@attrs.frozen
class PublishModel:
    """Leader → followers: the model of ``iteration`` (payload: float32 weights in model order)."""

    TYPE: ClassVar[str] = "publish_model"
    iteration: int


@register
@attrs.frozen
class ModelInstalled:
    """Follower → leader: the model of ``iteration`` is installed here."""

    TYPE: ClassVar[str] = "model_installed"
    iteration: int


@register
@attrs.frozen
class HeldUpdates:
    """Follower → leader: the second frame of a peer hello (spec/recovery.md §5.1).

    The follower's committed sum is of ``iteration`` (0: it holds none) and holds ``fl_ids``; the leader
    counts those and releases the follower's other reservations.
    """

    TYPE: ClassVar[str] = "held_updates"
    iteration: int
    fl_ids: tuple[str, ...]


@register
@attrs.frozen
class UpdatesCommitted:
    """Follower → leader (pipelined, no answer): the folds of ``fl_ids`` into ``iteration`` are committed.

    The leader counts these reservations toward ``update_model_threshold`` (spec/recovery.md §4).
    """

    TYPE: ClassVar[str] = "updates_committed"
    iteration: int
    fl_ids: tuple[str, ...]


@register
@attrs.frozen
class InstanceRenewedMsg:
    """Leader → followers: devices get these FLPlan values from now on; ``reset``: a new instance applies
    now (the latest model becomes model 0; sent without it after a peer hello, for the plan only)."""

    TYPE: ClassVar[str] = "instance_renewed"
    epochs: int
    mini_batch: int
    lr: float
    reset: bool


@register
@attrs.frozen
class ErrorReply:
    """Any direction: the previous frame broke a rule; ``reason`` says which. Nothing changed."""

    TYPE: ClassVar[str] = "error"
    reason: str


Message = (
    Register
    | RegisterReply
    | HeartbeatMsg
    | HeartbeatReply
    | Membership
    | Shutdown
    | Finished
    | FinishCluster
    | FinishReply
    | PeerHello
    | PeerHelloReply
    | PeerPing
    | LeaderCall
    | LeaderAnswer
    | CipherCall
    | CipherReply
    | IterationStatus
    | CollectPartial
    | PartialSums
    | DropPartials
    | PublishModel
    | ModelInstalled
    | HeldUpdates
    | UpdatesCommitted
    | ScalingBarrier
    | InstanceCall
    | InstanceAnswer
    | InstanceRenewedMsg
    | ErrorReply
)


# ------------------------------------------------------------------------------- conversion


def to_header(msg: Any) -> dict[str, Any]:
    """The frame header for a registered message record."""
    header: dict[str, Any] = {"type": type(msg).TYPE}
    for field in attrs.fields(type(msg)):
        header[field.name] = _to_json(getattr(msg, field.name))
    return header


def _to_json(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if attrs.has(type(value)):
        return {f.name: _to_json(getattr(value, f.name)) for f in attrs.fields(type(value))}
    return value


def from_frame(frame: Frame) -> Message:
    """Decode a frame's header into its message record.

    Raises:
        MessageError: unknown type, missing or extra fields, or a field of the wrong type.
    """
    cls = _REGISTRY.get(frame.type)
    if cls is None:
        raise MessageError(f"unknown message type {frame.type!r}; known types: {sorted(_REGISTRY)}")
    body = {k: v for k, v in frame.header.items() if k != "type"}
    result: Message = _build(cls, body, frame.type)
    return result


def _build(cls: type[Any], body: Any, where: str) -> Any:
    if not isinstance(body, dict):
        raise MessageError(f"{where}: expected a JSON object, got {type(body).__name__}")
    hints = typing.get_type_hints(cls)
    fields = attrs.fields(cls)
    names = {f.name for f in fields}
    extra = sorted(set(body) - names)
    if extra:
        raise MessageError(f"{where}: unexpected fields {extra}")
    values: dict[str, Any] = {}
    for field in fields:
        if field.name not in body:
            raise MessageError(f"{where}: missing field {field.name!r}")
        values[field.name] = _check(hints[field.name], body[field.name], f"{where}.{field.name}")
    return cls(**values)


def _check(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item_hint, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, list):
            raise MessageError(f"{where}: expected a list, got {type(value).__name__}")
        if len(value) > MAX_ITEMS:
            raise MessageError(f"{where}: {len(value)} items exceed the limit of {MAX_ITEMS}")
        return tuple(_check(item_hint, v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(hint, type) and attrs.has(hint):
        return _build(hint, value, where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        known = [m.value for m in hint]
        # Of the values' own type: a bool or a float equal to an IntEnum's value is not that value.
        if not any(type(value) is type(k) and value == k for k in known):
            raise MessageError(f"{where}: expected one of {known}, got {value!r:.80}")
        return hint(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise MessageError(f"{where}: expected a bool, got {value!r:.80}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MessageError(f"{where}: expected an int, got {value!r:.80}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MessageError(f"{where}: expected a number, got {value!r:.80}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise MessageError(f"{where}: expected a string, got {value!r:.80}")
        if len(value) > MAX_STRING:
            raise MessageError(f"{where}: string of {len(value)} characters exceeds {MAX_STRING}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # JSON can carry lone surrogates that UTF-8 cannot: accepting one would break the reply.
            raise MessageError(f"{where}: string {value!r:.80} is not valid Unicode text") from None
        return value
    if isinstance(hint, types.UnionType):  # pragma: no cover - no union fields today
        raise MessageError(f"{where}: union fields are not supported")
    raise TypeError(f"{where}: unsupported field type {hint!r}")  # a programming error, not bad input
