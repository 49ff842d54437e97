"""The rules of federated iterations, as the leader holds them (spec/state-machines.md, "Iteration").

Theory of operation
-------------------
Server rank 0, the *leader*, is the single authority for everything that is counted cluster-wide: the
iteration number, the startFLJob and updateModel counters (sets of ``fl_id``), the device metadata each
device declared at startFLJob, which round windows are armed, and the instance state. A device may hit a
different Server on every request (reference §2.1), so every Server forwards the *counting part* of a
device request to the leader, which runs it through this machine and sends the answer back. What is not
counted stays where the request landed: the FlatBuffers schema check and the feature-map check happen
before the request is forwarded, the folding of an accepted update into a partial sum after.

This module holds those rules and nothing else. It reads no clock, opens no socket and touches no file
(spec "Iteration", STYLE rules 1 and 2). The trio driver turns what happens into :data:`Event` records,
calls :meth:`IterationMachine.handle`, and gets back an :class:`Outcome`: the :data:`Reply` to send to
the device or operator (if the event was a request) and the :data:`Instruction` records to carry out, in
order. Every event carries a ``cause`` id, and every instruction repeats it, so any change can be traced
back to what caused it (dask's ``stimulus_id``). Time enters only as ``now_ms`` (epoch milliseconds) on
each event; a window the machine asked for with :class:`ArmWindow` comes back as :class:`WindowClosed`
when the driver's cancel scope expires.

One iteration, from the leader's point of view::

                 first accepted startFLJob
    WAITING ─────────────────────────────────▶ RUNNING ──── update_model_threshold reached ───┐
       ▲        (arm startFLJob + global)        │   (startFLJob round closes at its         │
       │                                         │    threshold; updateModel window armed)   ▼
       │                 window closed before its threshold,           AGGREGATING (safemode)
       │                 Disable, AggregationFailed                     │          │
       ├──────────── iteration FAILS, N := N+1 ◀────────────────────────┘          │
       └──────────── iteration COMPLETES, N := N+1 ◀──── AggregationDone ──────────┘

After ``fl_iteration_num`` iterations, failed ones included, the instance is *finished*: device rounds
answer the plain text "disabled or finished" (getModel is still served by the HTTP layer).

Illegal events (an aggregation result for an iteration that is not aggregating, a window of an iteration
that has not begun, enabling a finished job) raise :class:`~flcluster.errors.IllegalEvent` and change
nothing (the h11 rule). A *stale* :class:`WindowClosed` (an old iteration, or a window already disarmed)
is not illegal, because timers race with thresholds; it is ignored. A device request is never illegal:
every device request gets an answer.
"""

from __future__ import annotations

import enum
import json
import math
import typing
from fractions import Fraction
from typing import TypeAlias, assert_never, final

import attrs

from flcluster.core import outcome as _outcome
from flcluster.core.cipher import (
    UPDATE_MODEL_WINDOW,
    CipherAnswer,
    CipherConfig,
    CipherDevice,
    CipherEvent,
    CipherMode,
    CipherRounds,
    CipherSnapshot,
    CipherState,
    CipherThresholds,
    ExchangeKeysReceived,
    GetClientListReceived,
    GetKeysReceived,
    GetListSignReceived,
    GetSecretsReceived,
    PushListSignReceived,
    ReconstructSecretsReceived,
    ShareSecretsReceived,
    Step,
    UnmaskInputs,
    Verdict,
    check_served,
    reason_cipher_lost,
)
from flcluster.errors import IllegalEvent
from flcluster.wire.codes import JOB_NOT_AVAILABLE_TEXT, SAFEMODE_TEXT, ResponseCode

__all__ = [
    "JOB_NOT_AVAILABLE_TEXT",
    "MAX_DATA_SIZE",
    "MESSAGE_CANNOT_DISABLE",
    "MESSAGE_CANNOT_ENABLE",
    "MESSAGE_DISABLED",
    "MESSAGE_ENABLED",
    "MESSAGE_FIRST_ITERATION",
    "MESSAGE_INSTANCE_BUSY",
    "MESSAGE_NEW_INSTANCE",
    "REASON_DATA_SIZE_NOT_ENOUGH",
    "REASON_DATA_SIZE_TOO_LARGE",
    "REASON_FORCIBLY_MOVED",
    "REASON_START_FL_JOB_SUCCESS",
    "REASON_START_FL_JOB_THRESHOLD",
    "REASON_UPDATE_MODEL_ENOUGH",
    "REASON_UPDATE_MODEL_SUCCESS",
    "SAFEMODE_TEXT",
    "Accepted",
    "AggregateIteration",
    "AggregationDone",
    "AggregationFailed",
    "ArmWindow",
    "ArmedWindow",
    "ClientParams",
    "DeviceChanges",
    "DeviceMeta",
    "DeviceRecord",
    "DisableRequested",
    "DisarmWindow",
    "DiscardPartials",
    "EnableRequested",
    "Event",
    "Holding",
    "InstanceRenewed",
    "InstanceState",
    "InstanceStateChanged",
    "Instruction",
    "IterationCompleted",
    "IterationConfig",
    "IterationFailed",
    "IterationMachine",
    "IterationSnapshot",
    "NewInstanceRequested",
    "OperatorAnswer",
    "Outcome",
    "PendingInstance",
    "Phase",
    "PlainText",
    "Rejected",
    "Reply",
    "Reservation",
    "ResponseCode",
    "Resumed",
    "RoundCounts",
    "ServerResynced",
    "StartFLJobReceived",
    "UpdateModelReceived",
    "UpdatesConfirmed",
    "Visits",
    "WindowClosed",
    "WindowKind",
    "reason_device_meta_missing",
    "reason_duplicate_device",
    "reason_global_timeout",
    "reason_repeated_update",
    "reason_round_timeout",
    "reason_updates_lost",
    "reason_wrong_iteration",
    "snapshot_from_json",
    "snapshot_part_from_json",
    "snapshot_to_json",
    "update_model_threshold",
]

# ------------------------------------------------------------------------------------ wire constants

# ResponseCode, SAFEMODE_TEXT and JOB_NOT_AVAILABLE_TEXT live in flcluster.wire.codes (pure, stdlib only);
# they are re-exported here for the core's callers.
#: Largest ``data_size`` a device may declare (F-new refuses ``0x10000``; reference §2.4 step 4).
MAX_DATA_SIZE = 65535
#: Reason of a successful startFLJob (reference §2.4 step 7).
REASON_START_FL_JOB_SUCCESS = "success"
#: Reason of a successful updateModel (reference §2.4 step 10).
REASON_UPDATE_MODEL_SUCCESS = "success not ready"
#: startFLJob after its round reached the threshold (reference §2.4 step 2).
REASON_START_FL_JOB_THRESHOLD = (
    "Current amount for startFLJob has reached the threshold. Please startFLJob later."
)
#: startFLJob with ``data_size < 1`` (reference §2.4 step 4).
REASON_DATA_SIZE_NOT_ENOUGH = "FL job data size is not enough."
#: startFLJob with ``data_size > 65535`` (F-new, reference §2.4 step 4).
REASON_DATA_SIZE_TOO_LARGE = "FL job data size is too large."
#: updateModel while the counter is full (reference §2.4 updateModel step 2).
REASON_UPDATE_MODEL_ENOUGH = "Current amount for updateModel is enough. Please retry later."
#: Reason an iteration fails when the operator disables the instance (F-old ``ForciblyMoveToNextIteration``).
REASON_FORCIBLY_MOVED = "Forcibly move to next iteration."
#: Operator answers (F-old ``Iteration::EnableServerInstance`` / ``DisableServerInstance``).
MESSAGE_DISABLED = "Disabling FL-Server succeeded."
MESSAGE_ENABLED = "Enabling FL-Server succeeded."
#: Operator answers to a new instance (F-old ``Iteration::NewInstance``, reference §3.8).
MESSAGE_NEW_INSTANCE = "Start new instance successful."
MESSAGE_INSTANCE_BUSY = "The instance is being updated. Please retry new instance later."
MESSAGE_FIRST_ITERATION = "This is just the first iteration, do not need to new instance."
#: Operator refusals when the instance is finished (F-new management API wording).
MESSAGE_CANNOT_DISABLE = "The instance is completed and cannot be disabled."
MESSAGE_CANNOT_ENABLE = "The instance is completed and cannot be enabled."


def reason_duplicate_device(fl_id: str) -> str:
    """Reason for a second startFLJob from ``fl_id`` in one iteration (reference §2.4 step 5)."""
    return f"Updating device metadata failed for fl id {fl_id}"


def reason_wrong_iteration(got: int, current: int, next_req_time_ms: int, fl_id: str) -> str:
    """Reason for an updateModel that names another iteration (reference §2.4 updateModel step 3)."""
    return (
        f"UpdateModel iteration number is invalid:{got}, current iteration:{current}, "
        f"Retry later at time: {next_req_time_ms}, fl id is {fl_id}"
    )


def reason_device_meta_missing(fl_id: str) -> str:
    """Reason for an updateModel from a device with no startFLJob this iteration (§2.4 step 6)."""
    return f"devices_meta for {fl_id} is not set. Please retry later."


def reason_repeated_update(fl_id: str) -> str:
    """Reason for a second updateModel from ``fl_id`` in one iteration (F-new wording, §2.4, §8.1)."""
    return f"Updating metadata of UpdateModelClientList failed for fl id {fl_id}"


def reason_round_timeout(kind: WindowKind) -> str:
    """Failure reason when a round window closes before its threshold (reference §3.2)."""
    return f"Round {kind.value} timeout! This iteration is invalid. Proceed to next iteration."


def reason_updates_lost(server: str, fl_ids: list[str]) -> str:
    """Failure reason when a Server comes back without updates counted for it (spec/recovery.md §8)."""
    return (
        f"Server {server!r} came back without the acknowledged updates of {fl_ids!r:.200}; this iteration "
        "cannot be exact. Proceed to next iteration."
    )


def reason_global_timeout(iteration: int) -> str:
    """Failure reason when the global iteration window closes (reference §3.2)."""
    return f"Global Iteration {iteration} timeout! This iteration is invalid. Proceed to next iteration."


# ---------------------------------------------------------------------------------------- enums


class InstanceState(enum.StrEnum):
    """State of the training instance; the values are metrics.json's ``instanceStatus`` (§3.9)."""

    RUNNING = "running"
    DISABLED = "disable"
    FINISHED = "finish"


