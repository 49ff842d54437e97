"""Tests for flcluster.core.iteration: every rule and reason string, then a stateful property test."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from flcluster.config import FLContext
from flcluster.core import iteration as it
from flcluster.core.iteration import (
    JOB_NOT_AVAILABLE_TEXT,
    SAFEMODE_TEXT,
    Accepted,
    AggregateIteration,
    AggregationDone,
    AggregationFailed,
    ArmedWindow,
    ArmWindow,
    DeviceMeta,
    DisableRequested,
    DisarmWindow,
    DiscardPartials,
    EnableRequested,
    Event,
    InstanceState,
    InstanceStateChanged,
    IterationCompleted,
    IterationConfig,
    IterationFailed,
    IterationMachine,
    OperatorAnswer,
    Outcome,
    Phase,
    PlainText,
    Rejected,
    ResponseCode,
    Resumed,
    RoundCounts,
    StartFLJobReceived,
    UpdateModelReceived,
    Visits,
    WindowClosed,
    WindowKind,
    reason_duplicate_device,
    reason_repeated_update,
    snapshot_from_json,
    snapshot_to_json,
    update_model_threshold,
)
from flcluster.errors import IllegalEvent, ProtocolError
from flcluster.settings import iteration_config
from tests.unit.stored_machine import StoredMachine

T0 = 1_700_000_000_000  # an epoch-ms "now" for the tests
SW, UW, GW = 10_000, 20_000, 100_000  # startFLJob, updateModel and global windows (ms)
START, UPDATE, GLOBAL = WindowKind.START_FL_JOB, WindowKind.UPDATE_MODEL, WindowKind.GLOBAL


def make_config(**overrides: object) -> IterationConfig:
    """The iteration config derived from an FLContext; ``overrides`` are FLContext keywords."""
    values: dict[str, object] = {
        "start_fl_job_threshold": 3,
        "update_model_ratio": 2 / 3,
        "start_fl_job_time_window": SW,
        "update_model_time_window": UW,
        "global_iteration_time_window": GW,
        "fl_iteration_num": 5,
    }
    values.update(overrides)
    return iteration_config(FLContext.from_kwargs(**values))


def make_machine(**overrides: object) -> IterationMachine:
    return IterationMachine(make_config(**overrides))


def start(fl_id: str, data_size: int = 10, now: int = T0, cause: str = "c") -> StartFLJobReceived:
    return StartFLJobReceived(cause, fl_id, data_size, now)


def update(fl_id: str, iteration: int = 1, now: int = T0, cause: str = "c") -> UpdateModelReceived:
    return UpdateModelReceived(cause, fl_id, iteration, now)


def accepted(outcome: Outcome) -> Accepted:
    assert isinstance(outcome.reply, Accepted), outcome.reply
    return outcome.reply


def rejected(outcome: Outcome) -> Rejected:
    assert isinstance(outcome.reply, Rejected), outcome.reply
    return outcome.reply


def assert_refused_unchanged(m: IterationMachine, event: Event, match: str) -> None:
    before = m.snapshot()
    with pytest.raises(IllegalEvent, match=match):
        m.handle(event)
    assert m.snapshot() == before


def counted(before: it.IterationSnapshot, event: Event) -> it.IterationSnapshot:
    """``before`` after a refused device request: only the visits' count of its round moved."""
    v = before.visits
    if isinstance(event, StartFLJobReceived):
        v = attrs.evolve(v, start_fl_job_total=v.start_fl_job_total + 1)
    elif isinstance(event, UpdateModelReceived):
        v = attrs.evolve(v, update_model_total=v.update_model_total + 1)
    return attrs.evolve(before, visits=v)


def assert_rejected_unchanged(m: IterationMachine, event: Event) -> Rejected:
    before = m.snapshot()
    out = m.handle(event)
    assert out.instructions == ()
    assert m.snapshot() == counted(before, event)
    return rejected(out)


def run_to_aggregating(m: IterationMachine, now: int = T0) -> None:
    """Start threshold devices d0.., then update_model_threshold of them."""
    cfg = m.config
    for i in range(cfg.start_fl_job_threshold):
        accepted(m.handle(start(f"d{i}", 10 + i, now)))
    for i in range(cfg.update_model_threshold):
        accepted(m.handle(update(f"d{i}", m.current_iteration, now)))
    assert m.phase is Phase.AGGREGATING


#: The visits of :func:`run_to_aggregating` on the default config: 3 startFLJob and 2 updateModel, all
#: accepted, every update within the first participation level.
AGG_VISITS = Visits(
    start_fl_job_total=3,
    start_fl_job_accept=3,
    update_model_total=2,
    update_model_accept=2,
    participation=(2, 0, 0),
)


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("threshold", "ratio", "expected"),
    [(10, 0.7, 7), (3, 2 / 3, 2), (1, 1.0, 1), (7, 0.3, 3), (5, 0.01, 1), (4, 1, 4), (100, 0.29, 29)],
)
def test_update_model_threshold_is_ceil_of_the_decimal_product(
    threshold: int, ratio: float, expected: int
) -> None:
    assert update_model_threshold(threshold, ratio) == expected
    assert make_config(start_fl_job_threshold=threshold, update_model_ratio=ratio).update_model_threshold == (
        expected
    )


def test_config_defaults_and_derived_values() -> None:
    cfg = make_config()
    assert cfg.min_retry_delay_ms == 1000
    assert cfg.iteration_time_window == SW + UW
    assert cfg.update_model_threshold == 2


def test_config_is_derived_from_the_fl_context() -> None:
    # The config has no rules of its own: FLContext's are the only ones (tests/unit/test_config.py).
    ctx = FLContext.from_kwargs(
        start_fl_job_threshold=7,
        update_model_ratio=0.3,
        start_fl_job_time_window=11,
        update_model_time_window=12,
        global_iteration_time_window=13,
        fl_iteration_num=14,
        min_retry_delay_ms=15,
    )
    assert iteration_config(ctx) == IterationConfig(
        start_fl_job_threshold=7,
        update_model_ratio=0.3,
        start_fl_job_time_window=11,
        update_model_time_window=12,
        global_iteration_time_window=13,
        fl_iteration_num=14,
        min_retry_delay_ms=15,
    )
    assert iteration_config(ctx).update_model_threshold == ctx.update_model_threshold == 3


# ----------------------------------------------------------------------------------- initial state


def test_new_machine_is_iteration_1_running_and_waiting() -> None:
    m = make_machine()
    assert m.current_iteration == 1
    assert m.state is InstanceState.RUNNING
    assert m.phase is Phase.WAITING
    assert not m.in_safemode
    assert m.counts() == RoundCounts(1, 0, 3, 0, 2)
    assert m.device_meta("a") is None
    assert m.armed_windows() == ()
    assert m.next_req_time_ms(T0) == T0 + 1000
    assert "iteration=1" in repr(m)


