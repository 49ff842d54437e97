"""Scaling and instance operations of the cluster machine (spec/state-machines.md, "Scaling").

The unit tests pin single rules: the management API's answers, the barrier, completion with compacted
ranks, rollback (asked for, and at the deadline), liveness while scaling, the operator's flags. The
property test (:class:`ScalingRules`) drives random registrations, liveness, scaling requests, barrier
reports, rollbacks, deadlines and restarts, and checks the invariants after every step.
"""

from __future__ import annotations

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
    run_state_machine_as_test,
)

from flcluster.core.cluster import (
    AcceptRegistration,
    BarrierReached,
    ClusterConfig,
    ClusterMachine,
    ClusterState,
    DisableFLSRequested,
    EnableFLSRequested,
    Event,
    Heartbeat,
    InstanceOperationEnded,
    LivenessCheck,
    NewInstanceStarted,
    NodeLivenessChanged,
    Operation,
    OperatorReply,
    Outcome,
    RefuseRegistration,
    ReleaseNodes,
    ScaleInRequested,
    ScaleKind,
    ScaleOutRequested,
    ScaleOutRollbackRequested,
    Scaling,
    ScalingDeadlinePassed,
    ScalingEnded,
    SendMembership,
    StateChanged,
)
from flcluster.core.scaling import (
    MESSAGE_ALREADY_DISABLED,
    MESSAGE_NODE_IDS_EMPTY,
    MESSAGE_NOT_CONNECTED,
    MESSAGE_NOT_DISABLED,
    MESSAGE_NOT_READY,
    MESSAGE_NOT_READY_FOR_ROLLBACK,
    MESSAGE_NOT_SCALING_OUT,
    MESSAGE_ROLLED_BACK,
    MESSAGE_SCALE_IN,
    MESSAGE_SCALE_OUT,
)
from flcluster.errors import IllegalEvent
from tests.unit.test_core_cluster import TIMEOUT, check, heartbeat, of_type, ranks, register

SCALING_TIMEOUT = 60_000


def cluster(*node_ids: str, now: int = 0) -> ClusterMachine:
    """A READY cluster of these Servers (ranks in this order), with a 60 s scaling timeout."""
    machine = ClusterMachine(
        ClusterConfig(
            server_num=len(node_ids), heartbeat_timeout_ms=TIMEOUT, scaling_timeout_ms=SCALING_TIMEOUT
        )
    )
    for node_id in node_ids:
        assert isinstance(
            machine.handle(register(node_id, now, server_num=len(node_ids))).reply, AcceptRegistration
        )
    assert machine.state is ClusterState.CLUSTER_READY
    return machine


def scale_out(k: int, now: int = 0, connected: int | None = None, *, machine: ClusterMachine) -> Outcome:
    n = len(machine.members()) if connected is None else connected
    return machine.handle(ScaleOutRequested("scaleout", k, n, now))


def scale_in(
    ids: list[str], now: int = 0, connected: int | None = None, *, machine: ClusterMachine
) -> Outcome:
    n = len(machine.members()) if connected is None else connected
    return machine.handle(ScaleInRequested("scalein", tuple(ids), n, now))


def barrier(node_id: str, now: int = 0) -> BarrierReached:
    return BarrierReached("barrier", node_id, 3, now)


def refused(out: Outcome, message: str) -> bool:
    return out == Outcome(OperatorReply(out.reply.cause if out.reply else "", False, message))


# ----------------------------------------------------------------------------------- scale out


