"""What a recovery store holds, what a transition writes, and the rules every store applies to it.

Theory of operation (spec/store.md, "Records" and "Transitions"). Everything is a frozen attrs record of
plain types and ``bytes``, so the records need no torch, trio or sqlite and compare by value:

- :class:`NodeIdentity` is the job identity a store file is bound to (role, node id, ``fl_name``, the
  configured ``server_num``); it is written when the file is created and checked at every open.
- A Scheduler keeps a :class:`SchedulerState` (cluster state, current ``server_num``, membership).
- A Server keeps a :class:`ServerState` (rank, iteration, instance state, the iteration machine's
  snapshot as JSON text), its models by iteration (:class:`StoredModel`: little-endian float32 in model
  order) and the running partial sum of the iteration (:class:`PartialSumState`).

A :class:`Transition` is one state change: any of a new scheduler state, a new server state, a model
(with how many of the newest to keep) and a partial-sum write. A store commits it in one transaction,
all of it or none of it. The partial-sum writes carry the whole running sum *after* the change, so of
several writes committed together only the last sum need be written: that is what lets
:class:`~flcluster.store.sqlite.SqliteStore` fold many updates into one commit (spec/store.md, "Group
commit").

:func:`apply_transition` is the rule book as a pure function on :class:`StoreContents`; the
:class:`~flcluster.store.memory.MemoryStore` is that function and nothing else, and the SQLite store
checks the same rules with :func:`check_partial_write`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

import attrs

from flcluster.errors import TransitionRefused


class StoreRole(enum.StrEnum):
    """Whose store a file is: the Scheduler's or a Server's."""

    SCHEDULER = "scheduler"
    SERVER = "server"


def _non_negative(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name}={value!r} is refused; expected an integer >= 0")


def _port(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name}={value!r} is refused; expected a port number 0..65535")


def _float32_bytes(_instance: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes):
        raise ValueError(f"{attribute.name} must be bytes, got {type(value).__name__}")
    if len(value) % 4:
        raise ValueError(
            f"{attribute.name} holds {len(value)} bytes, which is not a whole number of float32 values"
        )


def _str_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


_str = attrs.validators.instance_of(str)
_bytes = attrs.validators.instance_of(bytes)


@attrs.frozen
class NodeIdentity:
    """The job identity a store file is bound to; a file of another identity is refused at open.

    Attributes:
        role: whose store it is.
        node_id: the node's stable id (``MS_NODE_ID``).
        fl_name: the job's ``fl_name``.
        server_num: the ``server_num`` the job was configured with (not the current total, which scaling
            changes and which the Scheduler keeps in :class:`SchedulerState`).
    """

    role: StoreRole = attrs.field(converter=StoreRole)
    node_id: str = attrs.field(validator=_str)
    fl_name: str = attrs.field(validator=_str)
    server_num: int = attrs.field(validator=_non_negative)

    def __attrs_post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id='' is refused; a recovery store belongs to a node with an id")


@attrs.frozen
class Member:
    """One Server in the Scheduler's membership."""

    node_id: str = attrs.field(validator=_str)
    rank: int = attrs.field(validator=_non_negative)
    host: str = attrs.field(validator=_str)
    port: int = attrs.field(validator=_port)
    device_port: int = attrs.field(validator=_port)


def _by_rank(members: tuple[Member, ...] | list[Member]) -> tuple[Member, ...]:
    return tuple(sorted(members, key=lambda m: m.rank))


@attrs.frozen
class SchedulerState:
    """What the Scheduler keeps: cluster state, current total of Servers, membership (in rank order).

    Attributes:
        cluster_state: the cluster state's name (``"CLUSTER_READY"``, ...).
        server_num: how many Servers the cluster has now (scaling changes it).
        members: the registered Servers; ranks and node ids are each unique.
        fl_iteration_num: the ``fl_iteration_num`` the registered Servers agreed on (``None`` before the
            first registration; schema version 3).
    """

    cluster_state: str = attrs.field(validator=_str)
    server_num: int = attrs.field(validator=_non_negative)
    members: tuple[Member, ...] = attrs.field(default=(), converter=_by_rank)
    fl_iteration_num: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_non_negative)
    )

    def __attrs_post_init__(self) -> None:
        ranks = [m.rank for m in self.members]
        ids = [m.node_id for m in self.members]
        if len(set(ranks)) != len(ranks) or len(set(ids)) != len(ids):
            raise ValueError(
                f"membership ranks {ranks!r} and node ids {ids!r} are refused; each must be unique"
            )