def test_instance_state_values_are_the_metrics_strings() -> None:
    assert [s.value for s in InstanceState] == ["running", "disable", "finish"]
    assert [int(c) for c in ResponseCode] == [200, 201, 202, 204, 300, 301, 400, 500]


# ------------------------------------------------------------------------------------------ startFLJob


def test_first_start_fl_job_starts_the_iteration_and_arms_round_and_global_windows() -> None:
    m = make_machine()
    out = m.handle(start("a", 12, T0, cause="req-1"))
    assert out.reply == Accepted(1, 12, T0 + SW + UW, "success")
    assert accepted(out).retcode is ResponseCode.SUCCEED
    assert out.instructions == (
        ArmWindow("req-1", START, 1, T0 + SW),
        ArmWindow("req-1", GLOBAL, 1, T0 + GW),
    )
    assert m.phase is Phase.RUNNING
    assert m.device_meta("a") == DeviceMeta("a", 12, T0)
    assert m.counts().start_fl_job == 1


def test_later_start_fl_jobs_arm_nothing_until_the_threshold_closes_the_round() -> None:
    m = make_machine()
    m.handle(start("a", now=T0))
    out = m.handle(start("b", now=T0 + 5))
    assert accepted(out).iteration == 1
    assert out.instructions == ()
    out = m.handle(start("c", now=T0 + 7, cause="req-c"))
    accepted(out)
    # Reaching the threshold closes the round, and (improvement, spec) starts the updateModel window.
    assert out.instructions == (
        DisarmWindow("req-c", START, 1),
        ArmWindow("req-c", UPDATE, 1, T0 + 7 + UW),
    )
    assert m.armed_windows() == (ArmedWindow(UPDATE, T0 + 7 + UW), ArmedWindow(GLOBAL, T0 + GW))


def test_threshold_one_never_arms_the_start_window() -> None:
    m = make_machine(start_fl_job_threshold=1, update_model_ratio=1.0)
    out = m.handle(start("a", cause="x"))
    accepted(out)
    assert out.instructions == (ArmWindow("x", GLOBAL, 1, T0 + GW), ArmWindow("x", UPDATE, 1, T0 + UW))


def test_start_fl_job_after_threshold_is_out_of_time_with_next_req_time() -> None:
    m = make_machine()
    for f in "abc":
        m.handle(start(f))
    r = assert_rejected_unchanged(m, start("d", now=T0 + 1))
    assert r == Rejected(
        ResponseCode.OutOfTime,
        "Current amount for startFLJob has reached the threshold. Please startFLJob later.",
        T0 + UW,  # the updateModel window armed when the round closed ends before start + SW + UW
    )


def test_threshold_check_comes_before_the_data_size_check() -> None:
    m = make_machine()
    for f in "abc":
        m.handle(start(f))
    r = assert_rejected_unchanged(m, start("d", data_size=0))
    assert r.reason.startswith("Current amount for startFLJob has reached the threshold")


@pytest.mark.parametrize("size", [0, -5])
def test_data_size_below_one_is_out_of_time(size: int) -> None:
    m = make_machine()
    r = assert_rejected_unchanged(m, start("a", data_size=size))
    assert r == Rejected(ResponseCode.OutOfTime, "FL job data size is not enough.", T0 + 1000)


def test_data_size_above_65535_is_out_of_time_and_65535_is_fine() -> None:
    m = make_machine()
    r = assert_rejected_unchanged(m, start("a", data_size=65536))
    assert r == Rejected(ResponseCode.OutOfTime, "FL job data size is too large.", T0 + 1000)
    assert accepted(m.handle(start("a", data_size=65535))).data_size == 65535


def test_duplicate_fl_id_in_one_iteration_is_out_of_time() -> None:
    m = make_machine()
    m.handle(start("a"))
    r = assert_rejected_unchanged(m, start("a", data_size=99, now=T0 + 3))
    assert r == Rejected(ResponseCode.OutOfTime, "Updating device metadata failed for fl id a", T0 + SW + UW)
    assert m.device_meta("a") == DeviceMeta("a", 10, T0)  # the first declaration stands


def test_data_size_check_comes_before_the_duplicate_check() -> None:
    m = make_machine()
    m.handle(start("a"))
    assert assert_rejected_unchanged(m, start("a", data_size=0)).reason == "FL job data size is not enough."


def test_same_fl_id_may_start_again_in_the_next_iteration() -> None:
    m = make_machine()
    m.handle(start("a"))
    m.handle(WindowClosed("t", START, 1, T0 + SW))
    assert m.current_iteration == 2
    assert accepted(m.handle(start("a", now=T0 + SW + 1))).iteration == 2


# ------------------------------------------------------------------------------------------ updateModel


def test_update_model_returns_the_data_size_declared_at_start_fl_job() -> None:
    m = make_machine()
    m.handle(start("a", data_size=42))
    m.handle(start("b"))
    out = m.handle(update("a", 1, T0 + 100, cause="u"))
    assert out.reply == Accepted(1, 42, T0 + 100 + UW, "success not ready")
    # The first accepted updateModel arms its window (reference §3.3), here before startFLJob closed.
    assert out.instructions == (ArmWindow("u", UPDATE, 1, T0 + 100 + UW),)
    assert m.counts().update_model == 1


def test_update_window_is_not_rearmed_once_armed() -> None:
    m = make_machine(start_fl_job_threshold=4, update_model_ratio=1.0)
    for f in "abc":
        m.handle(start(f))
    m.handle(update("a", now=T0 + 1))
    out = m.handle(update("b", now=T0 + 2))
    accepted(out)
    assert out.instructions == ()
    out = m.handle(start("d", now=T0 + 3, cause="last"))
    assert out.instructions == (DisarmWindow("last", START, 1),)  # updateModel window already armed


def test_wrong_iteration_is_out_of_time_with_the_original_reason() -> None:
    m = make_machine()
    m.handle(start("a"))
    r = assert_rejected_unchanged(m, update("a", 7, T0 + 1))
    t = T0 + SW + UW
    assert r == Rejected(
        ResponseCode.OutOfTime,
        "UpdateModel iteration number is invalid:7, current iteration:1, "
        f"Retry later at time: {t}, fl id is a",
        t,
    )


def test_wrong_iteration_is_checked_before_device_meta() -> None:
    m = make_machine()
    r = assert_rejected_unchanged(m, update("ghost", 0))
    assert r.reason.startswith("UpdateModel iteration number is invalid:0, current iteration:1")


def test_update_without_start_fl_job_this_iteration_is_out_of_time() -> None:
    m = make_machine()
    m.handle(start("a"))
    r = assert_rejected_unchanged(m, update("b", 1, T0 + 1))
    assert r == Rejected(
        ResponseCode.OutOfTime, "devices_meta for b is not set. Please retry later.", T0 + SW + UW
    )


def test_repeated_update_from_the_same_device_is_refused() -> None:
    m = make_machine()
    m.handle(start("a"))
    m.handle(start("b"))
    m.handle(update("a"))
    r = assert_rejected_unchanged(m, update("a", 1, T0 + 1))
    assert r.retcode is ResponseCode.OutOfTime
    assert r.reason == "Updating metadata of UpdateModelClientList failed for fl id a"
    assert m.counts().update_model == 1