def test_scale_out_waits_for_the_barrier_and_every_new_server_then_is_ready() -> None:
    m = cluster("a", "b")
    out = scale_out(2, 1_000, machine=m)
    assert out.reply == OperatorReply("scaleout", True, MESSAGE_SCALE_OUT)
    assert of_type(out.instructions, StateChanged)[0].new is ClusterState.CLUSTER_SCALE_OUT
    assert out.instructions[-1] == SendMembership("scaleout", ClusterState.CLUSTER_SCALE_OUT, m.members())
    assert (m.server_num, m.scaling) == (
        4,
        Scaling(
            kind=ScaleKind.OUT, old_server_num=2, new_server_num=4, started_at_ms=1_000, deadline_ms=61_000
        ),
    )
    assert m.next_scaling_deadline() == 61_000

    got = m.handle(register("c", 2_000, server_num=4))
    assert got.reply == AcceptRegistration("register:c@2000", "c", 2)
    assert got.instructions == (
        SendMembership("register:c@2000", ClusterState.CLUSTER_SCALE_OUT, m.members()),
    )
    assert m.handle(barrier("a", 3_000)) == Outcome()  # at rest, but d is not there yet
    assert m.state is ClusterState.CLUSTER_SCALE_OUT

    done = m.handle(register("d", 4_000, server_num=4))
    assert done.reply == AcceptRegistration("register:d@4000", "d", 3)
    assert m.state is ClusterState.CLUSTER_READY and m.scaling is None and m.server_num == 4
    assert ranks(m) == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert of_type(done.instructions, SendMembership) == [
        SendMembership("register:d@4000", ClusterState.CLUSTER_READY, m.members())
    ]
    assert of_type(done.instructions, ScalingEnded) == [
        ScalingEnded("register:d@4000", ScaleKind.OUT, True, 2, 4, 3_000, "scale out to 4 Servers completed")
    ]
    assert m.next_scaling_deadline() is None


def test_the_new_servers_may_register_before_the_barrier() -> None:
    m = cluster("a", "b")
    scale_out(1, machine=m)
    m.handle(register("c", 0, server_num=3))
    assert m.state is ClusterState.CLUSTER_SCALE_OUT
    out = m.handle(barrier("a", 500))
    assert m.state is ClusterState.CLUSTER_READY
    assert of_type(out.instructions, ScalingEnded)[0].took_ms == 500


def test_a_new_server_started_with_the_old_total_is_refused_naming_both() -> None:
    m = cluster("a", "b")
    scale_out(2, machine=m)
    before = m.snapshot()
    out = m.handle(register("c", 0, server_num=2))
    assert isinstance(out.reply, RefuseRegistration)
    assert "server_num=2" in out.reply.reason and "server_num=4" in out.reply.reason
    assert m.snapshot() == before


def test_a_known_server_restarted_with_its_old_total_keeps_its_rank() -> None:
    """An old Server (started with --server_num=2) restarting after a scale-out to 3."""
    m = cluster("a", "b")
    scale_out(1, machine=m)
    m.handle(register("c", 0, server_num=3))
    m.handle(barrier("a"))
    assert m.handle(register("b", 1_000, server_num=2)).reply == AcceptRegistration("register:b@1000", "b", 1)


@pytest.mark.parametrize(
    ("k", "connected", "message"),
    [
        (0, None, "The server_num to scale out should be at least 1, got 0."),
        (70_000, None, "The server_num to scale out makes 70002 Servers; at most 65535 are supported."),
        (1, 1, MESSAGE_NOT_CONNECTED),
    ],
)
def test_scale_out_refusals_change_nothing(k: int, connected: int | None, message: str) -> None:
    m = cluster("a", "b")
    before = m.snapshot()
    out = scale_out(k, connected=connected, machine=m)
    assert out == Outcome(OperatorReply("scaleout", False, message))
    assert m.snapshot() == before


def test_scaling_while_scaling_or_disabled_is_not_ready() -> None:
    m = cluster("a", "b")
    scale_out(1, machine=m)
    before = m.snapshot()
    assert scale_out(1, connected=2, machine=m) == Outcome(
        OperatorReply("scaleout", False, MESSAGE_NOT_READY)
    )
    assert scale_in(["b"], connected=2, machine=m) == Outcome(
        OperatorReply("scalein", False, MESSAGE_NOT_READY)
    )
    assert m.snapshot() == before
    d = cluster("a", "b")
    d.handle(DisableFLSRequested("disable", 2))
    before = d.snapshot()
    assert scale_out(1, machine=d).reply == OperatorReply("scaleout", False, MESSAGE_NOT_READY)
    assert d.snapshot() == before


# ------------------------------------------------------------------------------------ scale in


