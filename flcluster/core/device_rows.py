"""The leader's iteration machine as its store keeps it: a small header and one row per device.

Theory of operation (spec/recovery.md §3.3, §4)
-----------------------------------------------
The leader commits its machine before it answers any accepted count, once per store transaction (group
commit). Written whole, the machine grows with the devices of the iteration: at 1,000 devices the JSON
of one snapshot is ~100 KB, and writing it once per transaction cost a third of a Server's CPU under
load. So the store keeps it in two parts:

- the **header**, :meth:`~flcluster.core.iteration.IterationMachine.snapshot_without_devices` as JSON
  (:func:`header_json`): configuration, iteration, phase, windows, counters; a few hundred bytes,
  rewritten in every transaction;
- one **row per device**, a :class:`~flcluster.core.iteration.DeviceRecord` as JSON
  (:func:`record_json`), keyed by ``fl_id``: each transaction writes only the rows of the devices it
  changed, as :meth:`~flcluster.core.iteration.IterationMachine.take_device_changes` reports them, and
  deletes them all when the per-device state was replaced wholesale (the move to the next iteration).

:func:`snapshot_from_rows` puts the two back together into the
:class:`~flcluster.core.iteration.IterationSnapshot` the machine is restored from. A header written whole
(a store of schema version 3, before the rows) is read as it is, its own per-device parts included.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import attrs

from flcluster.core.iteration import (
    DeviceMeta,
    DeviceRecord,
    Holding,
    IterationSnapshot,
    Reservation,
    snapshot_part_from_json,
    snapshot_to_json,
)

__all__ = ["header_json", "record_from_json", "record_json", "snapshot_from_rows"]


def header_json(header: IterationSnapshot) -> str:
    """The header as the store keeps it (``ServerState.machine``): the snapshot without per-device parts."""
    return snapshot_to_json(header)


def record_json(record: DeviceRecord) -> str:
    """One device's row (``fl_id`` is the row's key, not repeated in the text)."""
    meta, r = record.meta, record.reservation
    return json.dumps(
        [
            None if meta is None else [meta.data_size, meta.accepted_at_ms],
            None if r is None else [r.server, r.at_ms, r.upload_loss, r.upload_accuracy],
            record.holder,
            record.last_completed,
        ],
        separators=(",", ":"),
    )


def record_from_json(fl_id: str, text: str) -> DeviceRecord:
    """The record :func:`record_json` wrote for ``fl_id``.

    Raises:
        ValueError: the text is not such a row (the message names the device and what is wrong).
    """
    try:
        meta, reservation, holder, last_completed = json.loads(text)
        return DeviceRecord(
            fl_id,
            None if meta is None else DeviceMeta(fl_id, *meta),
            None if reservation is None else Reservation(fl_id, *reservation),
            holder,
            last_completed,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"the row of device {fl_id!r} is not a device record ({exc}): {text!r:.80}"
        ) from None


def snapshot_from_rows(header_text: str, rows: Iterable[tuple[str, str]]) -> IterationSnapshot:
    """The machine's snapshot from its header and its device rows ``(fl_id, text)``.

    :meth:`~flcluster.core.iteration.IterationMachine.from_snapshot` checks the whole put back together.

    Raises:
        ValueError: the header or a row is damaged.
    """
    header = snapshot_part_from_json(header_text)
    devices = {d.fl_id: d for d in header.devices}
    reserved = {r.fl_id: r for r in header.reserved}
    holders = {h.fl_id: h.server for h in header.holders}
    updated = {f: holders.get(f, "") for f in header.updated}
    last = set(header.last_completed_updated)
    for fl_id, text in rows:
        record = record_from_json(fl_id, text)
        if record.meta is not None:
            devices[fl_id] = record.meta
        if record.reservation is not None:
            reserved[fl_id] = record.reservation
        if record.holder is not None:
            updated[fl_id] = record.holder
        if record.last_completed:
            last.add(fl_id)
    return attrs.evolve(
        header,
        devices=tuple(devices[f] for f in sorted(devices)),
        updated=tuple(sorted(updated)),
        reserved=tuple(reserved[f] for f in sorted(reserved)),
        holders=tuple(Holding(f, updated[f]) for f in sorted(updated)),
        last_completed_updated=tuple(sorted(last)),
    )