def test_reaching_update_threshold_starts_aggregation_in_safemode() -> None:
    m = make_machine()
    m.handle(start("b", data_size=5))
    m.handle(start("a", data_size=7))
    m.handle(start("c", data_size=9, now=T0 + 1))
    m.handle(update("b", now=T0 + 2))
    out = m.handle(update("a", now=T0 + 3, cause="last"))
    assert accepted(out).data_size == 7
    assert out.instructions == (
        DisarmWindow("last", UPDATE, 1),
        DisarmWindow("last", GLOBAL, 1),
        AggregateIteration("last", 1, (DeviceMeta("a", 7, T0), DeviceMeta("b", 5, T0)), 12, T0 + 20_001),
    )
    assert m.phase is Phase.AGGREGATING
    assert m.in_safemode
    assert m.armed_windows() == ()
    # In safemode a startFLJob is told to wait; an updateModel is told the counter is full.
    assert m.handle(start("d", now=T0 + 4)) == Outcome(PlainText("The cluster is in safemode."))
    r = assert_rejected_unchanged(m, update("c", 1, T0 + 4))
    assert r == Rejected(
        ResponseCode.OutOfTime,
        "Current amount for updateModel is enough. Please retry later.",
        T0 + SW + UW,
    )


def test_threshold_reached_while_start_round_open_disarms_start_window_too() -> None:
    m = make_machine(start_fl_job_threshold=4, update_model_ratio=0.25)
    m.handle(start("a"))
    m.handle(start("b"))
    out = m.handle(update("a", cause="u"))
    assert out.instructions == (
        DisarmWindow("u", START, 1),
        DisarmWindow("u", GLOBAL, 1),
        AggregateIteration("u", 1, (DeviceMeta("a", 10, T0),), 10, T0 + 100_000),
    )


def test_aggregation_done_completes_and_advances_the_iteration() -> None:
    m = make_machine()
    run_to_aggregating(m)
    out = m.handle(AggregationDone("agg", 1, T0 + 500))
    assert out == Outcome(None, (IterationCompleted("agg", 1, T0, T0 + 500, 2, AGG_VISITS),))
    assert m.current_iteration == 2
    assert m.phase is Phase.WAITING
    assert m.counts() == RoundCounts(2, 0, 3, 0, 2)
    assert m.device_meta("d0") is None
    assert not m.in_safemode
    # A device of the finished iteration whose update is in its model is told so (a late retry of a
    # lost SUCCEED); one that was not counted in it is sent back to startFLJob.
    r = assert_rejected_unchanged(m, update("d0", 1, T0 + 600))
    assert r.reason == reason_repeated_update("d0")
    r = assert_rejected_unchanged(m, update("d9", 1, T0 + 600))
    assert r.reason.startswith("UpdateModel iteration number is invalid:1, current iteration:2")
    assert r.next_req_time_ms == T0 + 600 + 1000


@pytest.mark.parametrize(
    "event",
    [AggregationDone("x", 1, T0), AggregationFailed("x", 1, "boom", T0)],
)
def test_aggregation_results_are_illegal_unless_aggregating(event: Event) -> None:
    m = make_machine()
    assert_refused_unchanged(m, event, "only an aggregating iteration")
    m.handle(start("a"))
    assert_refused_unchanged(m, event, "iteration 1 is running")


def test_aggregation_result_for_another_iteration_is_illegal() -> None:
    m = make_machine()
    run_to_aggregating(m)
    assert_refused_unchanged(m, AggregationDone("x", 2, T0), "AggregationDone for iteration 2")
    assert_refused_unchanged(m, AggregationFailed("x", 0, "r", T0), "AggregationFailed for iteration 0")


def test_aggregation_failed_fails_the_iteration() -> None:
    m = make_machine()
    run_to_aggregating(m)
    out = m.handle(AggregationFailed("agg", 1, "partial sums lost", T0 + 9))
    assert out.instructions == (
        DiscardPartials("agg", 1),
        IterationFailed("agg", 1, "partial sums lost", T0, T0 + 9, 2, 1, AGG_VISITS),
    )
    assert m.current_iteration == 2


# -------------------------------------------------------------------------------------------- windows


def test_start_window_closing_before_threshold_fails_the_iteration() -> None:
    m = make_machine()
    m.handle(start("a"))
    m.handle(update("a"))
    out = m.handle(WindowClosed("timer", START, 1, T0 + SW))
    assert out.reply is None
    assert out.instructions == (
        DisarmWindow("timer", UPDATE, 1),
        DisarmWindow("timer", GLOBAL, 1),
        DiscardPartials("timer", 1),
        IterationFailed(
            "timer",
            1,
            "Round startFLJob timeout! This iteration is invalid. Proceed to next iteration.",
            T0,
            T0 + SW,
            2,
            1,
            Visits(
                start_fl_job_total=1,
                start_fl_job_accept=1,
                update_model_total=1,
                update_model_accept=1,
                participation=(1, 0, 0),
            ),
        ),
    )
    assert m.current_iteration == 2
    assert m.phase is Phase.WAITING
    assert m.counts().start_fl_job == 0


def test_update_window_closing_before_threshold_fails_the_iteration() -> None:
    m = make_machine()
    for f in "abc":
        m.handle(start(f))
    out = m.handle(WindowClosed("timer", UPDATE, 1, T0 + UW))
    failed = out.instructions[-1]
    assert isinstance(failed, IterationFailed)
    assert failed.reason == "Round updateModel timeout! This iteration is invalid. Proceed to next iteration."
    assert out.instructions[:-1] == (DisarmWindow("timer", GLOBAL, 1), DiscardPartials("timer", 1))


def test_stall_before_any_upload_is_caught_by_the_update_window_not_the_global_one() -> None:
    # Reference §8.3: in the original only the global window (default 1 h) would end this iteration.
    m = make_machine(global_iteration_time_window=3_600_000)
    for f in "abc":
        m.handle(start(f, now=T0 + 10))
    assert (UPDATE, T0 + 10 + UW) in [(w.kind, w.deadline_ms) for w in m.armed_windows()]
    m.handle(WindowClosed("timer", UPDATE, 1, T0 + 10 + UW))
    assert m.current_iteration == 2


def test_global_window_closing_fails_the_iteration_with_the_global_reason() -> None:
    m = make_machine(global_iteration_time_window=5_000)
    m.handle(start("a"))
    out = m.handle(WindowClosed("timer", GLOBAL, 1, T0 + 5_000))
    failed = out.instructions[-1]
    assert isinstance(failed, IterationFailed)
    assert (
        failed.reason == "Global Iteration 1 timeout! This iteration is invalid. Proceed to next iteration."
    )
    assert out.instructions[0] == DisarmWindow("timer", START, 1)


