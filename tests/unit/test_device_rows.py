"""The leader's machine as header plus device rows (flcluster/core/device_rows.py, spec/recovery.md §3.3)."""

from __future__ import annotations

import attrs
import pytest

from flcluster.core.device_rows import header_json, record_from_json, record_json, snapshot_from_rows
from flcluster.core.iteration import (
    AggregationDone,
    DeviceRecord,
    IterationMachine,
    StartFLJobReceived,
    UpdateModelReceived,
    UpdatesConfirmed,
    snapshot_to_json,
)
from tests.unit.stored_machine import StoredMachine
from tests.unit.test_core_reservations import CONFIG, T0

DEVICES = [f"dev-{i:04d}" for i in range(200)]


def big_machine() -> IterationMachine:
    m = IterationMachine(attrs.evolve(CONFIG, start_fl_job_threshold=400))
    for f in DEVICES:
        m.handle(StartFLJobReceived("s", f, 3, T0))
    return m


def test_a_commit_writes_the_rows_of_the_devices_it_changed_only() -> None:
    m = big_machine()
    first = m.take_device_changes()
    assert first.rewrite and len(first.records) == len(DEVICES)
    m.handle(UpdateModelReceived("u", DEVICES[7], 1, T0, server="S1"))
    m.handle(StartFLJobReceived("s", "late", 3, T0))
    changes = m.take_device_changes()
    assert not changes.rewrite
    assert [r.fl_id for r in changes.records] == sorted([DEVICES[7], "late"])
    assert m.take_device_changes().records == ()  # nothing changed since
    # The header does not grow with the devices.
    assert len(header_json(m.snapshot_without_devices())) < 2_000 < len(snapshot_to_json(m.snapshot()))


def test_the_move_to_the_next_iteration_rewrites_the_rows_keeping_the_last_completed() -> None:
    m = IterationMachine(CONFIG)
    stored = StoredMachine()
    for f in ("a", "b", "c", "d"):
        m.handle(StartFLJobReceived("s", f, 3, T0))
    for f in ("a", "b"):
        m.handle(UpdateModelReceived("u", f, 1, T0, server="S1"))
    m.handle(UpdatesConfirmed("c", "S1", 1, ("a", "b"), T0))
    stored.commit(m)
    m.handle(AggregationDone("agg", 1, T0 + 10))
    changes = m.take_device_changes()
    assert changes.rewrite
    assert changes.records == (DeviceRecord("a", last_completed=True), DeviceRecord("b", last_completed=True))
    m2 = IterationMachine.from_snapshot(m.snapshot())  # a restored machine rewrites its rows at once
    stored.commit(m2)
    assert stored.restored() == m
    assert [fl_id for fl_id, _ in stored.contents.devices] == ["a", "b"]


def test_a_whole_snapshot_without_rows_is_read_as_it_is() -> None:
    m = big_machine()  # a store of schema version 3 kept the machine whole in its header
    assert IterationMachine.from_snapshot(snapshot_from_rows(snapshot_to_json(m.snapshot()), ())) == m


def test_a_record_round_trips_and_a_damaged_row_is_refused_by_device() -> None:
    m = big_machine()
    m.handle(UpdateModelReceived("u", DEVICES[3], 1, T0, 0.5, 0.25, server="S2"))
    record = m.device_record(DEVICES[3])
    assert record_from_json(record.fl_id, record_json(record)) == record
    assert m.device_record("nobody").empty
    for damaged in ("", "[1,2", '{"a": 1}', "[[1],null,null,false]", '[null,null,null,"yes"]'):
        with pytest.raises(ValueError, match="the row of device 'dev-0003'"):
            record_from_json("dev-0003", damaged)