class Phase(enum.StrEnum):
    """Where the current iteration is.

    ``WAITING``: no startFLJob accepted yet; nothing armed. ``RUNNING``: the iteration has started and
    its windows are armed. ``AGGREGATING``: the updateModel threshold was reached and the driver is
    combining partial sums; the cluster is in safemode.
    """

    WAITING = "waiting"
    RUNNING = "running"
    AGGREGATING = "aggregating"
    #: PW_ENCRYPT only: the updateModel threshold is reached; getClientList and reconstructSecrets are
    #: served until ``t + 1`` devices sent their shares (spec/secure-aggregation.md §R4).
    UNMASKING = "unmasking"


class WindowKind(enum.StrEnum):
    """The time windows of one iteration; round windows are named after their round."""

    START_FL_JOB = "startFLJob"
    UPDATE_MODEL = "updateModel"
    GLOBAL = "global"
    # The cipher rounds' windows (spec/secure-aggregation.md §R3), named after their rounds.
    EXCHANGE_KEYS = "exchangeKeys"
    GET_KEYS = "getKeys"
    SHARE_SECRETS = "shareSecrets"
    GET_SECRETS = "getSecrets"
    GET_CLIENT_LIST = "getClientList"
    RECONSTRUCT_SECRETS = "reconstructSecrets"
    # The list signatures' windows (PW_ENCRYPT with pki_verify, spec/secure-aggregation.md §R8).
    PUSH_LIST_SIGN = "pushListSign"
    GET_LIST_SIGN = "getListSign"


# --------------------------------------------------------------------------------------- config


def update_model_threshold(start_fl_job_threshold: int, update_model_ratio: float) -> int:
    """``ceil(start_fl_job_threshold × update_model_ratio)`` (reference §2.2), computed exactly.

    The ratio is taken as the decimal the operator wrote (``repr`` of the float), so ``10 × 0.7`` is 7,
    as the original's single-precision product gives, and not the 8 that a double product
    (``7.000000000000001``) would round up to.
    """
    return math.ceil(Fraction(repr(update_model_ratio)) * start_fl_job_threshold)


def _cipher_config(value: object) -> CipherConfig | None:
    """``IterationConfig.cipher`` from a record, or from its JSON object (a snapshot read back)."""
    if value is None or isinstance(value, CipherConfig):
        return value
    if isinstance(value, dict):
        return CipherConfig(**value)
    raise TypeError(f"cipher must be a CipherConfig, a JSON object of one, or None, got {value!r:.80}")


@final
@attrs.frozen(kw_only=True)
class IterationConfig:
    """The numbers every iteration is held against (reference §1.1).

    Built from a validated ``FLContext`` by ``flcluster.settings.iteration_config``; no defaults and no rules
    of its own (the context's are the only ones, ``spec/configuration.md`` §2).

    Attributes:
        start_fl_job_threshold: Accepted startFLJob calls that close the startFLJob round.
        update_model_ratio: In (0, 1]; ``update_model_threshold = ceil(threshold × ratio)``.
        start_fl_job_time_window: Milliseconds the startFLJob round may stay open.
        update_model_time_window: Milliseconds the updateModel round may stay open.
        global_iteration_time_window: Milliseconds one iteration may last, from its first startFLJob.
        fl_iteration_num: Iterations in the job, failed ones included.
        min_retry_delay_ms: The least time, after ``now``, that any ``next_req_time`` names
            (flcluster's own knob; see :meth:`IterationMachine.next_req_time_ms`).
        cipher: The secure-aggregation rounds (PW_ENCRYPT, STABLE_PW_ENCRYPT), or None
            (spec/secure-aggregation.md).
    """

    start_fl_job_threshold: int
    update_model_ratio: float
    start_fl_job_time_window: int
    update_model_time_window: int
    global_iteration_time_window: int
    fl_iteration_num: int
    min_retry_delay_ms: int
    cipher: CipherConfig | None = attrs.field(converter=_cipher_config)

    @property
    def update_model_threshold(self) -> int:
        """Accepted updateModel calls that complete an iteration."""
        return update_model_threshold(self.start_fl_job_threshold, self.update_model_ratio)

    @property
    def iteration_time_window(self) -> int:
        """``start_fl_job_time_window + update_model_time_window``, plus ``k × cipher_time_window`` with
        cipher rounds (k = 6 for PW, 2 for STABLE_PW; reference §2.5)."""
        windows = self.start_fl_job_time_window + self.update_model_time_window
        if self.cipher is not None:
            windows += self.cipher.window_count * self.cipher.cipher_time_window
        return windows

    @property
    def cipher_thresholds(self) -> CipherThresholds | None:
        """The cipher rounds' thresholds (spec/secure-aggregation.md §R2), or None without cipher rounds."""
        if self.cipher is None:
            return None
        return CipherThresholds.of(self.cipher, self.start_fl_job_threshold, self.update_model_threshold)


# ---------------------------------------------------------------------------------------- records


def _int(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int, got {value!r}")


def _non_negative_int(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    _int(instance, attribute, value)
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _number(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{attribute.name} must be a number, got {value!r}")


_str = attrs.validators.instance_of(str)


def _str_tuple(values: typing.Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _cause(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty str, got {value!r}")


@final
@attrs.frozen
class DeviceMeta:
    """What a device declared at an accepted startFLJob (reference §2.4 step 5).

    Attributes:
        fl_id: The device's id.
        data_size: Its declared sample count: the FedAvg weight of its update.
        accepted_at_ms: When its startFLJob was accepted (epoch ms).
    """

    fl_id: str = attrs.field(validator=_str)
    data_size: int = attrs.field(validator=_int)
    accepted_at_ms: int = attrs.field(validator=_non_negative_int)


@final
@attrs.frozen
class Reservation:
    """An accepted updateModel whose fold is not yet confirmed by the Server that folds it.

    Attributes:
        fl_id: The device.
        server: The node id of the Server folding it.
        at_ms: When the leader accepted it (epoch ms; the metrics' participation bucket).
        upload_loss: The loss the device reported (counted into the visits at confirmation).
        upload_accuracy: The accuracy the device reported.
    """

    fl_id: str = attrs.field(validator=_str)
    server: str = attrs.field(validator=_str)
    at_ms: int = attrs.field(validator=_non_negative_int)
    upload_loss: float = attrs.field(default=0.0, validator=_number)
    upload_accuracy: float = attrs.field(default=0.0, validator=_number)


@final
@attrs.frozen
class Holding:
    """A counted update and the Server whose sum holds it (``""``: confirmed at once, no Server named)."""

    fl_id: str = attrs.field(validator=_str)
    server: str = attrs.field(validator=_str)


@final
@attrs.frozen
class ClientParams:
    """The training plan values a new instance may change (the FLPlan's ``epochs``, ``mini_batch``, ``lr``).

    Attributes:
        epochs: ``client_epoch_num``.
        mini_batch: ``client_batch_size``.
        lr: ``client_learning_rate``.
    """

    epochs: int = attrs.field(validator=_int)
    mini_batch: int = attrs.field(validator=_int)
    lr: float = attrs.field(validator=_number)


@final
@attrs.frozen
class PendingInstance:
    """A new instance accepted while an iteration runs; it applies when that iteration ends."""

    config: IterationConfig = attrs.field(validator=attrs.validators.instance_of(IterationConfig))
    client: ClientParams | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(ClientParams))
    )


@final
@attrs.frozen
class DeviceRecord:
    """Everything the leader's machine holds about one device of the iteration: one row of its store.

    The leader's store keeps the machine as a small header (:meth:`IterationMachine.snapshot_without_devices`)
    plus one of these per device (spec/recovery.md §3.3), so a transaction writes only the devices it
    changed. A record with nothing in it (:attr:`empty`) says that the device's row is to go.

    Attributes:
        fl_id: The device.
        meta: Its startFLJob, if accepted in this iteration.
        reservation: Its accepted updateModel not yet confirmed, if any.
        holder: The Server whose sum holds its counted update (``""``: counted with no Server named;
            ``None``: not counted).
        last_completed: Its update was counted in the previous iteration, which completed.
        cipher: Its part of the cipher rounds' lists (secure-aggregation §R6), if any.
    """

    fl_id: str = attrs.field(validator=_str)
    meta: DeviceMeta | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(DeviceMeta))
    )
    reservation: Reservation | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(Reservation))
    )
    holder: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str))
    )
    last_completed: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    cipher: CipherDevice | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(CipherDevice))
    )

    @property
    def empty(self) -> bool:
        """Nothing is held about the device (its row is deleted)."""
        return (
            self.meta is None
            and self.reservation is None
            and self.holder is None
            and not self.last_completed
            and self.cipher is None
        )


@final
@attrs.frozen
class DeviceChanges:
    """The per-device records changed since the last :meth:`IterationMachine.take_device_changes`.

    Attributes:
        rewrite: The per-device state was replaced wholesale (a new or restored machine, the move to the
            next iteration): every row stored before is stale, and ``records`` holds every device.
        records: The changed devices' records, an :attr:`~DeviceRecord.empty` one for a device whose row
            is to go.
    """

    rewrite: bool
    records: tuple[DeviceRecord, ...]


@final
@attrs.frozen
class ArmedWindow:
    """One armed window in a snapshot."""

    kind: WindowKind = attrs.field(converter=WindowKind)
    deadline_ms: int = attrs.field(validator=_non_negative_int)


@final
@attrs.frozen
class RoundCounts:
    """The counters of the current iteration and their thresholds."""

    iteration: int
    start_fl_job: int
    start_fl_job_threshold: int
    update_model: int
    update_model_threshold: int


@final
@attrs.frozen(kw_only=True)
class Visits:
    """What one iteration saw, for its metrics.json line (reference §3.9).

    Counted by the machine as events arrive: every startFLJob and updateModel (``*_total``) and the
    accepted ones (``*_accept``); the getModel counts come with :class:`AggregationDone` /
    :class:`AggregationFailed`; ``loss_sum`` / ``accuracy_sum`` add up what accepted updates reported;
    ``participation`` buckets accepted updates by the minutes since their device's startFLJob, against
    the machine's two ``participation_levels`` (under the first, under the second, the rest).
    """

    start_fl_job_total: int = 0
    start_fl_job_accept: int = 0
    update_model_total: int = 0
    update_model_accept: int = 0
    get_model_total: int = 0
    get_model_accept: int = 0
    loss_sum: float = 0.0
    accuracy_sum: float = 0.0
    participation: tuple[int, int, int] = (0, 0, 0)


# ----------------------------------------------------------------------------------------- events


@final
@attrs.frozen
class StartFLJobReceived:
    """The counting part of a device's startFLJob (schema already checked by the receiving Server)."""

    cause: str = attrs.field(validator=_cause)
    fl_id: str = attrs.field(validator=_str)
    data_size: int = attrs.field(validator=_int)
    now_ms: int = attrs.field(validator=_non_negative_int)


