"""New instances in the iteration machine (spec/state-machines.md, "New instance"; reference §3.8).

Unit tests pin the rules (refusals, at once or at the end of the running iteration, what is reset, the
snapshot keeps a pending request); :class:`InstanceRules` interleaves device traffic, windows,
aggregation results, disable/enable and new instances, with invariants after every step.
"""

from __future__ import annotations

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from flcluster.core.iteration import (
    MESSAGE_FIRST_ITERATION,
    MESSAGE_INSTANCE_BUSY,
    MESSAGE_NEW_INSTANCE,
    AggregateIteration,
    AggregationDone,
    AggregationFailed,
    ClientParams,
    DisableRequested,
    EnableRequested,
    Event,
    InstanceRenewed,
    InstanceState,
    InstanceStateChanged,
    IterationCompleted,
    IterationMachine,
    NewInstanceRequested,
    OperatorAnswer,
    Outcome,
    PendingInstance,
    Phase,
    WindowClosed,
    WindowKind,
    snapshot_from_json,
    snapshot_to_json,
)
from flcluster.errors import IllegalEvent
from tests.unit.stored_machine import StoredMachine
from tests.unit.test_core_iteration import T0, make_config, run_to_aggregating, start, update

CLIENT = ClientParams(epochs=2, mini_batch=16, lr=0.01)


def new(config_threshold: int = 2, now: int = T0) -> NewInstanceRequested:
    return NewInstanceRequested("new", make_config(start_fl_job_threshold=config_threshold), CLIENT, now)


def finish_iteration(m: IterationMachine, now: int = T0) -> Outcome:
    run_to_aggregating(m, now)
    return m.handle(AggregationDone("done", m.current_iteration, now))


def test_the_first_iteration_needs_no_new_instance() -> None:
    m = IterationMachine(make_config())
    before = m.snapshot()
    assert m.handle(new()) == Outcome(OperatorAnswer(MESSAGE_FIRST_ITERATION, changed=False))
    assert m.snapshot() == before


def test_between_iterations_it_applies_at_once_and_starts_again_at_iteration_1() -> None:
    m = IterationMachine(make_config())
    finish_iteration(m)
    assert m.current_iteration == 2 and m.completed == (1,)
    out = m.handle(new(2))
    assert out.reply == OperatorAnswer(MESSAGE_NEW_INSTANCE, changed=True)
    assert out.instructions == (InstanceRenewed("new", make_config(start_fl_job_threshold=2), CLIENT),)
    assert (m.current_iteration, m.completed, m.failed, m.phase) == (1, (), (), Phase.WAITING)
    assert m.config.start_fl_job_threshold == 2 and m.client == CLIENT


def test_while_an_iteration_runs_it_waits_for_its_end_and_a_second_request_is_refused() -> None:
    m = IterationMachine(make_config())
    finish_iteration(m)
    m.handle(start("x", 10, T0 + 1))  # iteration 2 is running
    assert m.handle(new(2)).reply == OperatorAnswer(MESSAGE_NEW_INSTANCE, changed=True)
    assert m.pending == PendingInstance(make_config(start_fl_job_threshold=2), CLIENT)
    assert m.current_iteration == 2
    before = m.snapshot()
    assert m.handle(new(4)) == Outcome(OperatorAnswer(MESSAGE_INSTANCE_BUSY, changed=False))
    assert m.snapshot() == before
    # The pending request survives a restart of the leader.
    m = IterationMachine.from_snapshot(snapshot_from_json(snapshot_to_json(m.snapshot())))
    out = m.handle(WindowClosed("w", WindowKind.GLOBAL, 2, T0 + 10**7))
    failed = [i for i in out.instructions if type(i).__name__ == "IterationFailed"]
    assert len(failed) == 1 and failed[0].next_iteration == 1
    assert out.instructions[-1] == InstanceRenewed("w", make_config(start_fl_job_threshold=2), CLIENT)
    assert (m.current_iteration, m.pending, m.failed) == (1, None, ())


def test_a_finished_job_starts_again_running() -> None:
    m = IterationMachine(make_config(fl_iteration_num=1))
    finish_iteration(m)
    assert m.state is InstanceState.FINISHED
    out = m.handle(new(2))
    assert m.state is InstanceState.RUNNING and m.current_iteration == 1
    assert out.instructions[-1] == InstanceStateChanged("new", InstanceState.FINISHED, InstanceState.RUNNING)