@attrs.frozen
class ServerState:
    """What a Server keeps besides models and partial sums.

    Attributes:
        rank: the rank the Scheduler gave it.
        iteration: the iteration it is in.
        instance_state: the instance state's value (``"running"``, ``"disable"``, ``"finish"``).
        machine: the leader's iteration machine snapshot as JSON text (``None`` on a follower or before
            the first snapshot); the store keeps it as given.
    """

    rank: int = attrs.field(validator=_non_negative)
    iteration: int = attrs.field(validator=_non_negative)
    instance_state: str = attrs.field(validator=_str)
    machine: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str))
    )


@attrs.frozen
class StoredModel:
    """A model by iteration: little-endian float32 values in model order (iteration 0 = initial model)."""

    iteration: int = attrs.field(validator=_non_negative)
    weights: bytes = attrs.field(validator=_float32_bytes, repr=lambda b: f"<{len(b)} bytes>")


@attrs.frozen
class PartialSumState:
    """The running partial sum of an iteration as committed.

    Attributes:
        iteration: the iteration it belongs to.
        data: the sum's bytes (a :meth:`flcluster.aggregation.PartialSum.to_bytes` encoding; the store
            keeps it as given).
        fl_ids: the devices whose updates it holds, in the order they were folded in.
        update_count: how many updates it holds.
    """

    iteration: int = attrs.field(validator=_non_negative)
    data: bytes = attrs.field(validator=_bytes, repr=lambda b: f"<{len(b)} bytes>")
    fl_ids: tuple[str, ...] = attrs.field(converter=_str_tuple)
    update_count: int = attrs.field(validator=_non_negative)


@attrs.frozen
class PartialReset:
    """Start the running sum of ``iteration`` afresh with ``data`` (no fl_ids, ``update_count`` given).

    Used at the start of an iteration (``data`` = the empty sum, ``update_count`` 0) and when a Server
    replaces its sum wholesale.
    """

    iteration: int = attrs.field(validator=_non_negative)
    data: bytes = attrs.field(validator=_bytes, repr=lambda b: f"<{len(b)} bytes>")
    update_count: int = attrs.field(default=0, validator=_non_negative)


def _fl_ids(values: Iterable[str]) -> tuple[str, ...]:
    ids = tuple(values)
    if not ids or not all(isinstance(f, str) and f for f in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"fl_ids {ids!r:.120} are refused; expected one or more distinct non-empty strs")
    return ids


@attrs.frozen
class FoldedUpdates:
    """The updates of ``fl_ids`` were folded, in that order, into the running sum of ``iteration``, which
    is now ``data``.

    ``update_count`` is the sum's count after the folds. A Server commits the folds made while its
    previous commit was in flight together, with the sum once (spec/store.md, "Group commit"). A fold
    into a newer iteration than the stored sum's starts that iteration's sum (the older one is dropped);
    a fold into an older iteration, or a second fold of one fl_id into one iteration, is refused.
    """

    iteration: int = attrs.field(validator=_non_negative)
    fl_ids: tuple[str, ...] = attrs.field(converter=_fl_ids)
    data: bytes = attrs.field(validator=_bytes, repr=lambda b: f"<{len(b)} bytes>")
    update_count: int = attrs.field(validator=_non_negative)


PartialWrite = PartialReset | FoldedUpdates