@final
@attrs.frozen
class UpdateModelReceived:
    """The counting part of a device's updateModel (feature map already checked where it landed)."""

    cause: str = attrs.field(validator=_cause)
    fl_id: str = attrs.field(validator=_str)
    iteration: int = attrs.field(validator=_int)
    now_ms: int = attrs.field(validator=_non_negative_int)
    upload_loss: float = attrs.field(default=0.0, validator=_number)
    upload_accuracy: float = attrs.field(default=0.0, validator=_number)
    server: str = attrs.field(default="", validator=_str)


@final
@attrs.frozen
class UpdatesConfirmed:
    """Server ``server`` committed the folds of ``fl_ids`` into its running sum of ``iteration``.

    Each fl_id reserved for ``server`` in the current iteration moves from reserved to counted
    (spec/recovery.md §4); anything else (another iteration, an id not reserved for ``server``) is
    stale and ignored.
    """

    cause: str = attrs.field(validator=_cause)
    server: str = attrs.field(validator=_str)
    iteration: int = attrs.field(validator=_int)
    fl_ids: tuple[str, ...] = attrs.field(converter=_str_tuple)
    now_ms: int = attrs.field(validator=_non_negative_int)


@final
@attrs.frozen
class ServerResynced:
    """Server ``server`` (re)opened its peer link; its committed sum of ``iteration`` holds ``fl_ids``.

    For the current iteration: its reserved ids among ``fl_ids`` are counted, its other reservations
    are released (their devices never got SUCCEED and retry), and if it no longer holds an update
    already counted for it (a Server restarted without its store), the iteration fails: its model
    could no longer be exact (spec/recovery.md §5.1, §8).
    """

    cause: str = attrs.field(validator=_cause)
    server: str = attrs.field(validator=_str)
    iteration: int = attrs.field(validator=_int)
    fl_ids: tuple[str, ...] = attrs.field(converter=_str_tuple)
    now_ms: int = attrs.field(validator=_non_negative_int)


@final
@attrs.frozen
class WindowClosed:
    """A window the machine armed with :class:`ArmWindow` has expired on the driver's clock."""

    cause: str = attrs.field(validator=_cause)
    kind: WindowKind = attrs.field(converter=WindowKind)
    iteration: int = attrs.field(validator=_int)
    now_ms: int = attrs.field(validator=_non_negative_int)


@final
@attrs.frozen
class AggregationDone:
    """The driver combined every Server's partial sums for ``iteration`` and published the model.

    ``get_model_total`` / ``get_model_accept`` are the getModel requests every Server saw during the
    iteration (reported with the partial sums), for the iteration's :class:`Visits`.
    """

    cause: str = attrs.field(validator=_cause)
    iteration: int = attrs.field(validator=_int)
    now_ms: int = attrs.field(validator=_non_negative_int)
    get_model_total: int = attrs.field(default=0, validator=_non_negative_int)
    get_model_accept: int = attrs.field(default=0, validator=_non_negative_int)


@final
@attrs.frozen
class AggregationFailed:
    """The driver could not aggregate ``iteration`` (a Server lost, sizes did not verify, ...).

    The getModel counts are those of the partial sums collected before the fault (as
    :class:`AggregationDone`).
    """

    cause: str = attrs.field(validator=_cause)
    iteration: int = attrs.field(validator=_int)
    reason: str = attrs.field(validator=_str)
    now_ms: int = attrs.field(validator=_non_negative_int)
    get_model_total: int = attrs.field(default=0, validator=_non_negative_int)
    get_model_accept: int = attrs.field(default=0, validator=_non_negative_int)


@final
@attrs.frozen
class DisableRequested:
    """An operator asked to disable the instance (``/disableFLS``)."""

    cause: str = attrs.field(validator=_cause)
    now_ms: int = attrs.field(validator=_non_negative_int)


@final
@attrs.frozen
class EnableRequested:
    """An operator asked to enable the instance (``/enableFLS``)."""

    cause: str = attrs.field(validator=_cause)
    now_ms: int = attrs.field(validator=_non_negative_int)


@final
@attrs.frozen
class NewInstanceRequested:
    """``/newInstance``: start the job again with ``config`` (and ``client``, the FLPlan's values; None:
    the job's own), at the end of the running iteration or at once (spec "New instance")."""

    cause: str = attrs.field(validator=_cause)
    config: IterationConfig = attrs.field(validator=attrs.validators.instance_of(IterationConfig))
    client: ClientParams | None = attrs.field(
        validator=attrs.validators.optional(attrs.validators.instance_of(ClientParams))
    )
    now_ms: int = attrs.field(validator=_non_negative_int)


@final
@attrs.frozen
class Resumed:
    """The driver (re)started with this machine, e.g. after :meth:`IterationMachine.from_snapshot`.

    The machine answers with the instructions that put the driver back in step: an :class:`ArmWindow`
    for every armed window (with its original deadline, which may have passed) and, while aggregating,
    the :class:`AggregateIteration` again.
    """

    cause: str = attrs.field(validator=_cause)
    now_ms: int = attrs.field(validator=_non_negative_int)


Event = (
    StartFLJobReceived
    | UpdateModelReceived
    | UpdatesConfirmed
    | ServerResynced
    | WindowClosed
    | AggregationDone
    | AggregationFailed
    | DisableRequested
    | EnableRequested
    | NewInstanceRequested
    | Resumed
    | ExchangeKeysReceived
    | GetKeysReceived
    | ShareSecretsReceived
    | GetSecretsReceived
    | GetClientListReceived
    | PushListSignReceived
    | GetListSignReceived
    | ReconstructSecretsReceived
)

# ----------------------------------------------------------------------------------------- replies


@final
@attrs.frozen
class Accepted:
    """A request was accepted: ``retcode`` SUCCEED.

    Attributes:
        iteration: The iteration the device is now part of.
        data_size: The data size the device declared at startFLJob (the divisor weight of its update).
        next_req_time_ms: The ``next_req_time`` to put in the response (always after ``now_ms``).
        reason: The ``reason`` string of the response.
    """

    iteration: int
    data_size: int
    next_req_time_ms: int
    reason: str

    @property
    def retcode(self) -> ResponseCode:
        """Always :attr:`ResponseCode.SUCCEED`."""
        return ResponseCode.SUCCEED


@final
@attrs.frozen
class Rejected:
    """A request was refused; the device restarts from startFLJob at ``next_req_time_ms``."""

    retcode: ResponseCode
    reason: str
    next_req_time_ms: int


@final
@attrs.frozen
class PlainText:
    """The Server cannot serve the round at all; the body is this exact text (reference §2.1)."""

    text: str


@final
@attrs.frozen
class OperatorAnswer:
    """The answer to an operator command; ``changed`` is False when it was already so."""

    message: str
    changed: bool


Reply = Accepted | Rejected | PlainText | OperatorAnswer | CipherAnswer

# ------------------------------------------------------------------------------------ instructions


@final
@attrs.frozen
class ArmWindow:
    """Open a cancel scope that expires at ``deadline_ms`` (epoch ms), then feed :class:`WindowClosed`.

    Re-arming a window that is already armed (after :class:`Resumed`) replaces it.
    """

    cause: str
    kind: WindowKind
    iteration: int
    deadline_ms: int


@final
@attrs.frozen
class DisarmWindow:
    """Cancel that window's scope; a :class:`WindowClosed` that still arrives is ignored."""

    cause: str
    kind: WindowKind
    iteration: int


@final
@attrs.frozen
class AggregateIteration:
    """The updateModel threshold was reached: combine every Server's partial sums for ``iteration``.

    ``updates`` lists the counted (confirmed) updates (sorted by ``fl_id``). Each Server's sum must hold
    at least the ids counted for it and at most those plus its reservations
    (:meth:`IterationMachine.holdings`); the aggregate is FedAvg over exactly what the sums hold
    (spec/recovery.md §4). ``deadline_ms`` (epoch ms) is when the iteration's windows would have closed:
    an aggregation that waits for a Server that is down gives up then, and reports
    :class:`AggregationFailed`. Report :class:`AggregationDone` or :class:`AggregationFailed`.
    ``unmask`` (PW_ENCRYPT) is what the unmasking of the summed masked updates needs
    (spec/secure-aggregation.md §R6): add the noise it gives to the total before dividing.
    """

    cause: str
    iteration: int
    updates: tuple[DeviceMeta, ...]
    total_data_size: int
    deadline_ms: int | None = None
    unmask: UnmaskInputs | None = None


@final
@attrs.frozen
class DiscardPartials:
    """Every Server drops its partial sums for ``iteration`` (and ignores late folds into it)."""

    cause: str
    iteration: int


@final
@attrs.frozen
class IterationCompleted:
    """``iteration`` succeeded; its aggregate is the new model. Devices now see ``next_iteration``.

    ``visits`` is what the iteration saw (its metrics.json line).
    """

    cause: str
    iteration: int
    started_at_ms: int
    ended_at_ms: int
    next_iteration: int
    visits: Visits


@final
@attrs.frozen
class IterationFailed:
    """``iteration`` is invalid: the previous model carries over as its model (reference §3.4).

    ``started_at_ms`` is None when no device had joined it. ``consecutive_failures`` counts this one.
    ``visits`` is what the iteration saw (its metrics.json line).
    """

    cause: str
    iteration: int
    reason: str
    started_at_ms: int | None
    ended_at_ms: int
    next_iteration: int
    consecutive_failures: int
    visits: Visits


@final
@attrs.frozen
class InstanceRenewed:
    """A new instance applies: iteration 1 of ``config``; the latest model is model 0 of it on every Server,
    and devices get ``client``'s values in their FLPlan (None: the job's own)."""

    cause: str
    config: IterationConfig
    client: ClientParams | None


@final
@attrs.frozen
class InstanceStateChanged:
    """The instance state changed (persist it; tell the followers)."""

    cause: str
    old: InstanceState
    new: InstanceState


Instruction = (
    ArmWindow
    | DisarmWindow
    | AggregateIteration
    | DiscardPartials
    | IterationCompleted
    | IterationFailed
    | InstanceRenewed
    | InstanceStateChanged
)


#: What one event produced: the reply to its sender (None for non-requests) and instructions, in order
#: (the outcome type every core machine shares, :class:`flcluster.core.outcome.Outcome`).
Outcome: TypeAlias = _outcome.Outcome[Reply, Instruction]


# ---------------------------------------------------------------------------------------- snapshot


