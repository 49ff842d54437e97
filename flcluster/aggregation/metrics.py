"""``metrics.json``: one JSON line per iteration with the original's keys (spec/aggregation.md, "Metrics").

The line is what the original's ``IterationMetrics::Summarize`` writes (nlohmann::json: keys in sorted
order, compact separators), built from an :class:`IterationMetrics` record that the caller fills in; the
caller owns the clock and passes times as epoch milliseconds. Times are written as local time
``YYYY-mm-dd HH:MM:SS.mmm`` like the original (a ``tz`` may be given instead). JSON has no NaN or Inf, so a
non-finite loss or accuracy is written as ``null`` rather than as invalid JSON.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, TypeAlias

import attrs

InstanceStatus: TypeAlias = Literal["running", "disable", "finish"]
"""The original's ``instanceStatus`` values (kRunning, kDisable, kFinish)."""

_STATUSES = ("running", "disable", "finish")

_count = attrs.field(default=0, validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)])


@attrs.frozen
class ClientVisitedInfo:
    """The ``clientVisitedInfo`` counters of one iteration, summed over all Servers."""

    start_fl_job_total: int = _count
    start_fl_job_accept: int = _count
    start_fl_job_reject: int = _count
    update_model_total: int = _count
    update_model_accept: int = _count
    update_model_reject: int = _count
    get_model_total: int = _count
    get_model_accept: int = _count
    get_model_reject: int = _count
    participation_time_level1: int = _count
    participation_time_level2: int = _count
    participation_time_level3: int = _count

    def to_json_dict(self) -> dict[str, int]:
        """The counters under the original's key names."""
        return {
            "startFLJobTotalClientNum": self.start_fl_job_total,
            "startFLJobAcceptClientNum": self.start_fl_job_accept,
            "startFLJobRejectClientNum": self.start_fl_job_reject,
            "updateModelTotalClientNum": self.update_model_total,
            "updateModelAcceptClientNum": self.update_model_accept,
            "updateModelRejectClientNum": self.update_model_reject,
            "getModelTotalClientNum": self.get_model_total,
            "getModelAcceptClientNum": self.get_model_accept,
            "getModelRejectClientNum": self.get_model_reject,
            "participationTimeLevel1": self.participation_time_level1,
            "participationTimeLevel2": self.participation_time_level2,
            "participationTimeLevel3": self.participation_time_level3,
        }


def format_time_ms(epoch_ms: int, tz: dt.tzinfo | None = None) -> str:
    """``YYYY-mm-dd HH:MM:SS.mmm`` for epoch milliseconds in ``tz`` (default: local, as the original)."""
    seconds, millis = divmod(epoch_ms, 1000)
    when = dt.datetime.fromtimestamp(seconds, tz=tz)
    return f"{when:%Y-%m-%d %H:%M:%S}.{millis:03d}"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


_non_negative_int = [attrs.validators.instance_of(int), attrs.validators.ge(0)]


@attrs.frozen
class IterationMetrics:
    """What the leader records when an iteration ends (the original's ``metrics.json`` line).

    Attributes:
        instance_name: the instance (job run) name.
        start_time_ms: when the iteration started, epoch ms.
        end_time_ms: when it ended, epoch ms.
        fl_name: the job name.
        instance_status: ``running``, ``disable`` or ``finish``.
        fl_iteration_num: the configured number of iterations.
        current_iteration: the iteration that ended.
        metrics_auc: accuracy reported for the iteration.
        metrics_loss: the clients' summed upload_loss ÷ update_model_threshold.
        iteration_execution_time_ms: how long the iteration ran.
        client_visited_info: the per-round client counters.
        iteration_result: ``True`` for success, ``False`` for a failed iteration.
    """

    instance_name: str = attrs.field(validator=attrs.validators.instance_of(str))
    start_time_ms: int = attrs.field(validator=_non_negative_int)
    end_time_ms: int = attrs.field(validator=_non_negative_int)
    fl_name: str = attrs.field(validator=attrs.validators.instance_of(str))
    instance_status: InstanceStatus = attrs.field(validator=attrs.validators.in_(_STATUSES))
    fl_iteration_num: int = attrs.field(validator=_non_negative_int)
    current_iteration: int = attrs.field(validator=_non_negative_int)
    metrics_auc: float = attrs.field(converter=float)
    metrics_loss: float = attrs.field(converter=float)
    iteration_execution_time_ms: int = attrs.field(validator=_non_negative_int)
    client_visited_info: ClientVisitedInfo = attrs.field(
        factory=ClientVisitedInfo, validator=attrs.validators.instance_of(ClientVisitedInfo)
    )
    iteration_result: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))

    def to_json_dict(self, tz: dt.tzinfo | None = None) -> dict[str, Any]:
        """The line's JSON object under the original's keys (times formatted in ``tz``, default local)."""
        return {
            "instanceName": self.instance_name,
            "startTime": format_time_ms(self.start_time_ms, tz),
            "endTime": format_time_ms(self.end_time_ms, tz),
            "flName": self.fl_name,
            "instanceStatus": self.instance_status,
            "flIterationNum": self.fl_iteration_num,
            "currentIteration": self.current_iteration,
            "metricsAuc": _finite_or_none(self.metrics_auc),
            "metricsLoss": _finite_or_none(self.metrics_loss),
            "iterationExecutionTime": self.iteration_execution_time_ms,
            "clientVisitedInfo": self.client_visited_info.to_json_dict(),
            "iterationResult": "success" if self.iteration_result else "fail",
        }

    def to_json_line(self, tz: dt.tzinfo | None = None) -> str:
        """One line as the original writes it: sorted keys, compact, ending in a newline."""
        text = json.dumps(self.to_json_dict(tz), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return text + "\n"


class MetricsWriter:
    """Appends one :class:`IterationMetrics` line per iteration to a file (``metrics.json``)."""

    def __init__(self, path: str | os.PathLike[str], *, tz: dt.tzinfo | None = None) -> None:
        """Write to ``path`` (its directory is created on first write); times in ``tz``, default local."""
        self._path = Path(path)
        self._tz = tz

    @property
    def path(self) -> Path:
        """The metrics file."""
        return self._path

    def write(self, metrics: IterationMetrics) -> None:
        """Append the line for one iteration and fsync it (one ``write`` call, so lines never interleave)."""
        data = metrics.to_json_line(self._tz).encode()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write to {os.fspath(self._path)!r}: {written} of {len(data)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)