def test_consecutive_failures_count_up_and_reset_on_success() -> None:
    m = make_machine()
    for i in (1, 2):
        m.handle(start("a"))
        out = m.handle(WindowClosed("t", START, i, T0))
        failed = out.instructions[-1]
        assert isinstance(failed, IterationFailed)
        assert failed.consecutive_failures == i
    run_to_aggregating(m)
    m.handle(AggregationDone("a", 3, T0))
    m.handle(start("a"))
    failed = m.handle(WindowClosed("t", START, 4, T0)).instructions[-1]
    assert isinstance(failed, IterationFailed)
    assert failed.consecutive_failures == 1


def test_stale_window_closed_is_ignored_without_change() -> None:
    m = make_machine()
    m.handle(start("a"))
    m.handle(WindowClosed("t", START, 1, T0 + SW))  # iteration 1 fails
    m.handle(start("b", now=T0 + SW + 1))
    for event in (
        WindowClosed("old", GLOBAL, 1, T0 + GW),  # a timer of the failed iteration raced the failure
        WindowClosed("never", UPDATE, 2, T0 + GW),  # not armed in this iteration
    ):
        before = m.snapshot()
        assert m.handle(event) == Outcome()
        assert m.snapshot() == before


def test_window_closed_after_its_round_closed_is_stale() -> None:
    m = make_machine()
    for f in "abc":
        m.handle(start(f))
    before = m.snapshot()
    assert m.handle(WindowClosed("t", START, 1, T0 + SW)) == Outcome()
    assert m.snapshot() == before


def test_window_closed_while_aggregating_is_stale() -> None:
    m = make_machine()
    run_to_aggregating(m)
    before = m.snapshot()
    assert m.handle(WindowClosed("t", GLOBAL, 1, T0 + GW)) == Outcome()
    assert m.snapshot() == before


def test_window_closed_for_a_future_iteration_is_illegal() -> None:
    m = make_machine()
    m.handle(start("a"))
    assert_refused_unchanged(m, WindowClosed("t", START, 2, T0), "iteration 2, which has not begun")


# ---------------------------------------------------------------------------------------- next_req_time


def test_next_req_time_is_start_plus_both_round_windows() -> None:
    m = make_machine()
    m.handle(start("a", now=T0))
    assert m.next_req_time_ms(T0 + 1) == T0 + SW + UW


def test_next_req_time_is_capped_by_the_global_window() -> None:
    m = make_machine(global_iteration_time_window=15_000)
    m.handle(start("a", now=T0))
    assert m.next_req_time_ms(T0 + 1) == T0 + 15_000


def test_next_req_time_is_capped_by_an_armed_update_window() -> None:
    m = make_machine()
    for f in "abc":
        m.handle(start(f, now=T0 + 2_000))
    assert m.next_req_time_ms(T0 + 2_001) == T0 + 2_000 + UW


def test_next_req_time_is_never_now_or_in_the_past() -> None:
    m = make_machine(min_retry_delay_ms=250)
    m.handle(start("a", now=T0))
    late = T0 + SW + UW  # the estimate is exactly "now": the original would send it and abort the client
    assert m.next_req_time_ms(late) == late + 250
    for f in "bc":
        m.handle(start(f, now=late))
    r = assert_rejected_unchanged(m, start("z", now=late + 5))
    assert r.next_req_time_ms == late + 5 + 250


# ----------------------------------------------------------------------------------- finishing the job


def test_job_finishes_after_fl_iteration_num_iterations_failed_ones_included() -> None:
    m = make_machine(fl_iteration_num=2)
    m.handle(start("a"))
    m.handle(WindowClosed("t", START, 1, T0 + SW))
    run_to_aggregating(m)
    out = m.handle(AggregationDone("agg", 2, T0 + SW + 5))
    assert out.instructions == (
        IterationCompleted("agg", 2, T0, T0 + SW + 5, 3, AGG_VISITS),
        InstanceStateChanged("agg", InstanceState.RUNNING, InstanceState.FINISHED),
    )
    assert m.state is InstanceState.FINISHED
    assert m.current_iteration == 3
    for event in (start("z"), update("z", 3)):
        before = m.snapshot()
        assert m.handle(event) == Outcome(PlainText("The server's training job is disabled or finished."))
        assert m.snapshot() == counted(before, event)
    assert_refused_unchanged(m, EnableRequested("op", T0), "The instance is completed and cannot be enabled.")
    assert_refused_unchanged(
        m, DisableRequested("op", T0), "The instance is completed and cannot be disabled."
    )


def test_failing_the_last_iteration_finishes_the_job() -> None:
    m = make_machine(fl_iteration_num=1)
    m.handle(start("a"))
    out = m.handle(WindowClosed("t", GLOBAL, 1, T0 + GW))
    assert out.instructions[-1] == InstanceStateChanged("t", InstanceState.RUNNING, InstanceState.FINISHED)
    assert m.state is InstanceState.FINISHED


# -------------------------------------------------------------------------------------- disable/enable


def test_disable_force_fails_a_running_iteration() -> None:
    m = make_machine()
    m.handle(start("a"))
    out = m.handle(DisableRequested("op", T0 + 50))
    assert out.reply == OperatorAnswer("Disabling FL-Server succeeded.", changed=True)
    assert out.instructions == (
        DisarmWindow("op", START, 1),
        DisarmWindow("op", GLOBAL, 1),
        DiscardPartials("op", 1),
        IterationFailed(
            "op",
            1,
            "Forcibly move to next iteration.",
            T0,
            T0 + 50,
            2,
            1,
            Visits(start_fl_job_total=1, start_fl_job_accept=1),
        ),
        InstanceStateChanged("op", InstanceState.RUNNING, InstanceState.DISABLED),
    )
    assert m.state is InstanceState.DISABLED
    assert m.current_iteration == 2
    assert m.handle(start("a")) == Outcome(PlainText(JOB_NOT_AVAILABLE_TEXT))
    assert m.handle(update("a", 2)) == Outcome(PlainText(JOB_NOT_AVAILABLE_TEXT))


def test_disable_while_waiting_does_not_burn_an_iteration() -> None:
    m = make_machine()
    out = m.handle(DisableRequested("op", T0))
    assert out.instructions == (InstanceStateChanged("op", InstanceState.RUNNING, InstanceState.DISABLED),)
    assert m.current_iteration == 1


def test_disable_twice_and_enable_twice_are_idempotent() -> None:
    m = make_machine()
    m.handle(DisableRequested("op", T0))
    before = m.snapshot()
    assert m.handle(DisableRequested("op2", T0)) == Outcome(
        OperatorAnswer("Disabling FL-Server succeeded.", False)
    )
    assert m.snapshot() == before
    out = m.handle(EnableRequested("op3", T0))
    assert out == Outcome(
        OperatorAnswer("Enabling FL-Server succeeded.", True),
        (InstanceStateChanged("op3", InstanceState.DISABLED, InstanceState.RUNNING),),
    )
    assert m.handle(EnableRequested("op4", T0)) == Outcome(
        OperatorAnswer("Enabling FL-Server succeeded.", False)
    )
    assert accepted(m.handle(start("a"))).iteration == 1