def _rows(values: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    rows = tuple((fl_id, text) for fl_id, text in values)
    for fl_id, text in rows:
        if not isinstance(fl_id, str) or not fl_id or not isinstance(text, str):
            raise ValueError(
                f"a device row ({fl_id!r}, {text!r:.40}) is refused; expected (a non-empty str, a str)"
            )
    return rows


@attrs.frozen
class DeviceRows:
    """A write to the leader's device rows (one row of text per ``fl_id``; spec/store.md, "Records").

    ``rewrite`` deletes every stored row first; then each ``(fl_id, text)`` of ``rows`` is stored,
    replacing that device's row, and each fl_id of ``deleted`` is removed. The store keeps the texts as
    given (:mod:`flcluster.core.device_rows` writes and reads them).
    """

    rewrite: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    rows: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_rows)
    deleted: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)


@attrs.frozen
class Transition:
    """One state change, committed in one transaction (all of it or none of it).

    Attributes:
        scheduler: the Scheduler's new state (Scheduler stores only).
        server: the Server's new state (Server stores only).
        model: a model to store (replacing one of the same iteration).
        keep_models: after storing, keep only this many of the newest models (``None``: keep all).
        partial: a write to the running partial sum (Server stores only).
        devices: a write to the leader's device rows (Server stores only; schema version 4).
        new_history: start the history over: every stored model and the partial sum are deleted first,
            and ``model`` (required; no ``partial`` beside it) becomes the only model (spec/store.md,
            "Records"; a new instance, spec/cluster-protocol.md §9).
    """

    scheduler: SchedulerState | None = None
    server: ServerState | None = None
    model: StoredModel | None = None
    keep_models: int | None = None
    partial: PartialWrite | None = None
    devices: DeviceRows | None = None
    new_history: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def __attrs_post_init__(self) -> None:
        if self.keep_models is not None and (
            isinstance(self.keep_models, bool)
            or not isinstance(self.keep_models, int)
            or self.keep_models < 1
        ):
            raise ValueError(f"keep_models={self.keep_models!r} is refused; expected None or an integer >= 1")
        if self.new_history and (self.model is None or self.partial is not None):
            raise ValueError(
                "new_history=True is refused without a model or beside a partial-sum write; a new history "
                "starts with exactly one model and no sum"
            )
        if all(getattr(self, f.name) in (None, False) for f in attrs.fields(Transition)):
            raise ValueError("an empty transition is refused; a transition writes at least one thing")


@attrs.frozen
class StoreContents:
    """Everything a store holds, as :meth:`~flcluster.store.api.RecoveryStore.load` returns it.

    Attributes:
        identity: the job identity the store is bound to.
        scheduler: the Scheduler's state (``None``: never written).
        server: the Server's state (``None``: never written).
        models: the stored models, oldest first.
        partial: the running partial sum (``None``: never written).
        devices: the leader's device rows ``(fl_id, text)``, sorted by fl_id.
    """

    identity: NodeIdentity
    scheduler: SchedulerState | None = None
    server: ServerState | None = None
    models: tuple[StoredModel, ...] = ()
    partial: PartialSumState | None = None
    devices: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_rows)


@attrs.frozen
class StoreStatistics:
    """Counters of a store since it was opened (trio's ``statistics()`` convention).

    Attributes:
        transitions: transitions committed.
        transactions: transactions committed (fewer than ``transitions`` when writes were grouped).
        refused: transitions refused (:class:`~flcluster.errors.TransitionRefused`) or failed.
        largest_group: the most transitions one transaction committed.
    """

    transitions: int
    transactions: int
    refused: int
    largest_group: int


def check_roles(identity: NodeIdentity, transition: Transition) -> None:
    """Refuse a transition that writes another role's state.

    Raises:
        TransitionRefused: a Scheduler store given server state, models or partial sums, or a Server
            store given scheduler state.
    """
    match identity.role:
        case StoreRole.SCHEDULER:
            if (
                transition.server is not None
                or transition.model is not None
                or transition.partial is not None
                or transition.devices is not None
                or transition.new_history
            ):
                raise TransitionRefused(
                    f"a Scheduler's store ({identity.node_id!r}) keeps only scheduler state; the transition "
                    f"{transition!r} writes server state, a model, a partial sum or device rows"
                )
        case StoreRole.SERVER:
            if transition.scheduler is not None:
                raise TransitionRefused(
                    f"a Server's store ({identity.node_id!r}) keeps no scheduler state; the transition "
                    f"{transition!r} writes some"
                )