@final
@attrs.frozen(kw_only=True)
class IterationSnapshot:
    """The whole state of an :class:`IterationMachine` as plain records, for the recovery store.

    ``windows`` is in :class:`WindowKind` order, ``devices`` and ``updated`` are sorted by ``fl_id``,
    ``completed`` and ``failed`` (the iterations that ended each way) are ascending, so equal machines
    have equal snapshots. ``visits`` is what the current iteration has seen so far, and
    ``participation_levels`` the two minute thresholds its updates are bucketed by. ``reserved`` (sorted
    by ``fl_id``) are the accepted updates not yet confirmed, ``holders`` (sorted by ``fl_id``, one per
    id of ``updated``) names the Server whose sum holds each counted update, and
    ``aggregation_deadline_ms`` is the aggregation's deadline while aggregating.
    ``last_completed_updated`` (sorted) are the updates counted in the previous iteration when it
    completed: a device whose SUCCEED was lost learns from a late retry that its update is in that model.
    ``cipher`` holds the cipher rounds' lists (None without cipher rounds, or in a snapshot written before
    they were kept; spec/secure-aggregation.md §R6).
    ``client`` is the FLPlan values a new instance set (None: the job's own) and ``pending`` a new
    instance waiting for the running iteration to end.
    """

    config: IterationConfig
    iteration: int
    instance_state: InstanceState = attrs.field(converter=InstanceState)
    phase: Phase = attrs.field(converter=Phase)
    started_at_ms: int | None
    windows: tuple[ArmedWindow, ...]
    devices: tuple[DeviceMeta, ...]
    updated: tuple[str, ...]
    consecutive_failures: int
    completed: tuple[int, ...]
    failed: tuple[int, ...]
    visits: Visits
    participation_levels: tuple[int, int]
    reserved: tuple[Reservation, ...] = ()
    holders: tuple[Holding, ...] = ()
    aggregation_deadline_ms: int | None = None
    last_completed_updated: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    cipher: CipherSnapshot | None = None
    client: ClientParams | None = None
    pending: PendingInstance | None = None


# ------------------------------------------------------------------------------------------ machine