def test_disable_while_aggregating_lets_the_aggregation_finish() -> None:
    m = make_machine()
    run_to_aggregating(m)
    out = m.handle(DisableRequested("op", T0 + 1))
    assert out.instructions == (InstanceStateChanged("op", InstanceState.RUNNING, InstanceState.DISABLED),)
    assert m.phase is Phase.AGGREGATING
    out = m.handle(AggregationDone("agg", 1, T0 + 2))
    assert out.instructions == (IterationCompleted("agg", 1, T0, T0 + 2, 2, AGG_VISITS),)
    assert m.state is InstanceState.DISABLED


def test_disable_during_the_last_iteration_finishes_the_job() -> None:
    m = make_machine(fl_iteration_num=1)
    m.handle(start("a"))
    out = m.handle(DisableRequested("op", T0))
    assert out.instructions[-1] == InstanceStateChanged("op", InstanceState.RUNNING, InstanceState.FINISHED)
    assert m.state is InstanceState.FINISHED


# --------------------------------------------------------------------------------- snapshot, resume


def test_snapshot_round_trip_gives_an_equal_machine() -> None:
    m = make_machine()
    m.handle(start("b", 3))
    m.handle(start("a", 4))
    m.handle(update("b"))
    snap = m.snapshot()
    assert snap.devices == (DeviceMeta("a", 4, T0), DeviceMeta("b", 3, T0))
    assert snap.updated == ("b",)
    assert snap.windows == (
        ArmedWindow(START, T0 + SW),
        ArmedWindow(UPDATE, T0 + UW),
        ArmedWindow(GLOBAL, T0 + GW),
    )
    restored = IterationMachine.from_snapshot(snap)
    assert restored == m
    assert restored.snapshot() == snap
    assert restored != make_machine()
    assert m.__eq__(object()) is NotImplemented
    # The restored machine behaves the same.
    assert m.handle(update("a", cause="z")) == restored.handle(update("a", cause="z"))
    assert restored == m


def test_snapshot_is_plain_records() -> None:
    snap = make_machine().snapshot()
    assert attrs.has(type(snap))
    assert attrs.asdict(snap)["instance_state"] == "running"


def test_resumed_rearms_windows_with_their_original_deadlines() -> None:
    m = make_machine()
    m.handle(start("a"))
    m2 = IterationMachine.from_snapshot(m.snapshot())
    before = m2.snapshot()
    out = m2.handle(Resumed("boot", T0 + 999_999))
    assert out == Outcome(None, (ArmWindow("boot", START, 1, T0 + SW), ArmWindow("boot", GLOBAL, 1, T0 + GW)))
    assert m2.snapshot() == before
    # The driver arms an already-past deadline: it fires at once, and the iteration fails cleanly.
    failed = m2.handle(WindowClosed("t", START, 1, T0 + 999_999)).instructions[-1]
    assert isinstance(failed, IterationFailed)


def test_resumed_while_aggregating_asks_for_the_aggregation_again() -> None:
    m = make_machine()
    run_to_aggregating(m)
    out = m.handle(Resumed("boot", T0))
    assert out == Outcome(
        None,
        (
            AggregateIteration(
                "boot", 1, (DeviceMeta("d0", 10, T0), DeviceMeta("d1", 11, T0)), 21, T0 + 20_000
            ),
        ),
    )


def test_resumed_while_waiting_does_nothing() -> None:
    assert make_machine().handle(Resumed("boot", T0)) == Outcome()


def _evolve_snapshot(m: IterationMachine, **changes: Any) -> it.IterationSnapshot:
    return attrs.evolve(m.snapshot(), **changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"iteration": 0}, "iteration must be an int >= 1"),
        ({"consecutive_failures": -1}, "consecutive_failures must be >= 0"),
        ({"phase": Phase.AGGREGATING}, "an aggregating iteration has at least 2 updates"),
        ({"phase": Phase.WAITING}, "a waiting iteration has no devices"),
        ({"instance_state": InstanceState.FINISHED}, "does not fit iteration 1"),
        ({"instance_state": InstanceState.DISABLED}, "only a running instance has a running iteration"),
        ({"windows": ()}, "global window armed"),
        ({"updated": ("zz",)}, "names devices not in devices"),
        ({"updated": ("a", "a")}, "updated repeats an fl_id"),
        ({"devices": (DeviceMeta("a", 1, T0), DeviceMeta("a", 2, T0))}, "devices repeat an fl_id"),
        ({"devices": (DeviceMeta("a", 0, T0),)}, "has data_size 0"),
        ({"started_at_ms": None}, "a running iteration has a start time"),
    ],
)
def test_from_snapshot_refuses_inconsistent_snapshots(changes: dict[str, Any], message: str) -> None:
    m = make_machine()
    m.handle(start("a"))
    with pytest.raises(ValueError, match=message):
        IterationMachine.from_snapshot(_evolve_snapshot(m, **changes))


def test_from_snapshot_refuses_windows_that_do_not_fit_the_counters() -> None:
    m = make_machine()
    for f in "abc":
        m.handle(start(f))
    bad = _evolve_snapshot(m, windows=(ArmedWindow(START, 1), ArmedWindow(GLOBAL, 2)))
    with pytest.raises(ValueError, match="startFLJob window is armed exactly while") as info:
        IterationMachine.from_snapshot(bad)
    assert "updateModel window is armed once" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"completed": (1,)}, "must together hold each iteration before 1 exactly once"),
        ({"visits": Visits()}, "must count the 1 devices and 0 updates held"),
        ({"visits": Visits(start_fl_job_total=0, start_fl_job_accept=1)}, "accept no more requests"),
        ({"participation_levels": (15, 5)}, "participation_levels must be two ints 0 < a < b"),
    ],
)
def test_from_snapshot_refuses_inconsistent_bookkeeping(changes: dict[str, Any], message: str) -> None:
    m = make_machine()
    m.handle(start("a"))
    with pytest.raises(ValueError, match=message):
        IterationMachine.from_snapshot(_evolve_snapshot(m, **changes))


def test_from_snapshot_refuses_ended_iterations_that_do_not_fit() -> None:
    m = make_machine()
    m.handle(start("a"))
    m.handle(WindowClosed("t", START, 1, T0 + SW))  # iteration 1 fails
    assert m.failed == (1,) and m.completed == ()
    with pytest.raises(ValueError, match="consecutive_failures 0 must count the failed iterations"):
        IterationMachine.from_snapshot(_evolve_snapshot(m, consecutive_failures=0))
    with pytest.raises(ValueError, match="exactly once"):
        IterationMachine.from_snapshot(_evolve_snapshot(m, completed=(1,)))


def test_participation_levels_are_refused_unless_ascending_and_positive() -> None:
    for levels in [(0, 5), (5, 5), (7, 3), (1, 2, 3)]:
        with pytest.raises(ValueError, match="participation_levels"):
            IterationMachine(make_config(), participation_levels=levels)  # type: ignore[arg-type]