def test_scale_in_removes_the_servers_and_compacts_the_ranks_at_the_barrier() -> None:
    m = cluster("a", "b", "c", "d", "e")
    out = scale_in(["c", "b", "c"], 100, machine=m)
    assert out.reply == OperatorReply("scalein", True, MESSAGE_SCALE_IN)
    assert m.state is ClusterState.CLUSTER_SCALE_IN
    assert m.scaling is not None and m.scaling.removed == ("c", "b") and m.server_num == 3
    assert len(m.members()) == 5  # they serve on until the barrier

    done = m.handle(barrier("a", 700))
    assert ranks(m) == {"a": 0, "d": 1, "e": 2}
    assert m.state is ClusterState.CLUSTER_READY and m.server_num == 3
    assert of_type(done.instructions, ReleaseNodes) == [ReleaseNodes("barrier", ("c", "b"), "scaled in")]
    membership = of_type(done.instructions, SendMembership)
    assert membership == [SendMembership("barrier", ClusterState.CLUSTER_READY, m.members())]
    assert done.instructions.index(membership[0]) < done.instructions.index(
        of_type(done.instructions, ReleaseNodes)[0]
    )
    assert of_type(done.instructions, ScalingEnded)[0] == ScalingEnded(
        "barrier", ScaleKind.IN, True, 5, 3, 600, "scale in to 3 Servers completed"
    )
    # A removed node is a stranger now: a heartbeat from it is illegal, a registration refused (full).
    with pytest.raises(IllegalEvent):
        m.handle(heartbeat("b", 800))
    assert isinstance(m.handle(register("b", 800, server_num=3)).reply, RefuseRegistration)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([], MESSAGE_NODE_IDS_EMPTY),
        (["b", "zz"], "The node id:zz is illegal."),
        (["a"], "The node id:a is rank 0 of server, should not be scale in."),
        ([""], "The node id: is illegal."),
    ],
)
def test_scale_in_refusals_change_nothing(ids: list[str], message: str) -> None:
    m = cluster("a", "b", "c")
    before = m.snapshot()
    assert scale_in(ids, machine=m) == Outcome(OperatorReply("scalein", False, message))
    assert m.snapshot() == before


def test_scale_in_needs_every_link() -> None:
    m = cluster("a", "b", "c")
    assert scale_in(["b"], connected=2, machine=m).reply == OperatorReply(
        "scalein", False, MESSAGE_NOT_CONNECTED
    )


def test_only_the_leader_reports_the_barrier_and_a_stale_report_is_ignored() -> None:
    m = cluster("a", "b")
    assert m.handle(barrier("a")) == Outcome()  # not scaling: stale
    scale_in(["b"], machine=m)
    before = m.snapshot()
    with pytest.raises(IllegalEvent, match="only the leader"):
        m.handle(barrier("b"))
    assert m.snapshot() == before


# ------------------------------------------------------------------------------------ rollback


def test_rollback_is_refused_outside_a_scale_out_and_before_the_barrier() -> None:
    m = cluster("a", "b")
    rb = ScaleOutRollbackRequested("rollback", 0)
    assert m.handle(rb) == Outcome(OperatorReply("rollback", False, MESSAGE_NOT_SCALING_OUT))
    scale_in(["b"], machine=m)
    assert m.handle(rb) == Outcome(OperatorReply("rollback", False, MESSAGE_NOT_SCALING_OUT))
    o = cluster("a", "b")
    scale_out(2, machine=o)
    before = o.snapshot()
    assert o.handle(rb) == Outcome(OperatorReply("rollback", False, MESSAGE_NOT_READY_FOR_ROLLBACK))
    assert o.snapshot() == before


def test_rollback_restores_the_old_total_and_releases_the_new_servers() -> None:
    m = cluster("a", "b")
    scale_out(2, machine=m)
    m.handle(register("c", 0, server_num=4))
    m.handle(barrier("a", 10))
    out = m.handle(ScaleOutRollbackRequested("rollback", 20))
    assert out.reply == OperatorReply("rollback", True, MESSAGE_ROLLED_BACK)
    assert ranks(m) == {"a": 0, "b": 1} and m.server_num == 2 and m.scaling is None
    assert m.state is ClusterState.CLUSTER_READY
    assert of_type(out.instructions, ReleaseNodes) == [
        ReleaseNodes("rollback", ("c",), "the scale-out they joined was rolled back")
    ]
    ended = of_type(out.instructions, ScalingEnded)[0]
    assert (ended.completed, ended.old_server_num, ended.new_server_num) == (False, 2, 2)