def test_disabled_while_aggregating_it_waits_for_the_aggregation() -> None:
    m = IterationMachine(make_config())
    finish_iteration(m)
    run_to_aggregating(m)
    m.handle(DisableRequested("off", T0))
    m.handle(new(2))
    assert m.pending is not None and m.phase is Phase.AGGREGATING
    out = m.handle(AggregationDone("done", 2, T0))
    completed = [i for i in out.instructions if isinstance(i, IterationCompleted)]
    assert completed[0].next_iteration == 1
    assert m.state is InstanceState.RUNNING and m.current_iteration == 1


def test_a_pending_instance_while_waiting_is_a_corrupt_snapshot() -> None:
    m = IterationMachine(make_config())
    snap = attrs.evolve(m.snapshot(), pending=PendingInstance(make_config(), None))
    with pytest.raises(ValueError, match="would have applied"):
        IterationMachine.from_snapshot(snap)


class InstanceRules(RuleBasedStateMachine):
    """Device traffic, windows, aggregations, disable/enable and new instances; invariants each step."""

    def __init__(self) -> None:
        super().__init__()
        self.m = IterationMachine(make_config(fl_iteration_num=3))
        self.now = T0
        self.aggregating: int | None = None
        self.devices = 0
        self.expect_config = self.m.config
        self.stored = StoredMachine()

    def feed(self, event: Event) -> Outcome | None:
        before = self.m.snapshot()
        try:
            out = self.m.handle(event)
        except IllegalEvent:
            assert self.m.snapshot() == before
            return None
        for ins in out.instructions:
            if isinstance(ins, AggregateIteration):
                self.aggregating = ins.iteration
            if isinstance(ins, InstanceRenewed):
                assert self.m.current_iteration == 1 and not self.m.completed and not self.m.failed
                self.expect_config = ins.config
                self.aggregating = None
        if (
            isinstance(out.reply, OperatorAnswer)
            and not out.reply.changed
            and isinstance(event, NewInstanceRequested)
        ):
            assert self.m.snapshot() == before
        return out

    @rule()
    def device_runs(self) -> None:
        self.devices += 1
        fl_id = f"d{self.devices}"
        self.feed(start(fl_id, 5, self.now))
        self.feed(update(fl_id, self.m.current_iteration, self.now))

    @rule(ok=st.booleans())
    def aggregation_ends(self, ok: bool) -> None:
        if self.aggregating is None:
            return
        iteration, self.aggregating = self.aggregating, None
        event = (
            AggregationDone("agg", iteration, self.now)
            if ok
            else AggregationFailed("agg", iteration, "lost", self.now)
        )
        self.feed(event)

    @rule(dt=st.sampled_from([1_000, 30_000, 200_000]))
    def time_passes(self, dt: int) -> None:
        self.now += dt
        for kind in WindowKind:
            self.feed(WindowClosed("w", kind, self.m.current_iteration, self.now))

    @rule(threshold=st.integers(1, 3), iterations=st.integers(1, 4))
    def new_instance(self, threshold: int, iterations: int) -> None:
        config = make_config(start_fl_job_threshold=threshold, fl_iteration_num=iterations)
        self.feed(NewInstanceRequested("new", config, CLIENT, self.now))

    @rule(enable=st.booleans())
    def operator(self, enable: bool) -> None:
        self.feed(EnableRequested("on", self.now) if enable else DisableRequested("off", self.now))

    @invariant()
    def pending_only_while_an_iteration_runs(self) -> None:
        assert self.m.pending is None or self.m.phase is not Phase.WAITING
        assert self.m.config == self.expect_config

    @invariant()
    def the_snapshot_round_trips(self) -> None:
        snap = self.m.snapshot()
        assert snapshot_from_json(snapshot_to_json(snap)) == snap
        assert IterationMachine.from_snapshot(snap) == self.m

    @invariant()
    def the_stored_header_and_device_rows_rebuild_the_machine(self) -> None:
        # A new instance drops the devices' last_completed marks: the rows committed must follow.
        self.stored.commit(self.m)
        assert self.stored.restored() == self.m


def test_instance_rules_hold_after_every_step() -> None:
    run_state_machine_as_test(
        InstanceRules, settings=settings(max_examples=60, stateful_step_count=40, deadline=None)
    )