def test_visits_count_every_request_and_bucket_participation() -> None:
    m = IterationMachine(
        make_config(start_fl_job_threshold=4, update_model_ratio=0.75), participation_levels=(1, 3)
    )
    for f in "abcd":
        accepted(m.handle(start(f)))
    rejected(m.handle(start("a", data_size=11, now=T0 + 1)))  # "a" again, another size: counted, refused
    minute = 60_000
    accepted(m.handle(UpdateModelReceived("u", "a", 1, T0 + minute - 1, 0.5, 0.25)))  # under level 1
    rejected(m.handle(UpdateModelReceived("u", "a", 1, T0 + minute, 9.0, 9.0)))  # repeated: not summed
    accepted(m.handle(UpdateModelReceived("u", "b", 1, T0 + minute, 1.5, 0.75)))  # under level 2
    accepted(m.handle(UpdateModelReceived("u", "c", 1, T0 + 3 * minute, 1.0, 0.5)))  # the rest
    assert m.in_safemode
    assert m.visits == Visits(
        start_fl_job_total=5,
        start_fl_job_accept=4,
        update_model_total=4,
        update_model_accept=3,
        loss_sum=3.0,
        accuracy_sum=1.5,
        participation=(1, 1, 1),
    )
    restored = IterationMachine.from_snapshot(m.snapshot())
    assert restored.visits == m.visits
    out = restored.handle(AggregationDone("agg", 1, T0 + 4 * minute, 7, 5))
    done = out.instructions[0]
    assert isinstance(done, IterationCompleted)
    assert done.visits == attrs.evolve(m.visits, get_model_total=7, get_model_accept=5)
    assert restored.visits == Visits()
    assert restored.completed == (1,) and restored.has_ended(1) and not restored.has_ended(2)


def test_aggregation_failed_carries_the_get_model_counts_collected() -> None:
    m = make_machine()
    run_to_aggregating(m)
    out = m.handle(AggregationFailed("agg", 1, "lost", T0 + 9, 2, 1))
    failed = out.instructions[-1]
    assert isinstance(failed, IterationFailed)
    assert failed.visits == attrs.evolve(AGG_VISITS, get_model_total=2, get_model_accept=1)
    assert m.failed == (1,)


# ------------------------------------------------------------------------------------------ records