class IterationMachine:
    """The leader's iteration rules. Feed events to :meth:`handle`; do what the outcome says, in order.

    Do not reach into its state: every change goes through :meth:`handle`. Two machines are equal when
    their :meth:`snapshot` records are equal.
    """

    __slots__ = (
        "_agg_deadline",
        "_cipher",
        "_client",
        "_completed",
        "_config",
        "_consecutive_failures",
        "_devices",
        "_failed",
        "_instance",
        "_iteration",
        "_last_completed_updated",
        "_levels",
        "_pending",
        "_phase",
        "_reserved",
        "_rewrite",
        "_started_at_ms",
        "_touched",
        "_updated",
        "_visits",
        "_windows",
    )

    def __init__(self, config: IterationConfig, *, participation_levels: tuple[int, int] = (5, 15)) -> None:
        """Start a job at iteration 1 (the initial model is iteration 0), running and waiting.

        Args:
            config: The thresholds and windows.
            participation_levels: ``participation_time_level``: two minute thresholds ``0 < a < b``
                bucketing the time from a device's startFLJob to its accepted updateModel (metrics).

        Raises:
            ValueError: ``participation_levels`` is not two ints ``0 < a < b``.
        """
        _check_levels(participation_levels)
        self._config = config
        self._levels = participation_levels
        self._completed: list[int] = []
        self._failed: list[int] = []
        self._visits = Visits()
        self._iteration = 1
        self._instance = InstanceState.RUNNING
        self._phase = Phase.WAITING
        self._started_at_ms: int | None = None
        self._windows: dict[WindowKind, int] = {}
        self._devices: dict[str, DeviceMeta] = {}
        #: Counted updates: fl_id -> the Server whose sum holds it.
        self._updated: dict[str, str] = {}
        self._reserved: dict[str, Reservation] = {}
        self._agg_deadline: int | None = None
        self._consecutive_failures = 0
        #: The updates counted in the previous iteration, when it completed (empty after a failure).
        self._last_completed_updated: frozenset[str] = frozenset()
        thresholds = config.cipher_thresholds
        #: The cipher rounds' lists of this iteration (None without cipher rounds).
        self._cipher = (
            None if config.cipher is None or thresholds is None else CipherRounds(config.cipher, thresholds)
        )
        self._client: ClientParams | None = None
        self._pending: PendingInstance | None = None
        #: The per-device change log (:meth:`take_device_changes`): the fl_ids whose records changed since
        #: the last take, or ``_rewrite`` when the per-device state was replaced wholesale.
        self._touched: set[str] = set()
        self._rewrite = True

    # ---------------------------------------------------------------------------------- queries

    @property
    def config(self) -> IterationConfig:
        """The thresholds and windows this machine runs with."""
        return self._config

    @property
    def current_iteration(self) -> int:
        """The iteration devices are asked to join now (``fl_iteration_num + 1`` once finished)."""
        return self._iteration

    @property
    def state(self) -> InstanceState:
        """The instance state: running, disabled or finished."""
        return self._instance

    @property
    def phase(self) -> Phase:
        """Where the current iteration is."""
        return self._phase

    @property
    def client(self) -> ClientParams | None:
        """The FLPlan values a new instance set (None: the job's own)."""
        return self._client

    @property
    def pending(self) -> PendingInstance | None:
        """A new instance waiting for the running iteration to end, or None."""
        return self._pending

    @property
    def in_safemode(self) -> bool:
        """True while the current iteration is aggregating (between iterations, reference §3.3)."""
        return self._phase is Phase.AGGREGATING

    def counts(self) -> RoundCounts:
        """The counters of the current iteration, with their thresholds."""
        return RoundCounts(
            iteration=self._iteration,
            start_fl_job=len(self._devices),
            start_fl_job_threshold=self._config.start_fl_job_threshold,
            update_model=len(self._updated),
            update_model_threshold=self._config.update_model_threshold,
        )

    @property
    def completed(self) -> tuple[int, ...]:
        """The iterations that completed, ascending."""
        return tuple(self._completed)

    @property
    def failed(self) -> tuple[int, ...]:
        """The iterations that failed, ascending."""
        return tuple(self._failed)

    @property
    def visits(self) -> Visits:
        """What the current iteration has seen so far (for its metrics.json line)."""
        return self._visits

    def has_ended(self, iteration: int) -> bool:
        """True once ``iteration`` has completed or failed."""
        return iteration < self._iteration

    def device_meta(self, fl_id: str) -> DeviceMeta | None:
        """What ``fl_id`` declared at its startFLJob in the current iteration, or None."""
        return self._devices.get(fl_id)

    def holdings(self, server: str) -> tuple[frozenset[str], frozenset[str]]:
        """The current iteration's updates of ``server``: (counted, reserved) fl_ids."""
        counted = frozenset(f for f, s in self._updated.items() if s == server)
        reserved = frozenset(f for f, r in self._reserved.items() if r.server == server)
        return counted, reserved

    def servers_holding(self) -> frozenset[str]:
        """The Servers named by a counted or reserved update of the current iteration."""
        return frozenset(self._updated.values()) | frozenset(r.server for r in self._reserved.values())

    def cipher_state(self) -> CipherState | None:
        """The cipher rounds' lists of the current iteration (None without cipher rounds)."""
        return None if self._cipher is None else self._cipher.state()

    def client_list(self) -> tuple[str, ...] | None:
        """U3, sorted, once it is final (unmasking, no upload still being folded); else None.

        What getClientList serves; the driver checks list signatures against it (spec/secure-aggregation.md
        §R8.3).
        """
        return self._final_u3()

    def armed_windows(self) -> tuple[ArmedWindow, ...]:
        """The windows armed now, in :class:`WindowKind` order."""
        return tuple(ArmedWindow(k, self._windows[k]) for k in WindowKind if k in self._windows)

    def next_req_time_ms(self, now_ms: int) -> int:
        """The ``next_req_time`` to tell a device at ``now_ms``: always strictly after ``now_ms``.

        It is the latest moment the current iteration can still accept requests: the iteration's
        start plus ``start_fl_job_time_window + update_model_time_window`` (the original's estimate,
        reference §2.5), lowered to the global window's end and to the armed updateModel window's
        deadline when those come first. It is raised to ``now_ms + min_retry_delay_ms`` when it would
        be sooner, so a device is never told "now" or a past time (reference §8.8), and clock skew
        between Server and device has a margin. Before the iteration starts it is that minimum.
        Followers use it for the rejections they make themselves (the feature-map check).
        """
        floor = now_ms + self._config.min_retry_delay_ms
        bound = self._iteration_end_bound()
        return floor if bound is None else max(bound, floor)

    def snapshot(self) -> IterationSnapshot:
        """The whole state, as plain records (see :meth:`from_snapshot`)."""
        return attrs.evolve(
            self.snapshot_without_devices(),
            devices=tuple(self._devices[f] for f in sorted(self._devices)),
            updated=tuple(sorted(self._updated)),
            reserved=tuple(self._reserved[f] for f in sorted(self._reserved)),
            holders=tuple(Holding(f, self._updated[f]) for f in sorted(self._updated)),
            last_completed_updated=tuple(sorted(self._last_completed_updated)),
            cipher=None if self._cipher is None else self._cipher.snapshot(),
        )

    def take_device_changes(self) -> DeviceChanges:
        """The per-device records changed since the last take; the log starts afresh.

        The leader calls this once per store transaction (spec/recovery.md §3.3, §4) and writes the
        records beside :meth:`snapshot_without_devices`, so the cost of a commit grows with the devices
        it changed, not with the devices of the iteration. It changes no rule state: two machines that
        differ only in what was taken are equal.
        """
        if self._rewrite:
            ids: set[str] | frozenset[str] = self._devices.keys() | self._reserved.keys()
            ids = ids | self._updated.keys() | self._last_completed_updated
            if self._cipher is not None:
                ids = ids | self._cipher.device_ids()
        else:
            ids = self._touched
        records = tuple(self.device_record(f) for f in sorted(ids))
        changes = DeviceChanges(self._rewrite, records)
        self._rewrite = False
        self._touched = set()
        return changes

    def device_record(self, fl_id: str) -> DeviceRecord:
        """What the machine holds about ``fl_id`` (an empty record for a device it knows nothing of)."""
        return DeviceRecord(
            fl_id,
            self._devices.get(fl_id),
            self._reserved.get(fl_id),
            self._updated.get(fl_id),
            fl_id in self._last_completed_updated,
            None if self._cipher is None else self._cipher.device(fl_id),
        )

    def snapshot_without_devices(self) -> IterationSnapshot:
        """The snapshot with its per-device parts empty: the header the leader's store keeps beside its
        device rows (:meth:`take_device_changes`; spec/recovery.md §3.3)."""
        return IterationSnapshot(
            config=self._config,
            iteration=self._iteration,
            instance_state=self._instance,
            phase=self._phase,
            started_at_ms=self._started_at_ms,
            windows=self.armed_windows(),
            devices=(),
            updated=(),
            consecutive_failures=self._consecutive_failures,
            completed=tuple(self._completed),
            failed=tuple(self._failed),
            visits=self._visits,
            participation_levels=self._levels,
            aggregation_deadline_ms=self._agg_deadline,
            cipher=None if self._cipher is None else self._cipher.snapshot(devices=False),
            client=self._client,
            pending=self._pending,
        )

    @classmethod
    def from_snapshot(cls, snapshot: IterationSnapshot) -> IterationMachine:
        """Rebuild the machine a snapshot was taken from; feed it :class:`Resumed` to re-arm.

        Raises:
            ValueError: The snapshot breaks a rule no run of the machine can break (a corrupt store);
                the message names the rule and the values.
        """
        _check_snapshot(snapshot)
        machine = cls(snapshot.config, participation_levels=snapshot.participation_levels)
        machine._iteration = snapshot.iteration
        machine._instance = snapshot.instance_state
        machine._phase = snapshot.phase
        machine._started_at_ms = snapshot.started_at_ms
        machine._windows = {w.kind: w.deadline_ms for w in snapshot.windows}
        machine._devices = {d.fl_id: d for d in snapshot.devices}
        held = {h.fl_id: h.server for h in snapshot.holders}
        machine._updated = {f: held.get(f, "") for f in snapshot.updated}
        machine._reserved = {r.fl_id: r for r in snapshot.reserved}
        machine._agg_deadline = snapshot.aggregation_deadline_ms
        machine._consecutive_failures = snapshot.consecutive_failures
        machine._completed = list(snapshot.completed)
        machine._failed = list(snapshot.failed)
        machine._visits = snapshot.visits
        machine._last_completed_updated = frozenset(snapshot.last_completed_updated)
        if machine._cipher is not None:
            if snapshot.cipher is not None:
                machine._cipher.restore(snapshot.cipher)
            elif snapshot.phase is not Phase.WAITING:
                # A store written before the lists were kept (secure-aggregation §R6): they are lost.
                machine._cipher = CipherRounds(machine._cipher.config, machine._cipher.thresholds, lost=True)
        machine._client = snapshot.client
        machine._pending = snapshot.pending
        return machine

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IterationMachine):
            return NotImplemented
        return self.snapshot() == other.snapshot()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"<IterationMachine iteration={self._iteration} state={self._instance.value} "
            f"phase={self._phase.value} startFLJob={len(self._devices)}/"
            f"{self._config.start_fl_job_threshold} updateModel={len(self._updated)}/"
            f"{self._config.update_model_threshold}>"
        )

    # ----------------------------------------------------------------------------------- events

    def handle(self, event: Event) -> Outcome:
        """Apply one event; return the reply to its sender and the instructions, in order.

        When the instance state changes, an :class:`InstanceStateChanged` is the last instruction.

        Raises:
            IllegalEvent: The event is not legal now (spec "Iteration", "Illegal events"); the
                machine is unchanged.
        """
        before = self._instance
        out: list[Instruction] = []
        reply: Reply | None
        match event:
            case StartFLJobReceived():
                devices_before = len(self._devices)
                reply = self._start_fl_job(event, out)
                self._count_start_fl_job(newly_accepted=len(self._devices) > devices_before)
            case UpdateModelReceived():
                reply = self._update_model(event, out)
                if not isinstance(reply, Accepted) or not event.server:
                    self._count_update_model(event, reply)
            case UpdatesConfirmed():
                self._confirm(event.server, event.iteration, event.fl_ids, event, out)
                reply = None
            case ServerResynced():
                self._resynced(event, out)
                reply = None
            case WindowClosed():
                self._window_closed(event, out)
                reply = None
            case AggregationDone():
                self._aggregation_done(event, out)
                reply = None
            case AggregationFailed():
                self._aggregation_failed(event, out)
                reply = None
            case DisableRequested():
                reply = self._disable(event, out)
            case EnableRequested():
                reply = self._enable(event, out)
            case NewInstanceRequested():
                reply = self._new_instance(event, out)
            case Resumed():
                self._resumed(event, out)
                reply = None
            case (
                ExchangeKeysReceived()
                | GetKeysReceived()
                | ShareSecretsReceived()
                | GetSecretsReceived()
                | GetClientListReceived()
                | PushListSignReceived()
                | GetListSignReceived()
                | ReconstructSecretsReceived()
            ):
                reply = self._cipher_request(event, out)
            case _:
                assert_never(event)
        if self._instance is not before:
            out.append(InstanceStateChanged(event.cause, before, self._instance))
        return Outcome(reply, tuple(out))

    # spec "Iteration" § Visits: what each iteration saw, for its metrics.json line (reference §3.9).
    def _count_start_fl_job(self, *, newly_accepted: bool) -> None:
        # A retry answered again (its first answer was lost) is a visit, not a second accept.
        v = self._visits
        self._visits = attrs.evolve(
            v,
            start_fl_job_total=v.start_fl_job_total + 1,
            start_fl_job_accept=v.start_fl_job_accept + newly_accepted,
        )

    def _count_update_model(self, ev: UpdateModelReceived, reply: Reply) -> None:
        v = self._visits
        if not isinstance(reply, Accepted):
            self._visits = attrs.evolve(v, update_model_total=v.update_model_total + 1)
            return
        self._count_counted(Reservation(ev.fl_id, ev.server, ev.now_ms, ev.upload_loss, ev.upload_accuracy))

    def _count_rejected_reservation(self) -> None:
        v = self._visits
        self._visits = attrs.evolve(v, update_model_total=v.update_model_total + 1)

    def _count_counted(self, ev: Reservation) -> None:
        """An update counts: its visit is accepted (at reservation time, with what it reported)."""
        v = self._visits
        # The device's startFLJob of this iteration is held until the iteration ends (an accepted
        # update never ends it: aggregation does, later).
        meta = self._devices[ev.fl_id]
        minutes = (ev.at_ms - meta.accepted_at_ms) / 60_000
        level1, level2 = self._levels
        bucket = 0 if minutes < level1 else 1 if minutes < level2 else 2
        participation = tuple(n + (i == bucket) for i, n in enumerate(v.participation))
        assert len(participation) == 3
        self._visits = attrs.evolve(
            v,
            update_model_total=v.update_model_total + 1,
            update_model_accept=v.update_model_accept + 1,
            loss_sum=v.loss_sum + ev.upload_loss,
            accuracy_sum=v.accuracy_sum + ev.upload_accuracy,
            participation=(participation[0], participation[1], participation[2]),
        )

    def _count_get_model(self, ev: AggregationDone | AggregationFailed) -> None:
        v = self._visits
        self._visits = attrs.evolve(
            v,
            get_model_total=v.get_model_total + ev.get_model_total,
            get_model_accept=v.get_model_accept + ev.get_model_accept,
        )

    # spec "Iteration" § startFLJob: the checks run in the original's order (reference §2.4).
    def _start_fl_job(self, ev: StartFLJobReceived, out: list[Instruction]) -> Reply:
        if self._instance is not InstanceState.RUNNING:
            return PlainText(JOB_NOT_AVAILABLE_TEXT)
        if self._phase is Phase.AGGREGATING:
            return PlainText(SAFEMODE_TEXT)
        if self._phase is Phase.UNMASKING:
            # The devices of this iteration are unmasking its sum: nobody new can join it.
            return self._reject(REASON_START_FL_JOB_THRESHOLD, ev.now_ms)
        threshold = self._config.start_fl_job_threshold
        known = self._devices.get(ev.fl_id)
        if (
            known is not None
            and known.data_size == ev.data_size
            and ev.fl_id not in self._updated
            and ev.fl_id not in self._reserved
        ):
            # A retry of an accepted startFLJob whose answer was lost (its Server or the leader died
            # before it reached the device: spec/recovery.md §5): the same answer again, nothing
            # counted twice. The original would refuse it as a duplicate and strand the device for
            # the rest of the iteration. A repeat with another data_size is still a duplicate below.
            return Accepted(
                self._iteration,
                known.data_size,
                self.next_req_time_ms(ev.now_ms),
                REASON_START_FL_JOB_SUCCESS,
            )
        if len(self._devices) >= threshold:
            return self._reject(REASON_START_FL_JOB_THRESHOLD, ev.now_ms)
        if ev.data_size < 1:
            return self._reject(REASON_DATA_SIZE_NOT_ENOUGH, ev.now_ms)
        if ev.data_size > MAX_DATA_SIZE:
            return self._reject(REASON_DATA_SIZE_TOO_LARGE, ev.now_ms)
        if ev.fl_id in self._devices:
            return self._reject(reason_duplicate_device(ev.fl_id), ev.now_ms)

        # Accepted. Nothing above changed anything.
        now = ev.now_ms
        self._devices[ev.fl_id] = DeviceMeta(ev.fl_id, ev.data_size, now)
        self._touched.add(ev.fl_id)
        round_closes = len(self._devices) >= threshold
        if self._phase is Phase.WAITING:
            # The first accepted startFLJob starts the iteration (reference §3.2, §3.3 step 1). When it
            # is also the last (threshold 1), the startFLJob window is never armed at all.
            self._phase = Phase.RUNNING
            self._started_at_ms = now
            if not round_closes:
                self._arm(WindowKind.START_FL_JOB, now + self._config.start_fl_job_time_window, ev, out)
            self._arm(WindowKind.GLOBAL, now + self._config.global_iteration_time_window, ev, out)
        if round_closes:
            self._disarm(WindowKind.START_FL_JOB, ev, out)
            if self._cipher is not None:
                # The cipher rounds come first: their chain of windows starts here (secure-aggregation §R3).
                self._apply_step(self._cipher.start_round_closed(), ev, out)
            # Improvement over reference §8.3: the updateModel window also starts when the startFLJob
            # round closes, so a stall before the first upload fails within that window.
            elif WindowKind.UPDATE_MODEL not in self._windows:
                self._arm(WindowKind.UPDATE_MODEL, now + self._config.update_model_time_window, ev, out)
        return Accepted(
            self._iteration, ev.data_size, self.next_req_time_ms(now), REASON_START_FL_JOB_SUCCESS
        )

    # spec "Iteration" § updateModel: the admission part, in the original's order (reference §2.4).
    def _update_model(self, ev: UpdateModelReceived, out: list[Instruction]) -> Reply:
        if self._instance is not InstanceState.RUNNING:
            return PlainText(JOB_NOT_AVAILABLE_TEXT)
        if ev.iteration == self._iteration and ev.fl_id in self._updated:
            # Its update is counted: say so, even while aggregating (a device whose SUCCEED was lost,
            # spec/recovery.md §5, learns it is in; F-old would add the weights a second time, §8.1).
            return self._reject(reason_repeated_update(ev.fl_id), ev.now_ms)
        if self._phase in (Phase.AGGREGATING, Phase.UNMASKING):
            # The counter is full: no updateModel can count until the next iteration.
            return self._reject(REASON_UPDATE_MODEL_ENOUGH, ev.now_ms)
        if ev.iteration == self._iteration - 1 and ev.fl_id in self._last_completed_updated:
            # A late retry of an update that is in the previous iteration's model (its SUCCEED was lost
            # with a Server that died after committing it, spec/recovery.md §5): tell the device it is in.
            return self._reject(reason_repeated_update(ev.fl_id), ev.now_ms)
        if ev.iteration != self._iteration:
            t = self.next_req_time_ms(ev.now_ms)
            reason = reason_wrong_iteration(ev.iteration, self._iteration, t, ev.fl_id)
            return Rejected(ResponseCode.OutOfTime, reason, t)
        meta = self._devices.get(ev.fl_id)
        if meta is None:
            return self._reject(reason_device_meta_missing(ev.fl_id), ev.now_ms)
        if ev.fl_id in self._updated:
            # F-old would add these weights a second time (reference §8.1); F-new and we refuse.
            return self._reject(reason_repeated_update(ev.fl_id), ev.now_ms)
        if ev.fl_id in self._reserved:
            # Its first upload is still being folded, or its Server died before confirming it
            # (spec/recovery.md §4, §5 server.counted_not_folded): not yet known whether it is in the
            # sum. "Retry later" (the device sends the same request again); once the Server confirms
            # it the retry is a repeat, once the Server re-syncs without it the retry is accepted.
            return PlainText(SAFEMODE_TEXT)
        if self._cipher is not None and not self._cipher.may_upload(ev.fl_id):
            # Its update is masked against the devices it got the secrets (or keys) of (§R5).
            return self._reject(self._cipher.upload_refusal(ev.fl_id), ev.now_ms)

        # Accepted: reserved for the Server that folds it; it counts once that Server confirms
        # (UpdatesConfirmed). An update that names no Server is counted at once.
        now = ev.now_ms
        if ev.server:
            self._reserved[ev.fl_id] = Reservation(
                ev.fl_id, ev.server, now, ev.upload_loss, ev.upload_accuracy
            )
            self._touched.add(ev.fl_id)
            if WindowKind.UPDATE_MODEL not in self._windows:
                self._arm(WindowKind.UPDATE_MODEL, now + self._config.update_model_time_window, ev, out)
        else:
            self._updated[ev.fl_id] = ""
            self._touched.add(ev.fl_id)
            if self._updates_complete():
                self._updates_reached(ev, out)
            elif WindowKind.UPDATE_MODEL not in self._windows:
                # The first accepted updateModel starts its window (reference §3.3 step 2).
                self._arm(WindowKind.UPDATE_MODEL, now + self._config.update_model_time_window, ev, out)
        return Accepted(
            self._iteration, meta.data_size, self.next_req_time_ms(now), REASON_UPDATE_MODEL_SUCCESS
        )

    # spec/recovery.md §4: a reservation counts once its Server has committed the fold.
    def _confirm(
        self, server: str, iteration: int, fl_ids: tuple[str, ...], ev: Event, out: list[Instruction]
    ) -> None:
        if iteration != self._iteration or self._instance is InstanceState.FINISHED:
            return  # stale: that iteration ended (its sums were dropped or aggregated)
        for fl_id in fl_ids:
            r = self._reserved.get(fl_id)
            if r is None or r.server != server:
                continue  # not reserved for this Server: stale, or already counted
            del self._reserved[fl_id]
            self._updated[fl_id] = server
            self._touched.add(fl_id)
            self._count_counted(r)
        if self._phase is Phase.RUNNING and self._updates_complete():
            self._updates_reached(ev, out)

    def _resynced(self, ev: ServerResynced, out: list[Instruction]) -> None:
        if ev.iteration == self._iteration:
            self._confirm(ev.server, ev.iteration, ev.fl_ids, ev, out)
        if ev.iteration > self._iteration:
            return  # cannot hold a sum of an iteration that has not begun; its ids count for nothing
        held = set(ev.fl_ids) if ev.iteration == self._iteration else set()
        for fl_id in [f for f, r in self._reserved.items() if r.server == ev.server and f not in held]:
            del self._reserved[fl_id]
            self._touched.add(fl_id)
            self._count_rejected_reservation()
        lost = sorted(f for f, s in self._updated.items() if s == ev.server and f not in held)
        if lost and self._phase is not Phase.WAITING:
            self._fail(reason_updates_lost(ev.server, lost), ev, out)

    def _window_closed(self, ev: WindowClosed, out: list[Instruction]) -> None:
        if ev.iteration > self._iteration:
            raise IllegalEvent(
                f"window {ev.kind.value!r} closed for iteration {ev.iteration!r}, which has not begun; "
                f"the current iteration is {self._iteration!r}"
            )
        if ev.iteration < self._iteration or ev.kind not in self._windows:
            return  # stale: the timer raced a threshold or an earlier failure
        del self._windows[ev.kind]
        if self._cipher is not None and ev.kind in _CIPHER_WINDOWS:
            # A submit round closes on its quorum, or the iteration fails (secure-aggregation §R3).
            self._apply_step(self._cipher.window_closed(ev.kind.value), ev, out)
            return
        if ev.kind is WindowKind.GLOBAL:
            reason = reason_global_timeout(self._iteration)
        else:
            reason = reason_round_timeout(ev.kind)
        self._fail(reason, ev, out)

    def _aggregation_done(self, ev: AggregationDone, out: list[Instruction]) -> None:
        self._require_aggregating(ev.iteration, "AggregationDone")
        started = self._started_at_ms
        assert started is not None  # an aggregating iteration has started (checked by _check_snapshot)
        self._consecutive_failures = 0
        self._count_get_model(ev)
        self._completed.append(self._iteration)
        out.append(
            IterationCompleted(
                ev.cause, self._iteration, started, ev.now_ms, self._iteration + 1, self._visits
            )
        )
        self._advance(ev, out)

    def _aggregation_failed(self, ev: AggregationFailed, out: list[Instruction]) -> None:
        self._require_aggregating(ev.iteration, "AggregationFailed")
        self._count_get_model(ev)
        self._fail(ev.reason, ev, out)

    def _disable(self, ev: DisableRequested, out: list[Instruction]) -> Reply:
        if self._instance is InstanceState.FINISHED:
            raise IllegalEvent(MESSAGE_CANNOT_DISABLE)
        if self._instance is InstanceState.DISABLED:
            return OperatorAnswer(MESSAGE_DISABLED, changed=False)
        self._instance = InstanceState.DISABLED
        if self._phase in (Phase.RUNNING, Phase.UNMASKING):
            # Drop the running iteration (reference §3.8). A WAITING iteration has nothing to drop and
            # is kept, so disabling does not burn one of fl_iteration_num. An AGGREGATING one already
            # holds its threshold of acknowledged updates and is left to finish.
            self._fail(REASON_FORCIBLY_MOVED, ev, out)
        return OperatorAnswer(MESSAGE_DISABLED, changed=True)

    def _enable(self, ev: EnableRequested, out: list[Instruction]) -> Reply:
        if self._instance is InstanceState.FINISHED:
            raise IllegalEvent(MESSAGE_CANNOT_ENABLE)
        if self._instance is InstanceState.RUNNING:
            return OperatorAnswer(MESSAGE_ENABLED, changed=False)
        self._instance = InstanceState.RUNNING
        return OperatorAnswer(MESSAGE_ENABLED, changed=True)

    # spec "New instance" (reference §3.8).
    def _new_instance(self, ev: NewInstanceRequested, out: list[Instruction]) -> Reply:
        if self._pending is not None:
            return OperatorAnswer(MESSAGE_INSTANCE_BUSY, changed=False)
        if self._iteration == 1:
            return OperatorAnswer(MESSAGE_FIRST_ITERATION, changed=False)
        if self._phase is Phase.WAITING:  # finished, disabled or idle: nothing in flight
            self._renew(ev.config, ev.client, ev, out)
        else:
            self._pending = PendingInstance(ev.config, ev.client)
        return OperatorAnswer(MESSAGE_NEW_INSTANCE, changed=True)

    def _renew(
        self, config: IterationConfig, client: ClientParams | None, ev: Event, out: list[Instruction]
    ) -> None:
        """Start the job again at iteration 1 of ``config`` (only between iterations: WAITING)."""
        self._config = config
        self._client = client
        self._pending = None
        self._iteration = 1
        self._instance = InstanceState.RUNNING
        self._completed.clear()
        self._failed.clear()
        self._consecutive_failures = 0
        self._last_completed_updated = frozenset()
        self._rewrite = True  # the devices' last_completed marks went with the old instance
        self._touched.clear()
        out.append(InstanceRenewed(ev.cause, config, client))

    def _resumed(self, ev: Resumed, out: list[Instruction]) -> None:
        cipher = self._cipher
        # Rebuilt from a store that did not keep the keys and shares (secure-aggregation §R6).
        # STABLE_PW needs none of them once aggregating: its masks cancel in the sums the Servers hold.
        if (
            cipher is not None
            and cipher.lost
            and self._phase is not Phase.WAITING
            and not (self._phase is Phase.AGGREGATING and not cipher.pw)
        ):
            self._fail(reason_cipher_lost(), ev, out)
            return
        for w in self.armed_windows():
            out.append(ArmWindow(ev.cause, w.kind, self._iteration, w.deadline_ms))
        if self._phase is Phase.AGGREGATING:
            out.append(self._aggregate_instruction(ev.cause))

    # ---------------------------------------------------------------------------------- helpers

    def _reject(self, reason: str, now_ms: int) -> Rejected:
        return Rejected(ResponseCode.OutOfTime, reason, self.next_req_time_ms(now_ms))

    def _iteration_end_bound(self) -> int | None:
        started = self._started_at_ms
        if started is None:
            return None
        cfg = self._config
        bound = started + min(cfg.iteration_time_window, cfg.global_iteration_time_window)
        update_deadline = self._windows.get(WindowKind.UPDATE_MODEL)
        if update_deadline is None or self._cipher is not None:
            # With cipher rounds, getClientList and reconstructSecrets may follow updateModel (§R3).
            return bound
        return min(bound, update_deadline)

    def _arm(self, kind: WindowKind, deadline_ms: int, ev: Event, out: list[Instruction]) -> None:
        self._windows[kind] = deadline_ms
        out.append(ArmWindow(ev.cause, kind, self._iteration, deadline_ms))

    def _disarm(self, kind: WindowKind, ev: Event, out: list[Instruction]) -> None:
        if self._windows.pop(kind, None) is not None:
            out.append(DisarmWindow(ev.cause, kind, self._iteration))

    def _disarm_all(self, ev: Event, out: list[Instruction]) -> None:
        for kind in WindowKind:
            self._disarm(kind, ev, out)

    def _aggregate_instruction(self, cause: str) -> AggregateIteration:
        updates = tuple(self._devices[f] for f in sorted(self._updated))
        cipher = self._cipher
        unmask = cipher.unmask_inputs(self._updated) if cipher is not None and cipher.pw else None
        return AggregateIteration(
            cause, self._iteration, updates, sum(d.data_size for d in updates), self._agg_deadline, unmask
        )

    def _updates_complete(self) -> bool:
        """Whether the counted updates end the updateModel round (STABLE_PW: all of U1, §R2)."""
        cipher = self._cipher
        if cipher is not None and not cipher.pw:
            target = cipher.stable_target()
            return target is not None and len(self._updated) >= target
        return len(self._updated) >= self._config.update_model_threshold

    def _updates_reached(self, ev: Event, out: list[Instruction]) -> None:
        """The updateModel round is over: aggregate, or (PW) unmask first (secure-aggregation §R4)."""
        cipher = self._cipher
        if cipher is None or not cipher.pw:
            self._begin_aggregation(ev, out)
            return
        self._phase = Phase.UNMASKING
        for kind in (WindowKind.START_FL_JOB, *(k for k in _CIPHER_WINDOWS if k in _BEFORE_UNMASKING)):
            self._disarm(kind, ev, out)
        self._apply_step(cipher.unmasking_began(), ev, out)

    def _final_u3(self) -> tuple[str, ...] | None:
        """U3 once no upload is still being folded (secure-aggregation §R1), while unmasking; else None."""
        if self._phase not in (Phase.UNMASKING, Phase.AGGREGATING) or self._reserved:
            return None
        return tuple(sorted(self._updated))

    def _cipher_request(self, ev: CipherEvent, out: list[Instruction]) -> Reply:
        """A cipher round's request (spec/secure-aggregation.md §R5): the shared checks, then its rules."""
        cipher = check_served(self._cipher, ev.round)
        if self._instance is not InstanceState.RUNNING:
            return PlainText(JOB_NOT_AVAILABLE_TEXT)
        if ev.iteration != self._iteration:
            return self._cipher_answer(ev, Step(_verdict_out_of_time(cipher.wrong_iteration(ev.round))))
        aggregating = self._phase is Phase.AGGREGATING
        if aggregating and not isinstance(ev, ReconstructSecretsReceived):
            return PlainText(SAFEMODE_TEXT)
        running = self._phase in (Phase.WAITING, Phase.RUNNING)
        match ev:
            case ExchangeKeysReceived():
                step = (
                    cipher.exchange_keys(ev, self._devices, self._start_round_closed())
                    if running
                    else Step(_verdict_out_of_time(REASON_EXCHANGE_ENOUGH_AFTER))
                )
            case GetKeysReceived():
                step = cipher.get_keys(ev)
            case ShareSecretsReceived():
                step = (
                    cipher.share_secrets(ev)
                    if running
                    else Step(_verdict_out_of_time(REASON_SHARE_ENOUGH_AFTER))
                )
            case GetSecretsReceived():
                step = cipher.get_secrets(ev)
            case GetClientListReceived():
                step = cipher.get_client_list(ev, self._final_u3())
            case PushListSignReceived():
                step = cipher.push_list_sign(ev, self._final_u3())
            case GetListSignReceived():
                step = cipher.get_list_sign(ev, self._final_u3())
            case ReconstructSecretsReceived():
                step = cipher.reconstruct_secrets(ev, self._final_u3(), aggregating=aggregating)
            case _:
                assert_never(ev)
        reply = self._cipher_answer(ev, step)
        self._touched.add(ev.fl_id)  # its row is rewritten: the same text when nothing changed
        self._apply_step(step, ev, out)
        return reply

    def _cipher_answer(self, ev: CipherEvent, step: Step) -> CipherAnswer:
        verdict = step.verdict
        assert verdict is not None, "a cipher request always gets a verdict"
        return CipherAnswer(
            ev.round,
            verdict.retcode,
            verdict.reason,
            self._iteration,
            self.next_req_time_ms(ev.now_ms),
            verdict.keys,
            verdict.shares,
            verdict.clients,
            verdict.signatures,
        )

    def _start_round_closed(self) -> bool:
        return self._phase is not Phase.WAITING and len(self._devices) >= self._config.start_fl_job_threshold

    def _apply_step(self, step: Step, ev: Event, out: list[Instruction]) -> None:
        """Carry out a cipher step's effects on the iteration: windows, failure, aggregation."""
        for name in step.disarm:
            self._disarm(WindowKind(name), ev, out)
        if step.fail is not None:
            self._fail(step.fail, ev, out)
            return
        cfg = self._config
        assert cfg.cipher is not None
        for name in step.arm:
            kind = WindowKind(name)
            if self._phase is Phase.UNMASKING and kind not in _UNMASKING_WINDOWS:
                continue  # a late fetch of a round the iteration has moved past arms nothing
            if kind not in self._windows:
                window = (
                    cfg.update_model_time_window
                    if name == UPDATE_MODEL_WINDOW
                    else cfg.cipher.cipher_time_window
                )
                self._arm(kind, ev.now_ms + window, ev, out)
        if step.aggregate:
            self._begin_aggregation(ev, out)

    def _begin_aggregation(self, ev: Event, out: list[Instruction]) -> None:
        # Threshold reached (reference §3.3 step 2): stop every timer, enter safemode, aggregate. The
        # aggregation may wait for a Server that is down until the windows would have closed.
        bounded = (
            WindowKind.UPDATE_MODEL,
            WindowKind.GLOBAL,
            WindowKind.GET_CLIENT_LIST,
            WindowKind.PUSH_LIST_SIGN,
            WindowKind.GET_LIST_SIGN,
            WindowKind.RECONSTRUCT_SECRETS,
        )
        deadlines = [self._windows[k] for k in bounded if k in self._windows]
        self._agg_deadline = min(deadlines) if deadlines else None
        self._disarm_all(ev, out)
        self._phase = Phase.AGGREGATING
        out.append(self._aggregate_instruction(ev.cause))

    def _require_aggregating(self, iteration: int, name: str) -> None:
        if self._phase is not Phase.AGGREGATING or iteration != self._iteration:
            raise IllegalEvent(
                f"{name} for iteration {iteration!r}, but iteration {self._iteration!r} is "
                f"{self._phase.value}; only an aggregating iteration can be completed or failed this way"
            )

    def _fail(self, reason: str, ev: Event, out: list[Instruction]) -> None:
        # Reference §3.4: the iteration is invalid, its updates are discarded, the model carries over,
        # and the iteration number still advances (and counts toward fl_iteration_num).
        self._disarm_all(ev, out)
        self._consecutive_failures += 1
        self._failed.append(self._iteration)
        out.append(DiscardPartials(ev.cause, self._iteration))
        out.append(
            IterationFailed(
                ev.cause,
                self._iteration,
                reason,
                self._started_at_ms,
                ev.now_ms,
                self._iteration + 1,
                self._consecutive_failures,
                self._visits,
            )
        )
        self._advance(ev, out)

    def _advance(self, ev: Event, out: list[Instruction]) -> None:
        ended = self._iteration
        completed = bool(self._completed) and self._completed[-1] == ended
        self._last_completed_updated = frozenset(self._updated) if completed else frozenset()
        self._iteration += 1
        self._phase = Phase.WAITING
        self._started_at_ms = None
        self._windows.clear()
        self._devices.clear()
        self._updated.clear()
        self._reserved.clear()
        self._rewrite = True
        self._touched.clear()
        self._agg_deadline = None
        self._visits = Visits()
        if self._cipher is not None:
            self._cipher.reset()
        if ended >= self._config.fl_iteration_num:
            self._instance = InstanceState.FINISHED
        pending = self._pending
        if pending is not None:
            # The iteration that ended is the last of this instance: the devices move to iteration 1.
            ending = out[-1]
            assert isinstance(ending, IterationCompleted | IterationFailed)
            out[-1] = attrs.evolve(ending, next_iteration=1)
            self._renew(pending.config, pending.client, ev, out)