def test_the_deadline_rolls_a_scale_out_back_saying_what_was_missing() -> None:
    m = cluster("a", "b")
    scale_out(2, 1_000, machine=m)
    m.handle(register("c", 0, server_num=4))
    assert m.handle(ScalingDeadlinePassed("deadline", 60_999)) == Outcome()  # not yet
    out = m.handle(ScalingDeadlinePassed("deadline", 61_000))
    assert ranks(m) == {"a": 0, "b": 1} and m.state is ClusterState.CLUSTER_READY
    reason = of_type(out.instructions, ScalingEnded)[0].reason
    assert "barrier not reached" in reason and "1 of 2 new Servers registered" in reason
    assert m.handle(ScalingDeadlinePassed("late", 70_000)) == Outcome()


def test_the_deadline_rolls_a_scale_in_back_keeping_every_server() -> None:
    m = cluster("a", "b", "c")
    scale_in(["c"], machine=m)
    out = m.handle(ScalingDeadlinePassed("deadline", SCALING_TIMEOUT))
    assert ranks(m) == {"a": 0, "b": 1, "c": 2} and m.server_num == 3
    assert m.state is ClusterState.CLUSTER_READY
    assert not of_type(out.instructions, ReleaseNodes)


# ------------------------------------------------------------------------ liveness while scaling


def test_a_server_dying_while_scaling_keeps_the_scaling_state_and_completes_as_node_timeout() -> None:
    m = cluster("a", "b", "c")
    scale_in(["c"], machine=m)
    out = m.handle(check(TIMEOUT))  # everyone silent since 0
    assert [i.node_id for i in of_type(out.instructions, NodeLivenessChanged)] == ["a", "b", "c"]
    assert m.state is ClusterState.CLUSTER_SCALE_IN
    m.handle(register("a", TIMEOUT + 1, server_num=3))  # the leader restarted: same rank
    assert ranks(m)["a"] == 0
    m.handle(barrier("a", TIMEOUT + 2))
    assert ranks(m) == {"a": 0, "b": 1}
    assert m.state is ClusterState.NODE_TIMEOUT  # b is still down
    m.handle(Heartbeat("hb", "b", TIMEOUT + 3))
    assert m.state is ClusterState.CLUSTER_READY


# ---------------------------------------------------------------------------- instance operations


def test_disable_then_enable_through_the_transient_state() -> None:
    m = cluster("a", "b")
    assert m.handle(EnableFLSRequested("enable", 2)).reply == OperatorReply(
        "enable", False, MESSAGE_NOT_DISABLED
    )
    out = m.handle(DisableFLSRequested("disable", 2))
    assert out.reply == OperatorReply("disable", True, "start disabling FL-Server successful.")
    assert out.instructions[-1] == SendMembership("disable", ClusterState.CLUSTER_DISABLE_FLS, m.members())
    before = m.snapshot()
    assert m.handle(DisableFLSRequested("again", 2)).reply == OperatorReply(
        "again", False, MESSAGE_ALREADY_DISABLED
    )
    assert m.snapshot() == before
    m.handle(check(TIMEOUT))  # nobody heartbeats: liveness changes, the state does not
    assert m.state is ClusterState.CLUSTER_DISABLE_FLS
    m.handle(Heartbeat("hb", "a", TIMEOUT))
    m.handle(Heartbeat("hb", "b", TIMEOUT))
    out = m.handle(EnableFLSRequested("enable", 2))
    assert out.reply == OperatorReply("enable", True, "start enabling FL-Server successful.")
    assert m.state is ClusterState.CLUSTER_ENABLE_FLS and m.operation is Operation.ENABLE_FLS
    m.handle(InstanceOperationEnded("ended", False))
    assert m.state is ClusterState.CLUSTER_READY and not m.disabled


def test_a_new_instance_runs_in_ready_or_disabled_and_the_leaders_answer_settles_the_flag() -> None:
    m = cluster("a", "b")
    m.handle(DisableFLSRequested("disable", 2))
    out = m.handle(NewInstanceStarted("new", 2))
    assert out.reply == OperatorReply("new", True, "") and m.state is ClusterState.CLUSTER_NEW_INSTANCE
    assert m.handle(NewInstanceStarted("again", 2)).reply == OperatorReply("again", False, MESSAGE_NOT_READY)
    m.handle(InstanceOperationEnded("ended", False))  # applied at once: the instance runs
    assert m.state is ClusterState.CLUSTER_READY
    with pytest.raises(IllegalEvent, match="none is in progress"):
        m.handle(InstanceOperationEnded("stray", False))


