"""The drills' own machinery (recovery/updates.py, devicelog.py, checks.py): it must be able to fail."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from flcluster.core.iteration import reason_repeated_update
from recovery.checks import (
    Ack,
    acknowledged_updates,
    check_device_log,
    check_models,
    compare_model,
    fedavg,
    read_metrics,
)
from recovery.devicelog import TRANSPORT, DeviceLog, LogEntry, read_log
from recovery.updates import data_size, device_id, device_index, digest, update

SIZES = {"conv.w": 6, "fc.b": 3}
SEED = 11


def _entries(iteration: int, devices: range, *, retcode: str = "SUCCEED") -> list[LogEntry]:
    out = []
    for d in devices:
        ds = data_size(SEED, d, iteration)
        fl_id = device_id(d)
        dig = digest(update(SIZES, SEED, d, iteration, ds))
        out.append(LogEntry(fl_id, "startFLJob", iteration, ds, "SUCCEED"))
        out.append(LogEntry(fl_id, "updateModel", iteration, ds, retcode, digest=dig))
    return out


def _manual_fedavg(iteration: int, devices: range) -> dict[str, np.ndarray]:
    num = {name: np.zeros(size) for name, size in SIZES.items()}
    den = 0
    for d in devices:
        ds = data_size(SEED, d, iteration)
        rng = np.random.default_rng((SEED, d, iteration))
        for name, size in SIZES.items():
            num[name] += (rng.random(size, dtype=np.float32) * np.float32(ds)).astype(np.float64)
        den += ds
    return {name: values / den for name, values in num.items()}


def test_seeded_updates_are_deterministic_and_distinct() -> None:
    a = update(SIZES, SEED, 3, 2, 5)
    b = update(SIZES, SEED, 3, 2, 5)
    assert all(np.array_equal(a[n], b[n]) for n in SIZES)
    assert digest(a) == digest(b)
    assert digest(a) != digest(update(SIZES, SEED, 3, 3, 5))
    assert digest(a) != digest(update(SIZES, SEED, 4, 2, 5))
    assert digest(a) != digest(update(SIZES, SEED + 1, 3, 2, 5))
    assert data_size(SEED, 3, 2) == data_size(SEED, 3, 2)
    assert {data_size(SEED, d, 1) for d in range(50)} <= set(range(1, 65))
    assert len({data_size(SEED, d, 1) for d in range(50)}) > 5
    assert device_index(device_id(42)) == 42
    with pytest.raises(ValueError):
        device_index("bench-00000042")


def test_fedavg_from_the_log_is_the_weighted_mean_of_the_acknowledged_updates() -> None:
    acks = acknowledged_updates(_entries(1, range(5)))
    got = fedavg(acks[1], SIZES, SEED)
    want = _manual_fedavg(1, range(5))
    assert all(np.allclose(got[n], want[n], rtol=0, atol=1e-12) for n in SIZES)
    # Leaving one update out changes it beyond the tolerance.
    fewer = fedavg(acks[1][:4], SIZES, SEED)
    assert compare_model(fewer, want) is not None


def test_only_acknowledged_updates_count() -> None:
    rejected = [
        LogEntry(device_id(9), "startFLJob", 1, 3, "SUCCEED"),
        LogEntry(
            device_id(9), "updateModel", 1, 3, "OutOfTime", reason="UpdateModel iteration number is invalid"
        ),
    ]
    lost_then_repeated = [
        LogEntry(device_id(7), "startFLJob", 1, 4, "SUCCEED"),
        LogEntry(device_id(7), "updateModel", 1, 4, TRANSPORT, reason="ReadError"),
        LogEntry(device_id(7), "updateModel", 1, 4, "OutOfTime", reason=reason_repeated_update(device_id(7))),
    ]
    repeated_without_loss = [
        LogEntry(device_id(8), "startFLJob", 1, 4, "SUCCEED"),
        LogEntry(device_id(8), "updateModel", 1, 4, "OutOfTime", reason=reason_repeated_update(device_id(8))),
    ]
    acks = acknowledged_updates(
        [*_entries(1, range(2)), *rejected, *lost_then_repeated, *repeated_without_loss]
    )
    assert [(a.fl_id, a.how) for a in acks[1]] == [
        (device_id(0), "SUCCEED"),
        (device_id(1), "SUCCEED"),
        (device_id(7), "repeated"),
    ]


def test_a_digest_that_the_generator_does_not_reproduce_is_refused() -> None:
    with pytest.raises(ValueError, match="digest"):
        fedavg([Ack(device_id(0), 1, 5, "0123456789abcdef", "SUCCEED")], SIZES, SEED)
    with pytest.raises(ValueError, match="no update"):
        fedavg([], SIZES, SEED)


def _initial() -> dict[str, np.ndarray]:
    return {name: np.full(size, 0.5, dtype=np.float32) for name, size in SIZES.items()}


def _f32(model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: v.astype(np.float32) for n, v in model.items()}


def test_check_models_passes_a_correct_chain_and_flags_each_fault() -> None:
    entries = [*_entries(1, range(4)), *_entries(2, range(4)), *_entries(3, range(3))]
    acks = acknowledged_updates(entries)
    m1 = _f32(_manual_fedavg(1, range(4)))
    m3 = _f32(_manual_fedavg(3, range(3)))
    good = {0: _initial(), 1: m1, 2: m1, 3: m3}  # iteration 2 failed: model 1 carried over
    outcomes = {1: [True], 2: [False], 3: [True]}

    def failures(
        served: Mapping[str, Mapping[int, Mapping[str, np.ndarray] | None]], out: dict[int, list[bool]]
    ) -> list[str]:
        found = check_models(
            fl_iteration_num=3, initial=_initial(), served=served, acks=acks, outcomes=out, seed=SEED
        )
        return [f.check for f in found if not f.ok]

    assert failures({"a": good, "b": dict(good)}, outcomes) == []
    # A Server whose model 3 differs.
    off = {**good, 3: {n: v + np.float32(1e-3) for n, v in m3.items()}}
    assert failures({"a": good, "b": off}, outcomes) == ["model 3 on b"]
    # A Server that serves no model for an iteration.
    assert failures({"a": good, "b": {**good, 2: None}}, outcomes) == ["model 2 on b"]
    # A missing metrics line for an iteration, and an iteration that ended twice.
    assert "iteration 2 ended once" in failures({"a": good}, {1: [True], 3: [True]})
    assert "iteration 1 ended once" in failures({"a": good}, {**outcomes, 1: [True, True]})
    # The failed iteration served a fresh aggregate instead of carrying the model over.
    m2 = _f32(_manual_fedavg(2, range(4)))
    assert failures({"a": {**good, 2: m2, 3: m3}}, outcomes) == ["model 2 on a"]
    # Model 0 that differs from the initial one.
    assert failures({"a": {**good, 0: m1}}, outcomes) == ["model 0 on a"]


def test_check_device_log_flags_double_acks_and_acks_without_start() -> None:
    entries = _entries(1, range(3))
    assert all(f.ok for f in check_device_log(entries, 3))
    double = [*entries, entries[-1]]
    assert [f.check for f in check_device_log(double, 3) if not f.ok] == ["one ack per device and iteration"]
    orphan = [LogEntry(device_id(5), "updateModel", 2, 9, "SUCCEED")]
    assert [f.check for f in check_device_log(orphan, 3) if not f.ok] == ["acks follow startFLJob"]
    assert [f.check for f in check_device_log(_entries(4, range(1)), 3) if not f.ok] == [
        "ack iterations in range"
    ]


def test_device_log_round_trips_and_tolerates_a_cut_last_line(tmp_path: Path) -> None:
    path = tmp_path / "devices.jsonl"
    entries = _entries(1, range(2))
    with DeviceLog(path) as log:
        for e in entries:
            log.write(e)
    assert read_log(path) == entries
    with open(path, "a") as f:
        f.write('{"fl_id": "drill-00')
    assert read_log(path) == entries
    path.write_text('garbage\n{"also": "bad"}\n')
    with pytest.raises(ValueError, match="not a device-log entry"):
        read_log(path)


def test_read_metrics(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    assert read_metrics(path) == {}
    path.write_text(
        '{"currentIteration":1,"iterationResult":"success"}\n{"currentIteration":2,"iterationResult":"fail"}\n'
        '{"currentIteration":2,"iterationResult":"success"}\n'
    )
    assert read_metrics(path) == {1: [True], 2: [False, True]}
    # The lines of an instance before a new instance are skipped (its numbers start again at 1).
    assert read_metrics(path, skip=1) == {2: [False, True]}
    assert read_metrics(path, skip=3) == {}