#: The windows of the cipher rounds (spec/secure-aggregation.md §R3).
_CIPHER_WINDOWS = (
    WindowKind.EXCHANGE_KEYS,
    WindowKind.GET_KEYS,
    WindowKind.SHARE_SECRETS,
    WindowKind.GET_SECRETS,
    WindowKind.GET_CLIENT_LIST,
    WindowKind.PUSH_LIST_SIGN,
    WindowKind.GET_LIST_SIGN,
    WindowKind.RECONSTRUCT_SECRETS,
)
#: The windows an unmasking iteration may arm.
_UNMASKING_WINDOWS = frozenset(_CIPHER_WINDOWS[4:])
#: The cipher windows of the rounds before updateModel, disarmed when the unmasking starts.
_BEFORE_UNMASKING = frozenset(_CIPHER_WINDOWS[:4])
#: exchangeKeys / shareSecrets after their round (the unmasking) began.
REASON_EXCHANGE_ENOUGH_AFTER = "Current amount for exchangeKey is enough. Please retry later."
REASON_SHARE_ENOUGH_AFTER = "Current amount for ShareSecretsKernel is enough."


def _verdict_out_of_time(reason: str) -> Verdict:
    return Verdict(ResponseCode.OutOfTime, reason)


def _check_levels(levels: tuple[int, int]) -> None:
    ok = (
        isinstance(levels, tuple)
        and len(levels) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in levels)
        and 0 < levels[0] < levels[1]
    )
    if not ok:
        raise ValueError(f"participation_levels must be two ints 0 < a < b (minutes), got {levels!r}")