def check_partial_write(
    stored_iteration: int | None, holds: Callable[[str], bool], write: PartialWrite
) -> bool:
    """Check a partial-sum write against the stored sum; say whether it starts a new sum.

    Args:
        stored_iteration: the iteration of the stored sum (``None``: none stored).
        holds: whether the stored sum holds a given fl_id.
        write: the write.

    Returns:
        ``True`` if the write replaces the stored sum (a reset, or a fold into a newer iteration),
        ``False`` if it adds to it.

    Raises:
        TransitionRefused: a write for an older iteration than the stored sum's, or a second fold of one
            fl_id into one iteration's sum.
    """
    if stored_iteration is not None and write.iteration < stored_iteration:
        raise TransitionRefused(
            f"a partial-sum write for iteration {write.iteration!r} is refused; the stored sum is of the "
            f"newer iteration {stored_iteration!r}"
        )
    match write:
        case PartialReset():
            return True
        case FoldedUpdates():
            if write.iteration != stored_iteration:
                return True
            if held := [f for f in write.fl_ids if holds(f)]:
                raise TransitionRefused(
                    f"fl_ids {held!r} are refused; their updates are already in the sum of iteration "
                    f"{write.iteration!r} (an update is folded in once)"
                )
            return False


def apply_transition(contents: StoreContents, transition: Transition) -> StoreContents:
    """The contents after ``transition`` (the store rules as a pure function).

    Raises:
        TransitionRefused: the transition breaks a rule (:func:`check_roles`, :func:`check_partial_write`);
            ``contents`` is unchanged.
    """
    check_roles(contents.identity, transition)
    changes: dict[str, object] = {}
    if transition.scheduler is not None:
        changes["scheduler"] = transition.scheduler
    if transition.server is not None:
        changes["server"] = transition.server
    if transition.new_history:
        changes["partial"] = None
    if transition.model is not None or transition.keep_models is not None:
        models = {} if transition.new_history else {m.iteration: m for m in contents.models}
        if transition.model is not None:
            models[transition.model.iteration] = transition.model
        ordered = [models[i] for i in sorted(models)]
        if transition.keep_models is not None:
            ordered = ordered[-transition.keep_models :]
        changes["models"] = tuple(ordered)
    if (write := transition.partial) is not None:
        old = contents.partial
        held = set(old.fl_ids) if old is not None else set()
        fresh = check_partial_write(old.iteration if old is not None else None, held.__contains__, write)
        match write:
            case PartialReset():
                changes["partial"] = PartialSumState(write.iteration, write.data, (), write.update_count)
            case FoldedUpdates():
                before: tuple[str, ...] = () if fresh or old is None else old.fl_ids
                changes["partial"] = PartialSumState(
                    write.iteration, write.data, (*before, *write.fl_ids), write.update_count
                )
    if (rows := transition.devices) is not None:
        stored = {} if rows.rewrite else dict(contents.devices)
        stored.update(rows.rows)
        for fl_id in rows.deleted:
            stored.pop(fl_id, None)
        changes["devices"] = tuple(sorted(stored.items()))
    return attrs.evolve(contents, **changes)  # type: ignore[arg-type]


def identity_mismatch(stored: NodeIdentity, opener: NodeIdentity) -> tuple[str, str]:
    """The problem and the remedy of a :class:`~flcluster.errors.StoreForeign` refusal.

    Names every field in which the store's identity and the opener's differ, with both values.
    """
    fields = [
        f"{field.name} {getattr(stored, field.name)!r} (this node has {getattr(opener, field.name)!r})"
        for field in attrs.fields(NodeIdentity)
        if getattr(stored, field.name) != getattr(opener, field.name)
    ]
    problem = "it belongs to another job or node: it was written for " + ", ".join(fields)
    remedy = (
        "start this node with the role, node id, fl_name and server_num the file was written for, or give "
        "it its own store file (another node id or another storage_file_path)"
    )
    return problem, remedy
