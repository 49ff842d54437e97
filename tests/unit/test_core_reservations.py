"""Reservations and confirmations in the iteration machine (spec/recovery.md §4, spec/state-machines.md).

An accepted updateModel that names the Server folding it is a *reservation*: it blocks a repeat from the
same fl_id and does not count to ``update_model_threshold`` until that Server confirms the committed
fold. The property test drives random interleavings of counts, folds, confirmations, restarts (with and
without the store) and windows, and checks after every step that what each Server's committed sum holds
is what the aggregation will accept: counted(S) ⊆ held(S) ⊆ counted(S) ∪ reserved(S).
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from flcluster.core.iteration import (
    SAFEMODE_TEXT,
    Accepted,
    AggregateIteration,
    AggregationDone,
    IterationConfig,
    IterationFailed,
    IterationMachine,
    Phase,
    PlainText,
    Rejected,
    ServerResynced,
    StartFLJobReceived,
    UpdateModelReceived,
    UpdatesConfirmed,
    WindowClosed,
    WindowKind,
    snapshot_from_json,
    snapshot_to_json,
)
from tests.unit.stored_machine import StoredMachine

T0 = 1_700_000_000_000
CONFIG = IterationConfig(
    start_fl_job_threshold=4,
    update_model_ratio=0.5,
    start_fl_job_time_window=10_000,
    update_model_time_window=20_000,
    global_iteration_time_window=60_000,
    fl_iteration_num=50,
    min_retry_delay_ms=1_000,
)


def started(m: IterationMachine, *fl_ids: str) -> None:
    for f in fl_ids:
        assert isinstance(m.handle(StartFLJobReceived("s", f, 3, T0)).reply, Accepted)


def test_a_reservation_blocks_a_repeat_and_does_not_count() -> None:
    m = IterationMachine(CONFIG)
    started(m, "a", "b", "c", "d")
    assert isinstance(m.handle(UpdateModelReceived("u", "a", 1, T0, server="S1")).reply, Accepted)
    # While its fold is unconfirmed a repeat is told to retry later (the fold may yet be lost).
    assert m.handle(UpdateModelReceived("u", "a", 1, T0, server="S2")).reply == PlainText(SAFEMODE_TEXT)
    assert isinstance(m.handle(UpdateModelReceived("u", "b", 1, T0, server="S1")).reply, Accepted)
    assert m.counts().update_model == 0  # threshold 2 not reached by reservations
    assert m.phase == Phase.RUNNING
    out = m.handle(UpdatesConfirmed("c", "S1", 1, ("a", "b"), T0 + 5))
    assert m.counts().update_model == 2 and m.snapshot().phase is Phase.AGGREGATING
    agg = [i for i in out.instructions if isinstance(i, AggregateIteration)]
    assert [d.fl_id for d in agg[0].updates] == ["a", "b"]
    assert agg[0].deadline_ms == T0 + 20_000  # the updateModel window, armed at the first reservation
    # Confirmed, a repeat is refused as the repeat it is.
    again = m.handle(UpdateModelReceived("u", "a", 1, T0 + 6, server="S2")).reply
    assert isinstance(again, Rejected)


def test_a_confirmation_from_another_server_or_iteration_is_ignored() -> None:
    m = IterationMachine(CONFIG)
    started(m, "a", "b")
    m.handle(UpdateModelReceived("u", "a", 1, T0, server="S1"))
    before = m.snapshot()
    assert m.handle(UpdatesConfirmed("c", "S2", 1, ("a",), T0)).instructions == ()
    assert m.handle(UpdatesConfirmed("c", "S1", 2, ("a",), T0)).instructions == ()
    assert m.snapshot() == before


def test_a_resync_counts_what_the_sum_holds_and_releases_the_rest() -> None:
    m = IterationMachine(CONFIG)
    started(m, "a", "b", "c")
    for f in "abc":
        m.handle(UpdateModelReceived("u", f, 1, T0, server="S1"))
    m.handle(ServerResynced("r", "S1", 1, ("b",), T0))
    assert m.holdings("S1") == (frozenset({"b"}), frozenset())
    # Released: the device may upload again, to any Server.
    assert isinstance(m.handle(UpdateModelReceived("u", "a", 1, T0, server="S2")).reply, Accepted)


def test_a_server_back_without_its_counted_updates_fails_the_iteration() -> None:
    m = IterationMachine(CONFIG)
    started(m, "a", "b", "c")
    m.handle(UpdateModelReceived("u", "a", 1, T0, server="S1"))
    m.handle(UpdatesConfirmed("c", "S1", 1, ("a",), T0))
    out = m.handle(ServerResynced("r", "S1", 1, (), T0 + 1))
    assert any(isinstance(i, IterationFailed) for i in out.instructions)
    assert m.current_iteration == 2


def test_snapshot_json_round_trip_with_reservations() -> None:
    m = IterationMachine(CONFIG)
    started(m, "a", "b", "c")
    m.handle(UpdateModelReceived("u", "a", 1, T0, 0.5, 0.25, server="S1"))
    m.handle(UpdateModelReceived("u", "b", 1, T0, server="S2"))
    m.handle(UpdatesConfirmed("c", "S2", 1, ("b",), T0))
    text = snapshot_to_json(m.snapshot())
    assert snapshot_from_json(text) == m.snapshot()
    assert IterationMachine.from_snapshot(snapshot_from_json(text)) == m


SERVERS = ("S1", "S2", "S3")
DEVICES = tuple("abcdef")


class Reservations(RuleBasedStateMachine):
    """Random counts, folds, confirmations, restarts and windows; the exactness rule holds throughout."""

    def __init__(self) -> None:
        super().__init__()
        self.m = IterationMachine(CONFIG)
        self.now = T0
        #: What each Server's committed sum of the current iteration holds.
        self.held: dict[str, set[str]] = {s: set() for s in SERVERS}
        #: Accepted counts each Server has not folded yet (its request task is in flight).
        self.in_flight: dict[str, set[str]] = {s: set() for s in SERVERS}
        self.aggregations: list[AggregateIteration] = []
        self.stored = StoredMachine()

    def handle(self, event: object) -> None:
        iteration = self.m.current_iteration
        out = self.m.handle(event)  # type: ignore[arg-type]
        for ins in out.instructions:
            if isinstance(ins, AggregateIteration):
                self.aggregations.append(ins)
        if self.m.current_iteration != iteration:
            self.held = {s: set() for s in SERVERS}
            self.in_flight = {s: set() for s in SERVERS}
        return None

    @rule(fl_id=st.sampled_from(DEVICES))
    def start(self, fl_id: str) -> None:
        self.now += 10
        self.handle(StartFLJobReceived("s", fl_id, 2, self.now))

    @rule(fl_id=st.sampled_from(DEVICES), server=st.sampled_from(SERVERS))
    def count(self, fl_id: str, server: str) -> None:
        self.now += 10
        reply = self.m.handle(
            UpdateModelReceived("u", fl_id, self.m.current_iteration, self.now, server=server)
        ).reply
        if isinstance(reply, Accepted):
            self.in_flight[server].add(fl_id)

    @rule(server=st.sampled_from(SERVERS), data=st.data())
    def fold_and_confirm(self, server: str, data: st.DataObject) -> None:
        if not self.in_flight[server]:
            return
        fl_id = data.draw(st.sampled_from(sorted(self.in_flight[server])))
        self.in_flight[server].discard(fl_id)
        self.held[server].add(fl_id)  # committed
        if data.draw(st.booleans()):  # the confirmation may be lost with the link
            self.handle(UpdatesConfirmed("c", server, self.m.current_iteration, (fl_id,), self.now))

    @rule(server=st.sampled_from(SERVERS), keeps_store=st.booleans())
    def restart(self, server: str, keeps_store: bool) -> None:
        self.in_flight[server].clear()  # requests in flight died with the process
        if not keeps_store:
            self.held[server].clear()
        self.handle(
            ServerResynced("r", server, self.m.current_iteration, tuple(sorted(self.held[server])), self.now)
        )

    @rule(kind=st.sampled_from(list(WindowKind)))
    def window(self, kind: WindowKind) -> None:
        armed = {w.kind: w.deadline_ms for w in self.m.armed_windows()}
        if kind in armed:
            self.now = max(self.now, armed[kind])
            self.handle(WindowClosed("w", kind, self.m.current_iteration, self.now))

    @rule()
    def aggregate(self) -> None:
        if self.m.phase is not Phase.AGGREGATING:
            return
        # Collection: every Server's in-flight folds settle first (they were counted, so they land).
        for s in SERVERS:
            self.held[s] |= self.in_flight[s]
            self.in_flight[s].clear()
            counted, reserved = self.m.holdings(s)
            assert counted <= self.held[s] <= counted | reserved, (s, counted, reserved, self.held[s])
        self.handle(AggregationDone("a", self.m.current_iteration, self.now))

    @invariant()
    def sums_fit_the_counters(self) -> None:
        for s in SERVERS:
            counted, reserved = self.m.holdings(s)
            assert not counted & reserved
            assert counted <= self.held[s], f"{s} counted {counted} but its sum holds {self.held[s]}"
            assert self.held[s] | self.in_flight[s] <= counted | reserved

    @invariant()
    def snapshot_round_trips(self) -> None:
        snap = self.m.snapshot()
        assert snapshot_from_json(snapshot_to_json(snap)) == snap
        assert IterationMachine.from_snapshot(snap) == self.m

    @invariant()
    def the_stored_header_and_device_rows_rebuild_the_machine(self) -> None:
        self.stored.commit(self.m)  # spec/recovery.md §3.3: what was committed is the machine
        assert self.stored.restored() == self.m

    @invariant()
    def aggregates_start_at_the_threshold_of_confirmed_updates(self) -> None:
        if self.m.phase is Phase.AGGREGATING:
            assert self.m.counts().update_model >= CONFIG.update_model_threshold
        else:
            assert self.m.counts().update_model < CONFIG.update_model_threshold


Reservations.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestReservations = Reservations.TestCase