def _check_snapshot(s: IterationSnapshot) -> None:
    """Refuse a snapshot that no run of the machine can produce (see spec "Iteration", invariants)."""
    cfg = s.config
    problems: list[str] = []

    def rule(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    rule(
        isinstance(s.iteration, int) and not isinstance(s.iteration, bool) and s.iteration >= 1,
        f"iteration must be an int >= 1, got {s.iteration!r}",
    )
    rule(s.consecutive_failures >= 0, f"consecutive_failures must be >= 0, got {s.consecutive_failures!r}")
    rule(
        s.cipher is None or cfg.cipher is not None,
        "the snapshot holds cipher lists but its config runs no cipher rounds",
    )
    ended = sorted((*s.completed, *s.failed))
    rule(
        isinstance(s.iteration, int) and ended == list(range(1, s.iteration)),
        f"completed {s.completed!r} and failed {s.failed!r} must together hold each iteration before "
        f"{s.iteration!r} exactly once",
    )
    rule(
        list(s.completed) == sorted(s.completed) and list(s.failed) == sorted(s.failed),
        f"completed {s.completed!r} and failed {s.failed!r} must be ascending",
    )
    trailing = 0
    for n in range(s.iteration - 1, 0, -1):
        if n not in s.failed:
            break
        trailing += 1
    rule(
        s.consecutive_failures == trailing,
        f"consecutive_failures {s.consecutive_failures!r} must count the failed iterations just before "
        f"{s.iteration!r} ({trailing})",
    )
    v = s.visits
    rule(
        0 <= v.start_fl_job_accept <= v.start_fl_job_total
        and 0 <= v.update_model_accept <= v.update_model_total
        and 0 <= v.get_model_accept <= v.get_model_total,
        f"visits accept no more requests than they count, and none is negative: {v!r}",
    )
    rule(
        len(s.devices) == v.start_fl_job_accept and len(s.updated) == v.update_model_accept,
        f"visits {v!r} must count the {len(s.devices)} devices and {len(s.updated)} updates held",
    )
    rule(
        len(v.participation) == 3 and sum(v.participation) == v.update_model_accept,
        f"visits participation {v.participation!r} must bucket the {v.update_model_accept} accepted updates",
    )
    try:
        _check_levels(s.participation_levels)
    except ValueError as exc:
        problems.append(str(exc))
    fl_ids = [d.fl_id for d in s.devices]
    reserved = [r.fl_id for r in s.reserved]
    rule(len(set(reserved)) == len(reserved), f"reserved repeats an fl_id: {reserved!r}")
    rule(
        set(reserved) <= set(fl_ids) and not set(reserved) & set(s.updated),
        f"reserved {reserved!r} must name devices of this iteration, none of them counted ({s.updated!r})",
    )
    rule(
        [h.fl_id for h in s.holders] in ([], sorted(s.updated)),
        f"holders {s.holders!r} must name the Server of each counted update {s.updated!r}",
    )
    rule(
        (s.aggregation_deadline_ms is None) or s.phase is Phase.AGGREGATING,
        f"only an aggregating iteration has an aggregation deadline, got {s.aggregation_deadline_ms!r}",
    )
    rule(
        s.pending is None or s.phase is not Phase.WAITING,
        "a new instance pending while no iteration runs would have applied",
    )
    rule(len(set(fl_ids)) == len(fl_ids), f"devices repeat an fl_id: {fl_ids!r}")
    rule(len(set(s.updated)) == len(s.updated), f"updated repeats an fl_id: {s.updated!r}")
    rule(set(s.updated) <= set(fl_ids), f"updated {s.updated!r} names devices not in devices {fl_ids!r}")
    for d in s.devices:
        rule(1 <= d.data_size <= MAX_DATA_SIZE, f"device {d.fl_id!r} has data_size {d.data_size!r}")
    kinds = [w.kind for w in s.windows]
    rule(len(set(kinds)) == len(kinds), f"a window is armed twice: {kinds!r}")
    armed = set(kinds)
    n_dev, n_upd, n_res = len(s.devices), len(s.updated), len(s.reserved)
    finished = s.instance_state is InstanceState.FINISHED
    rule(
        finished == (s.iteration > cfg.fl_iteration_num),
        f"instance_state {s.instance_state.value!r} does not fit iteration {s.iteration!r} of "
        f"fl_iteration_num {cfg.fl_iteration_num!r}",
    )
    match s.phase:
        case Phase.WAITING:
            rule(
                n_dev == 0 and n_upd == 0 and n_res == 0 and not armed and s.started_at_ms is None,
                "a waiting iteration has no devices, updates, windows or start time",
            )
        case Phase.RUNNING:
            rule(
                not finished and s.instance_state is not InstanceState.DISABLED,
                f"only a running instance has a running iteration, got {s.instance_state.value!r}",
            )
            rule(s.started_at_ms is not None, "a running iteration has a start time")
            rule(
                1 <= n_dev <= cfg.start_fl_job_threshold,
                f"a running iteration has 1..{cfg.start_fl_job_threshold} devices, got {n_dev}",
            )
            stable = cfg.cipher is not None and cfg.cipher.mode is CipherMode.STABLE_PW
            rule(
                n_upd < cfg.update_model_threshold or (stable and n_upd < n_dev),
                f"a running iteration has fewer than {cfg.update_model_threshold} updates (STABLE_PW: fewer "
                f"than its devices), got {n_upd}",
            )
            rule(WindowKind.GLOBAL in armed, "a running iteration has its global window armed")
            rule(
                (WindowKind.START_FL_JOB in armed) == (n_dev < cfg.start_fl_job_threshold),
                "the startFLJob window is armed exactly while its round is open",
            )
            rule(
                cfg.cipher is not None
                or (WindowKind.UPDATE_MODEL in armed)
                >= (n_upd > 0 or n_res > 0 or n_dev >= cfg.start_fl_job_threshold),
                "the updateModel window is armed once an update was accepted or startFLJob closed",
            )
            rule(
                cfg.cipher is not None or not armed & set(_CIPHER_WINDOWS),
                f"only a job with cipher rounds arms their windows, got {kinds!r}",
            )
        case Phase.AGGREGATING:
            rule(not finished, "a finished instance has no aggregating iteration")
            rule(s.started_at_ms is not None, "an aggregating iteration has a start time")
            rule(
                n_upd >= cfg.update_model_threshold,
                f"an aggregating iteration has at least {cfg.update_model_threshold} updates, got {n_upd}",
            )
            rule(
                n_dev <= cfg.start_fl_job_threshold,
                f"an aggregating iteration has at most {cfg.start_fl_job_threshold} devices, got {n_dev}",
            )
            rule(not armed, f"an aggregating iteration has no armed window, got {kinds!r}")
        case Phase.UNMASKING:
            pw = cfg.cipher is not None and cfg.cipher.mode is CipherMode.PW
            rule(pw, "only a PW_ENCRYPT job has an unmasking phase")
            rule(
                not finished and s.instance_state is not InstanceState.DISABLED,
                f"only a running instance unmasks, got {s.instance_state.value!r}",
            )
            rule(s.started_at_ms is not None, "an unmasking iteration has a start time")
            rule(
                n_upd >= cfg.update_model_threshold,
                f"an unmasking iteration has at least {cfg.update_model_threshold} updates, got {n_upd}",
            )
            rule(
                armed <= {WindowKind.GLOBAL, *_UNMASKING_WINDOWS},
                f"an unmasking iteration arms only the global, getClientList, pushListSign, getListSign and "
                f"reconstructSecrets windows, got {kinds!r}",
            )
        case _:
            assert_never(s.phase)
    if problems:
        raise ValueError("inconsistent IterationSnapshot: " + "; ".join(problems))


# ------------------------------------------------------------------------------- snapshot as JSON


_PLAIN = (str, int, float, bool, type(None))


_FIELD_NAMES: dict[type, tuple[str, ...] | None] = {}


def _field_names(cls: type) -> tuple[str, ...] | None:
    """The attrs field names of ``cls`` (``None`` for a class that is not a record), looked up once."""
    if cls not in _FIELD_NAMES:
        _FIELD_NAMES[cls] = tuple(f.name for f in attrs.fields(cls)) if attrs.has(cls) else None
    return _FIELD_NAMES[cls]


def _json_value(value: object) -> object:
    # On the leader's commit path (a snapshot per transaction, spec/recovery.md §4): kept lean.
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, CipherDevice):
        return [value.fl_id, *value.to_json_value()]
    names = _field_names(type(value))
    if names is None:
        return value
    return {name: _json_value(getattr(value, name)) for name in names}