def test_a_restart_keeps_a_scaling_exactly() -> None:
    m = cluster("a", "b")
    scale_out(1, machine=m)
    m.handle(register("c", 0, server_num=3))
    twin = ClusterMachine.from_snapshot(m.config, m.snapshot())
    assert twin == m
    assert twin.handle(barrier("a")) == m.handle(barrier("a"))


def test_a_corrupt_scaling_record_is_refused() -> None:
    m = cluster("a", "b")
    scale_out(2, machine=m)
    m.handle(register("c", 0, server_num=4))
    good = m.snapshot()
    assert good.scaling is not None
    cases: list[tuple[dict[str, Any], str]] = [
        ({"scaling": attrs.evolve(good.scaling, joined=())}, "must be the nodes after rank 1"),
        ({"scaling": attrs.evolve(good.scaling, new_server_num=5)}, "makes 5, but server_num is 4"),
        ({"scaling": None}, "does not fit the snapshot, which gives CLUSTER_READY"),
        ({"disabled": True}, "a scaling starts only from CLUSTER_READY"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            ClusterMachine.from_snapshot(m.config, attrs.evolve(good, **change))


# ------------------------------------------------------------------------------ property test

POOL = ("n0", "n1", "n2", "n3", "n4", "n5")


class ScalingRules(RuleBasedStateMachine):
    """Random scaling against a formed cluster; invariants after every step (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.machine = cluster("n0")
        self.now = 0
        self.leader = "n0"
        self.before_scaling: tuple[tuple[str, ...], int] | None = None

    @initialize(n=st.integers(1, 3))
    def start(self, n: int) -> None:
        self.machine = cluster(*POOL[:n])

    def feed(self, event: Event) -> Outcome:
        """Handle on the machine and on a twin rebuilt from its snapshot: both must agree."""
        twin = ClusterMachine.from_snapshot(self.machine.config, self.machine.snapshot())
        before = self.machine.snapshot()
        try:
            expected = twin.handle(event)
        except IllegalEvent:
            with pytest.raises(IllegalEvent):
                self.machine.handle(event)
            assert self.machine.snapshot() == before
            raise
        out = self.machine.handle(event)
        assert out == expected and twin.snapshot() == self.machine.snapshot()
        if isinstance(out.reply, OperatorReply) and not out.reply.ok:
            assert out.instructions == () and self.machine.snapshot() == before
        if isinstance(out.reply, RefuseRegistration):
            assert self.machine.snapshot() == before
        self.after(out)
        return out

    def ids(self) -> tuple[str, ...]:
        return tuple(m.node_id for m in self.machine.members())

    def connected(self) -> int:
        return len(self.machine.members())

    def after(self, out: Outcome) -> None:
        scaling = self.machine.scaling
        if scaling is not None and self.before_scaling is None:
            self.before_scaling = (self.ids()[: scaling.old_server_num], scaling.old_server_num)
        for ended in of_type(out.instructions, ScalingEnded):
            assert self.before_scaling is not None
            old_ids, old_total = self.before_scaling
            if ended.completed and ended.kind is ScaleKind.OUT:
                assert self.ids()[: len(old_ids)] == old_ids and self.machine.server_num == len(self.ids())
            elif ended.completed:
                assert set(self.ids()) <= set(old_ids)
                assert [i for i in old_ids if i in self.ids()] == list(self.ids())  # order kept
            else:
                assert self.ids() == old_ids and self.machine.server_num == old_total
            self.before_scaling = None

    # ------------------------------------------------------------------------------------ rules

    @rule(node_id=st.sampled_from(POOL), stale_total=st.booleans())
    def register(self, node_id: str, stale_total: bool) -> None:
        total = self.machine.server_num - 1 if stale_total else self.machine.server_num
        self.feed(register(node_id, self.now, server_num=max(total, 1)))

    @rule()
    def everyone_heartbeats(self) -> None:
        for node_id in self.ids():
            self.feed(Heartbeat("hb", node_id, self.now))

    @rule(node_id=st.sampled_from(POOL))
    def heartbeat(self, node_id: str) -> None:
        try:
            self.feed(Heartbeat("hb", node_id, self.now))
        except IllegalEvent:
            assert node_id not in self.ids()

    @rule(dt=st.sampled_from([1, 1_000, 1_000, 5_000, TIMEOUT, SCALING_TIMEOUT]))
    def advance(self, dt: int) -> None:
        self.now += dt
        self.feed(LivenessCheck("check", self.now))
        self.feed(ScalingDeadlinePassed("deadline", self.now))

    @rule(k=st.sampled_from([1, 1, 2, 0, 3]), drop_link=st.sampled_from([False, False, False, True]))
    @precondition(lambda self: self.machine.scaling is None)
    def scale_out(self, k: int, drop_link: bool) -> None:
        self.feed(ScaleOutRequested("out", k, self.connected() - drop_link, self.now))

    @rule(count=st.integers(1, 2))
    @precondition(lambda self: self.machine.scaling is None)
    def scale_in_highest(self, count: int) -> None:
        """What ``flcluster scale`` does: remove the highest ranks."""
        self.feed(ScaleInRequested("in", self.ids()[1:][-count:], self.connected(), self.now))

    @rule(picks=st.lists(st.sampled_from(POOL), max_size=3))
    @precondition(lambda self: self.machine.scaling is None)
    def scale_in(self, picks: list[str]) -> None:
        self.feed(ScaleInRequested("in", tuple(picks), self.connected(), self.now))

    @rule(node_id=st.sampled_from(POOL))
    def report_barrier(self, node_id: str) -> None:
        try:
            self.feed(BarrierReached("barrier", node_id, 1, self.now))
        except IllegalEvent:
            assert self.machine.scaling is not None and node_id != self.leader

    @rule()
    def leader_reports_barrier(self) -> None:
        self.feed(BarrierReached("barrier", self.leader, 1, self.now))

    @rule()
    def a_new_server_registers(self) -> None:
        fresh = [n for n in POOL if n not in self.ids()]
        if fresh:
            self.feed(register(fresh[0], self.now, server_num=self.machine.server_num))

    @rule()
    def rollback(self) -> None:
        self.feed(ScaleOutRollbackRequested("rollback", self.now))

    @rule(op=st.sampled_from(["disable", "enable", "new", "ended"]), disabled=st.booleans())
    def operate(self, op: str, disabled: bool) -> None:
        match op:
            case "disable":
                self.feed(DisableFLSRequested("disable", self.connected()))
            case "enable":
                self.feed(EnableFLSRequested("enable", self.connected()))
            case "new":
                self.feed(NewInstanceStarted("new", self.connected()))
            case _:
                try:
                    self.feed(InstanceOperationEnded("ended", disabled))
                except IllegalEvent:
                    assert self.machine.operation is None

    @rule()
    def restart(self) -> None:
        snap = self.machine.snapshot()
        self.machine = ClusterMachine.from_snapshot(self.machine.config, snap)
        assert self.machine.snapshot() == snap

    # ------------------------------------------------------------------------------- invariants

    @invariant()
    def ranks_are_contiguous_and_the_leader_never_changes(self) -> None:
        members = self.machine.members()
        assert [m.rank for m in members] == list(range(len(members)))
        assert members[0].node_id == self.leader

    @invariant()
    def the_state_is_the_scaling_state_exactly_while_scaling(self) -> None:
        scaling = self.machine.scaling
        state = self.machine.state
        assert (state in (ClusterState.CLUSTER_SCALE_OUT, ClusterState.CLUSTER_SCALE_IN)) == (
            scaling is not None
        )
        if scaling is not None:
            assert (scaling.kind is ScaleKind.OUT) == (state is ClusterState.CLUSTER_SCALE_OUT)
            assert self.machine.next_scaling_deadline() == scaling.deadline_ms

    @invariant()
    def never_more_members_than_the_totals(self) -> None:
        scaling = self.machine.scaling
        most = (
            self.machine.server_num
            if scaling is None
            else max(scaling.old_server_num, scaling.new_server_num)
        )
        assert len(self.machine.members()) <= most
        if scaling is None:
            assert len(self.machine.members()) == self.machine.server_num

    @invariant()
    def the_snapshot_round_trips(self) -> None:
        snap = self.machine.snapshot()
        assert ClusterMachine.from_snapshot(self.machine.config, snap).snapshot() == snap


def test_scaling_rules_hold_after_every_step() -> None:
    run_state_machine_as_test(
        ScalingRules, settings=settings(max_examples=120, stateful_step_count=40, deadline=None)
    )
