"""The device-side log of a drill: one JSON line per answer a drill device got (or failed to get).

Theory of operation
-------------------
The drills check the cluster against what the *devices* saw, never against what the cluster says about
itself. Every request a drill device sends ends in exactly one :class:`LogEntry`, appended to a JSONL file
and flushed at once (a drill that dies half-way still leaves a readable log):

- ``op``: ``startFLJob``, ``updateModel`` or ``getModel``;
- ``iteration``: for startFLJob the iteration the Server answered (when it answered one), else the
  iteration the device aimed at; for updateModel the iteration of the update; for getModel the one asked;
- ``data_size``: the data size the device declared at the startFLJob this request belongs to;
- ``retcode``: the ``ResponseCode`` name (``SUCCEED``, ``OutOfTime``, ...), or ``text`` for one of the
  Server's plain texts, ``transport`` for no HTTP answer, ``http`` for another status;
- ``reason``: the answer's reason or text, or the error;
- ``time``: epoch seconds when the answer (or the error) came;
- ``server``: the base URL it went to;
- ``digest``: updateModel only, :func:`recovery.updates.digest` of the upload.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

import attrs

__all__ = ["DeviceLog", "LogEntry", "read_log"]

#: ``retcode`` values that are not a ``ResponseCode`` name.
TEXT = "text"
TRANSPORT = "transport"
HTTP = "http"


@attrs.frozen
class LogEntry:
    """One answer a drill device got (see the module docstring for the fields)."""

    fl_id: str
    op: str
    iteration: int
    data_size: int
    retcode: str
    reason: str = ""
    time: float = 0.0
    server: str = ""
    digest: str = ""

    def to_json(self) -> str:
        """The entry as one compact JSON line (no newline)."""
        return json.dumps(attrs.asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> LogEntry:
        """Parse one line written by :meth:`to_json`."""
        data: dict[str, Any] = json.loads(line)
        return cls(**data)


class DeviceLog:
    """An append-only JSONL device log; every entry is flushed as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, entry: LogEntry) -> None:
        """Append ``entry`` and flush."""
        self._file.write(entry.to_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> DeviceLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: Path) -> list[LogEntry]:
    """Every entry of a device log, in the order written (a last line cut short is left out)."""
    entries: list[LogEntry] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entries.append(LogEntry.from_json(line))
        except (json.JSONDecodeError, TypeError) as exc:
            if number == len(lines):
                break  # the writer died mid-line
            raise ValueError(f"{path}:{number}: not a device-log entry ({exc}): {line[:200]!r}") from exc
    return entries