def snapshot_to_json(snapshot: IterationSnapshot) -> str:
    """The snapshot as JSON text (what the leader keeps in ``ServerState.machine``, spec/recovery.md §3.3)."""
    return json.dumps(_json_value(snapshot), separators=(",", ":"))


def _record(cls: type[_R], data: object) -> _R:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} must be a JSON object, got {data!r:.80}")
    names = {f.name for f in attrs.fields(cls)}  # type: ignore[arg-type]
    if set(data) - names:
        raise ValueError(f"{cls.__name__} has unknown fields {sorted(set(data) - names)!r}")
    return cls(**data)


_R = typing.TypeVar("_R")


def _cipher_snapshot(data: object) -> CipherSnapshot | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"cipher must be a JSON object, got {data!r:.80}")
    d = dict(data)
    d["devices"] = tuple(CipherDevice.from_json_value(x[0], x[1:]) for x in d.get("devices", ()))
    return _record(CipherSnapshot, d)


def snapshot_from_json(text: str) -> IterationSnapshot:
    """The snapshot :func:`snapshot_to_json` wrote (checked as :meth:`IterationMachine.from_snapshot` does).

    Raises:
        ValueError: the text is not such a snapshot (the message says what is wrong).
    """
    snapshot = snapshot_part_from_json(text)
    _check_snapshot(snapshot)
    return snapshot


def snapshot_part_from_json(text: str) -> IterationSnapshot:
    """The records of :func:`snapshot_to_json`'s text, without the checks of a whole snapshot: for a
    header whose per-device parts are kept elsewhere (:mod:`flcluster.core.device_rows`).

    Raises:
        ValueError: the text is not such a snapshot's JSON (the message says what is wrong).
    """
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"an IterationSnapshot must be a JSON object, got {text!r:.80}")
        d = dict(data)
        config = d.get("config")
        if isinstance(config, dict):
            config = {"cipher": None, **config}  # a snapshot written before the cipher rounds existed
        d["config"] = _record(IterationConfig, config)
        d["windows"] = tuple(_record(ArmedWindow, w) for w in d.get("windows", ()))
        d["devices"] = tuple(_record(DeviceMeta, x) for x in d.get("devices", ()))
        d["reserved"] = tuple(_record(Reservation, x) for x in d.get("reserved", ()))
        d["holders"] = tuple(_record(Holding, x) for x in d.get("holders", ()))
        if d.get("client") is not None:
            d["client"] = _record(ClientParams, d["client"])
        if d.get("pending") is not None:
            pending = dict(d["pending"])
            pending["config"] = _record(IterationConfig, pending.get("config"))
            if pending.get("client") is not None:
                pending["client"] = _record(ClientParams, pending["client"])
            d["pending"] = _record(PendingInstance, pending)
        visits = dict(d.get("visits", {}))
        visits["participation"] = tuple(visits.get("participation", (0, 0, 0)))
        d["visits"] = _record(Visits, visits)
        for key in ("updated", "completed", "failed", "participation_levels"):
            d[key] = tuple(d.get(key, ()))
        d["cipher"] = _cipher_snapshot(d.get("cipher"))
        return _record(IterationSnapshot, d)
    except (TypeError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"not an IterationSnapshot: {exc}") from None