@pytest.mark.parametrize(
    "build",
    [
        lambda: StartFLJobReceived("", "a", 1, T0),
        lambda: StartFLJobReceived("c", "a", True, T0),
        lambda: StartFLJobReceived("c", 5, 1, T0),  # type: ignore[arg-type]
        lambda: StartFLJobReceived("c", "a", 1, -1),
        lambda: UpdateModelReceived("c", "a", 1.0, T0),  # type: ignore[arg-type]
        lambda: WindowClosed("c", "nope", 1, T0),
        lambda: AggregationFailed("c", 1, None, T0),  # type: ignore[arg-type]
        lambda: DisableRequested("c", 1.5),  # type: ignore[arg-type]
    ],
)
def test_events_validate_their_fields(build: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        build()  # type: ignore[operator]


def test_window_closed_accepts_the_round_name() -> None:
    assert WindowClosed("c", "updateModel", 1, T0).kind is UPDATE


def test_illegal_event_is_a_protocol_error() -> None:
    assert issubclass(IllegalEvent, ProtocolError)


def test_wire_text_constants() -> None:
    assert SAFEMODE_TEXT == "The cluster is in safemode."
    assert JOB_NOT_AVAILABLE_TEXT == "The server's training job is disabled or finished."


def test_core_iteration_imports_only_stdlib_attrs_and_errors() -> None:
    source = Path(it.__file__).read_text(encoding="utf-8")
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    third_party = {r for r in roots if r not in sys.stdlib_module_names and r != "__future__"}
    assert third_party <= {"attrs", "flcluster"}
    assert "from flcluster.errors import" in source
    assert "import flcluster." not in source


# ---------------------------------------------------------------------------------- stateful property

FL_IDS = ("a", "b", "c", "d", "e")


class IterationRules(RuleBasedStateMachine):
    """Random sequences of device requests, timers, aggregation results, operator commands and time.

    The test plays the driver: it keeps the timers the machine armed, fires them when they are due,
    and acknowledges aggregations, checking the machine's promises after every step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.m = IterationMachine(make_config())
        self.now = T0
        self.timers: dict[tuple[WindowKind, int], int] = {}
        self.pending_aggregation: int | None = None
        self.ended: dict[int, str] = {}  # iteration -> "completed" / "failed"
        self.declared: dict[int, dict[str, int]] = {}
        self.acknowledged: dict[int, dict[str, int]] = {}
        self.highest_iteration = 1
        self.stored = StoredMachine()

    @initialize(
        threshold=st.integers(1, 4),
        ratio=st.sampled_from([0.2, 0.5, 2 / 3, 0.75, 1.0]),
        sw=st.integers(1, 30_000),
        uw=st.integers(1, 30_000),
        gw=st.integers(1, 60_000),
        iterations=st.integers(1, 8),
        min_delay=st.integers(1, 2_000),
    )
    def setup(
        self, threshold: int, ratio: float, sw: int, uw: int, gw: int, iterations: int, min_delay: int
    ) -> None:
        self.m = IterationMachine(
            make_config(
                start_fl_job_threshold=threshold,
                update_model_ratio=ratio,
                start_fl_job_time_window=sw,
                update_model_time_window=uw,
                global_iteration_time_window=gw,
                fl_iteration_num=iterations,
                min_retry_delay_ms=min_delay,
            )
        )
        self.tally = Visits()

    # ----------------------------------------------------------------------------- the driver

    def feed(self, event: Event) -> Outcome | None:
        before = self.m.snapshot()
        iteration = self.m.current_iteration
        try:
            out = self.m.handle(event)
        except IllegalEvent:
            assert self.m.snapshot() == before, "an illegal event changed the machine"
            return None
        reply = out.reply
        self.count(event, reply, iteration)
        if isinstance(reply, Accepted | Rejected):
            assert reply.next_req_time_ms > event.now_ms, (reply, event)
        if isinstance(reply, Rejected | PlainText) or (reply is None and not out.instructions):
            assert self.m.snapshot() == counted(before, event), "a refusal changed the machine"
        if isinstance(reply, Accepted):
            assert reply.iteration == iteration
            assert iteration not in self.ended, "accepted a request for an iteration that had ended"
            if isinstance(event, StartFLJobReceived):
                self.declared.setdefault(iteration, {})[event.fl_id] = event.data_size
                assert reply.data_size == event.data_size
            elif isinstance(event, UpdateModelReceived):
                assert reply.data_size == self.declared[iteration][event.fl_id]
                assert event.fl_id not in self.acknowledged.get(iteration, {}), "counted twice"
                self.acknowledged.setdefault(iteration, {})[event.fl_id] = reply.data_size
        for instruction in out.instructions:
            self.carry_out(instruction, iteration)
        return out

    def count(self, event: Event, reply: object, iteration: int) -> None:
        """The driver's own tally of the current iteration's visits (the machine must agree)."""
        t, ok = self.tally, isinstance(reply, Accepted)
        match event:
            case StartFLJobReceived():
                # A retry answered again (same device, same data size) is a visit, not a new accept.
                new = ok and event.fl_id not in self.declared.get(iteration, {})
                t = attrs.evolve(
                    t,
                    start_fl_job_total=t.start_fl_job_total + 1,
                    start_fl_job_accept=t.start_fl_job_accept + new,
                )
            case UpdateModelReceived():
                t = attrs.evolve(
                    t,
                    update_model_total=t.update_model_total + 1,
                    update_model_accept=t.update_model_accept + ok,
                    loss_sum=t.loss_sum + event.upload_loss * ok,
                    accuracy_sum=t.accuracy_sum + event.upload_accuracy * ok,
                )
            case AggregationDone() | AggregationFailed():
                t = attrs.evolve(
                    t,
                    get_model_total=t.get_model_total + event.get_model_total,
                    get_model_accept=t.get_model_accept + event.get_model_accept,
                )
        self.tally = t

    def carry_out(self, instruction: object, iteration: int) -> None:
        match instruction:
            case ArmWindow(kind=kind, iteration=i, deadline_ms=deadline):
                assert i == iteration
                self.timers[(kind, i)] = deadline
            case DisarmWindow(kind=kind, iteration=i):
                assert i == iteration
                assert self.timers.pop((kind, i), None) is not None, "disarmed a window that was not armed"
            case AggregateIteration(iteration=i, updates=updates, total_data_size=total):
                assert i == iteration
                got = {d.fl_id: d.data_size for d in updates}
                assert got == self.acknowledged.get(i, {}), (
                    "aggregate over other than the acknowledged updates"
                )
                assert total == sum(got.values())
                assert not [k for k in self.timers if k[1] == i], "timers left armed while aggregating"
                self.pending_aggregation = i
            case DiscardPartials(iteration=i):
                assert i == iteration
            case (
                IterationCompleted(iteration=i, next_iteration=n)
                | IterationFailed(iteration=i, next_iteration=n)
            ):
                assert i == iteration and n == i + 1
                assert i not in self.ended, "an iteration ended twice"
                assert not [k for k in self.timers if k[1] == i], (
                    "timers left armed after the iteration ended"
                )
                self.ended[i] = "completed" if isinstance(instruction, IterationCompleted) else "failed"
                v = instruction.visits
                assert attrs.evolve(v, participation=(0, 0, 0)) == self.tally, "visits differ from the tally"
                assert sum(v.participation) == v.update_model_accept
                self.tally = Visits()
                if isinstance(instruction, IterationCompleted):
                    assert self.pending_aggregation == i
                    assert len(self.acknowledged.get(i, {})) == self.m.config.update_model_threshold
                self.pending_aggregation = None
            case InstanceStateChanged(old=old, new=new):
                assert old is not new
                assert new is self.m.state
            case _:
                raise AssertionError(f"unknown instruction {instruction!r}")

    # ----------------------------------------------------------------------------------- rules

    def joined(self) -> list[str]:
        """Devices that joined the current iteration and have not uploaded yet."""
        i = self.m.current_iteration
        done = self.acknowledged.get(i, {})
        return [f for f in self.declared.get(i, {}) if f not in done]

    @rule(
        fl_id=st.sampled_from(FL_IDS),
        data_size=st.one_of(st.integers(1, 50), st.sampled_from([0, -3, 65535, 65536])),
    )
    def start_fl_job(self, fl_id: str, data_size: int) -> None:
        self.feed(StartFLJobReceived("start", fl_id, data_size, self.now))

    @precondition(lambda self: bool(self.joined()))
    @rule(data=st.data())
    def joined_device_uploads(self, data: st.DataObject) -> None:
        fl_id = data.draw(st.sampled_from(self.joined()))
        loss = data.draw(st.sampled_from([0.0, 0.5, 2.0]))
        self.feed(
            UpdateModelReceived("update", fl_id, self.m.current_iteration, self.now, loss, 1 - loss / 4)
        )

    @precondition(lambda self: bool(self.acknowledged.get(self.m.current_iteration)))
    @rule(data=st.data())
    def uploaded_device_uploads_again(self, data: st.DataObject) -> None:
        i = self.m.current_iteration
        fl_id = data.draw(st.sampled_from(sorted(self.acknowledged[i])))
        out = self.feed(UpdateModelReceived("again", fl_id, i, self.now))
        assert out is not None
        if self.m.state is InstanceState.RUNNING and not self.m.in_safemode:
            assert out.reply == Rejected(
                ResponseCode.OutOfTime, it.reason_repeated_update(fl_id), self.m.next_req_time_ms(self.now)
            )

    @rule(fl_id=st.sampled_from(FL_IDS), offset=st.sampled_from([0, 0, -1, 1]))
    def any_device_uploads(self, fl_id: str, offset: int) -> None:
        # Repeats, unknown devices, late and early iterations.
        self.feed(UpdateModelReceived("update", fl_id, self.m.current_iteration + offset, self.now))

    @rule(ms=st.one_of(st.integers(0, 2_000), st.integers(-300, -1), st.integers(2_000, 40_000)))
    def wall_clock_moves(self, ms: int) -> None:
        """Time passes (or the wall clock steps back); every window now due fires, earliest first."""
        self.now += ms
        while due := [(d, k) for k, d in self.timers.items() if d <= self.now]:
            _, (kind, i) = min(due)
            del self.timers[(kind, i)]
            iteration = self.m.current_iteration
            out = self.feed(WindowClosed("timer", kind, i, self.now))
            assert out is not None
            assert i == iteration
            # A window that fires while armed always fails its iteration.
            assert any(isinstance(x, IterationFailed) for x in out.instructions)
            assert self.m.current_iteration == iteration + 1

    @precondition(lambda self: self.pending_aggregation is not None)
    @rule(ok=st.sampled_from([True, True, True, False]), gets=st.integers(0, 3))
    def aggregation_result(self, ok: bool, gets: int) -> None:
        i = self.pending_aggregation
        assert i is not None
        event: Event = (
            AggregationDone("agg", i, self.now, gets + 1, gets)
            if ok
            else AggregationFailed("agg", i, "lost", self.now, gets, gets // 2)
        )
        assert self.feed(event) is not None
        assert self.ended[i] == ("completed" if ok else "failed")

    @rule(
        mistake=st.sampled_from(["none", "none", "stale-window", "future-window", "done", "failed"]),
        kind=st.sampled_from(list(WindowKind)),
        offset=st.integers(-2, 2),
    )
    def driver_race_or_mistake(self, mistake: str, kind: WindowKind, offset: int) -> None:
        i = self.m.current_iteration + offset
        if mistake == "stale-window":
            i = min(i, self.m.current_iteration)
            armed = self.timers.pop((kind, i), None) is not None
            out = self.feed(WindowClosed("stale?", kind, i, self.now))
            assert out is not None, "a past or current window is never illegal"
            if not armed:
                assert out == Outcome(), "a stale window changed something"
        elif mistake == "future-window":
            i = self.m.current_iteration + abs(offset) + 1
            assert self.feed(WindowClosed("future", kind, i, self.now)) is None
        elif mistake in ("done", "failed") and self.pending_aggregation != i:
            event: Event = (
                AggregationDone("bogus", i, self.now)
                if mistake == "done"
                else AggregationFailed("bogus", i, "?", self.now)
            )
            assert self.feed(event) is None

    @rule(action=st.sampled_from(["none"] * 8 + ["enable", "disable"]))
    def operator(self, action: str) -> None:
        # Mostly nothing, so that iterations get the chance to run to the end.
        if action == "none":
            return
        enable = action == "enable"
        finished = self.m.state is InstanceState.FINISHED
        out = self.feed(EnableRequested("op", self.now) if enable else DisableRequested("op", self.now))
        assert (out is None) == finished, "only a finished job refuses enable/disable"
        if out is not None and enable:
            assert self.m.state is InstanceState.RUNNING
        elif out is not None:
            assert self.m.state in (InstanceState.DISABLED, InstanceState.FINISHED)
            assert self.m.phase is not Phase.RUNNING

    @rule(restart=st.sampled_from([False, False, False, False, True]))
    def restart_from_snapshot(self, restart: bool) -> None:
        if not restart:
            return
        self.m = IterationMachine.from_snapshot(self.m.snapshot())
        out = self.feed(Resumed("boot", self.now))
        assert out is not None
        rearmed = {(i.kind, i.iteration): i.deadline_ms for i in out.instructions if isinstance(i, ArmWindow)}
        current = {k: d for k, d in self.timers.items() if k[1] == self.m.current_iteration}
        assert rearmed == current
        if self.pending_aggregation is not None:
            assert isinstance(out.instructions[-1], AggregateIteration)

    # ------------------------------------------------------------------------------ invariants

    @invariant()
    def counts_never_exceed_thresholds(self) -> None:
        c = self.m.counts()
        assert 0 <= c.start_fl_job <= c.start_fl_job_threshold
        assert 0 <= c.update_model <= c.update_model_threshold
        assert c.update_model <= c.start_fl_job

    @invariant()
    def iteration_numbers_only_grow(self) -> None:
        assert self.m.current_iteration >= self.highest_iteration
        self.highest_iteration = self.m.current_iteration
        assert self.m.current_iteration not in self.ended
        assert sorted(self.ended) == list(range(1, self.m.current_iteration))

    @invariant()
    def finished_exactly_after_fl_iteration_num(self) -> None:
        finished = self.m.state is InstanceState.FINISHED
        assert finished == (len(self.ended) >= self.m.config.fl_iteration_num)
        assert self.m.current_iteration <= self.m.config.fl_iteration_num + 1

    @invariant()
    def safemode_means_an_aggregation_is_pending(self) -> None:
        assert self.m.in_safemode == (self.pending_aggregation is not None)

    @invariant()
    def armed_windows_match_the_drivers_timers(self) -> None:
        mine = {(w.kind, self.m.current_iteration): w.deadline_ms for w in self.m.armed_windows()}
        assert mine == self.timers

    @invariant()
    def next_req_time_is_in_the_future(self) -> None:
        assert self.m.next_req_time_ms(self.now) > self.now

    @invariant()
    def ended_iterations_and_visits_are_the_machines(self) -> None:
        assert self.m.completed == tuple(i for i in sorted(self.ended) if self.ended[i] == "completed")
        assert self.m.failed == tuple(i for i in sorted(self.ended) if self.ended[i] == "failed")
        assert attrs.evolve(self.m.visits, participation=(0, 0, 0)) == self.tally
        assert all(self.m.has_ended(i) for i in self.ended)
        assert not self.m.has_ended(self.m.current_iteration)

    @invariant()
    def snapshot_round_trip_is_equal(self) -> None:
        snap = self.m.snapshot()
        restored = IterationMachine.from_snapshot(snap)
        assert restored == self.m
        assert restored.snapshot() == snap
        assert snapshot_from_json(snapshot_to_json(snap)) == snap

    @invariant()
    def the_stored_header_and_device_rows_rebuild_the_machine(self) -> None:
        # The leader's store (spec/recovery.md §3.3): after every step, what was committed is the machine.
        self.stored.commit(self.m)
        assert self.stored.restored() == self.m


IterationRules.TestCase.settings = settings(max_examples=150, stateful_step_count=100, deadline=None)
test_iteration_rules = IterationRules.TestCase


def test_a_retried_start_fl_job_is_answered_again_and_counted_once() -> None:
    """spec/recovery.md §5: a device whose startFLJob answer was lost retries; it is not stranded."""
    m = IterationMachine(make_config(start_fl_job_threshold=3))
    first = accepted(m.handle(start("a", data_size=7)))
    accepted(m.handle(start("b")))
    before = m.snapshot()
    again = accepted(m.handle(start("a", data_size=7, now=T0 + 5)))
    assert (again.iteration, again.data_size, again.reason) == (first.iteration, 7, first.reason)
    assert attrs.evolve(m.snapshot(), visits=before.visits) == before  # nothing counted twice
    assert m.visits.start_fl_job_total == 3 and m.visits.start_fl_job_accept == 2
    other = rejected(m.handle(start("a", data_size=8, now=T0 + 6)))  # another data size: a duplicate
    assert other.reason == reason_duplicate_device("a")
    accepted(m.handle(start("c")))  # the round is full now; a retry of "a" is still answered
    accepted(m.handle(start("a", data_size=7, now=T0 + 7)))
    accepted(m.handle(update("a")))
    rejected(m.handle(start("a", data_size=7, now=T0 + 8)))  # after its upload it is refused again


def test_a_late_retry_of_an_update_in_the_last_model_is_told_it_is_in() -> None:
    """spec/recovery.md §5 server.committed_not_acked: the SUCCEED was lost, the update is in model N."""
    m = IterationMachine(make_config(start_fl_job_threshold=2))
    for f in "ab":
        accepted(m.handle(start(f)))
    accepted(m.handle(update("a")))
    accepted(m.handle(update("b")))
    m.handle(AggregationDone("agg", 1, T0 + 10))
    assert m.current_iteration == 2
    late = rejected(m.handle(update("a", iteration=1, now=T0 + 20)))
    assert late.retcode == ResponseCode.OutOfTime and late.reason == reason_repeated_update("a")
    assert late.next_req_time_ms > T0 + 20
    stranger = rejected(m.handle(update("z", iteration=1, now=T0 + 21)))  # never counted: wrong iteration
    assert stranger.reason.startswith("UpdateModel iteration number is invalid")
    assert IterationMachine.from_snapshot(m.snapshot()) == m
    assert snapshot_from_json(snapshot_to_json(m.snapshot())) == m.snapshot()
