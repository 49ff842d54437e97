"""The Scheduler's cluster rules (:mod:`flcluster.core.cluster`), tested as a pure state machine.

Reference §3.7: ranks 0..N-1 by arrival, a known node id gets its old rank back, CLUSTER_READY when the
N-th Server registers, NODE_TIMEOUT while a node is silent, EXIT when every node finished or the start-up
timeout ran out. Illegal events raise :class:`IllegalEvent` and change nothing (the h11 rule).

The unit tests pin single rules; :class:`ClusterRules` drives random registrations, heartbeats and clock
advances against a small model and checks the invariants after every step.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from flcluster.core.cluster import (
    AcceptRegistration,
    BeginShutdown,
    ClusterConfig,
    ClusterMachine,
    ClusterState,
    Event,
    ExitCluster,
    Heartbeat,
    Instruction,
    LivenessCheck,
    Member,
    NodeFinished,
    NodeInfo,
    NodeLivenessChanged,
    RefuseRegistration,
    RegisterNode,
    Role,
    SendMembership,
    SendShutdown,
    ShutdownDeadlinePassed,
    StartupDeadlinePassed,
    StateChanged,
)
from flcluster.errors import IllegalEvent

TIMEOUT = 30.0
FL_ITERATION_NUM = 20


def node_info(node_id: str, role: Role = Role.SERVER) -> NodeInfo:
    """What a Server with this id would register with (ports derived from the id, so rows differ)."""
    return NodeInfo(
        node_id=node_id,
        role=role,
        host="127.0.0.1",
        port=7000 + sum(node_id.encode()),
        device_port=6668,
        pid=4242,
    )


def register(
    node_id: str,
    now: float = 0.0,
    *,
    server_num: int = 2,
    fl_iteration_num: int = FL_ITERATION_NUM,
    role: Role = Role.SERVER,
    recovering: bool = False,
) -> RegisterNode:
    return RegisterNode(
        cause=f"register:{node_id}@{now}",
        info=node_info(node_id, role),
        server_num=server_num,
        fl_iteration_num=fl_iteration_num,
        recovering=recovering,
        now=now,
    )


def heartbeat(node_id: str, now: float) -> Heartbeat:
    return Heartbeat(cause=f"hb:{node_id}@{now}", node_id=node_id, now=now)


def check(now: float) -> LivenessCheck:
    return LivenessCheck(cause=f"liveness@{now}", now=now)


def new_machine(server_num: int = 2) -> ClusterMachine:
    return ClusterMachine(ClusterConfig(server_num=server_num, heartbeat_timeout=TIMEOUT))


def ready_machine(*node_ids: str, now: float = 0.0) -> ClusterMachine:
    """A machine whose Servers (``node_ids``, ranks in that order) all registered at ``now``."""
    machine = new_machine(len(node_ids))
    for node_id in node_ids:
        machine.handle(register(node_id, now, server_num=len(node_ids)))
    assert machine.state is ClusterState.CLUSTER_READY
    return machine


def of_type(instructions: list[Instruction], cls: type[Any]) -> list[Any]:
    return [i for i in instructions if isinstance(i, cls)]


def snapshot(machine: ClusterMachine) -> tuple[tuple[Member, ...], ClusterState, float, int | None]:
    return machine.members(), machine.state, machine.next_liveness_deadline(), machine.fl_iteration_num


def ranks(machine: ClusterMachine) -> dict[str, int]:
    return {m.node_id: m.rank for m in machine.members()}


def alive(machine: ClusterMachine) -> dict[str, bool]:
    return {m.node_id: m.alive for m in machine.members()}


# ------------------------------------------------------------------------------------------ ranks


def test_ranks_are_given_in_order_of_arrival() -> None:
    machine = new_machine(4)
    given = []
    for i, node_id in enumerate(["c", "a", "d", "b"]):
        out = machine.handle(register(node_id, float(i), server_num=4))
        (accept,) = of_type(out, AcceptRegistration)
        assert (accept.node_id, accept.cause) == (node_id, f"register:{node_id}@{float(i)}")
        given.append(accept.rank)
    assert given == [0, 1, 2, 3]
    assert [(m.rank, m.node_id) for m in machine.members()] == [(0, "c"), (1, "a"), (2, "d"), (3, "b")]
    assert machine.fl_iteration_num == FL_ITERATION_NUM


def test_a_known_node_id_gets_its_old_rank_back() -> None:
    machine = ready_machine("a", "b", "c")
    out = machine.handle(register("b", 5.0, server_num=3, recovering=True))
    assert of_type(out, AcceptRegistration) == [AcceptRegistration("register:b@5.0", "b", 1)]
    assert ranks(machine) == {"a": 0, "b": 1, "c": 2}
    assert machine.state is ClusterState.CLUSTER_READY
    # The re-registration counts as a heartbeat: b's deadline moved, a's did not.
    assert machine.next_liveness_deadline() == TIMEOUT
    machine.handle(heartbeat("a", 5.0))
    machine.handle(heartbeat("c", 5.0))
    assert machine.next_liveness_deadline() == 5.0 + TIMEOUT


def test_re_registering_after_node_timeout_brings_the_node_back_and_the_cluster_ready() -> None:
    machine = ready_machine("a", "b")
    machine.handle(heartbeat("b", 20.0))
    out = machine.handle(check(TIMEOUT))
    assert of_type(out, NodeLivenessChanged) == [NodeLivenessChanged(f"liveness@{TIMEOUT}", "a", False)]
    assert machine.state is ClusterState.NODE_TIMEOUT

    out = machine.handle(register("a", 31.0, recovering=True))
    cause = "register:a@31.0"
    assert out == [
        NodeLivenessChanged(cause, "a", True),
        AcceptRegistration(cause, "a", 0),
        StateChanged(
            cause, ClusterState.NODE_TIMEOUT, ClusterState.CLUSTER_READY, "node 'a' registered again"
        ),
        SendMembership(cause, ClusterState.CLUSTER_READY, machine.members()),
    ]
    assert ranks(machine) == {"a": 0, "b": 1}
    assert alive(machine) == {"a": True, "b": True}
    assert machine.next_liveness_deadline() == 20.0 + TIMEOUT


def revive_before_formed() -> tuple[ClusterMachine, list[Instruction]]:
    """Server "a" of three registers, times out, and re-registers before the others arrive."""
    machine = new_machine(3)
    machine.handle(register("a", 0.0, server_num=3))
    machine.handle(check(TIMEOUT))
    out = machine.handle(register("a", 40.0, server_num=3, recovering=True))
    return machine, out


def test_re_registering_before_the_cluster_formed_returns_to_starting() -> None:
    machine, out = revive_before_formed()
    assert of_type(out, NodeLivenessChanged) == [NodeLivenessChanged(out[0].cause, "a", True)]
    assert alive(machine) == {"a": True}
    # Reference §3.7: "When all heartbeats return, the state goes back to READY (or STARTING)".
    assert machine.state is ClusterState.CLUSTER_STARTING
    assert [(s.old, s.new) for s in of_type(out, StateChanged)] == [
        (ClusterState.NODE_TIMEOUT, ClusterState.CLUSTER_STARTING)
    ]
    assert out[-1] == SendMembership(out[0].cause, ClusterState.CLUSTER_STARTING, machine.members())


# -------------------------------------------------------------------------------------- refusals


def test_a_registration_with_another_server_num_is_refused_naming_both_values() -> None:
    machine = new_machine(2)
    out = machine.handle(register("a", server_num=3))
    assert len(out) == 1
    (refusal,) = out
    assert isinstance(refusal, RefuseRegistration)
    assert refusal.node_id == "a"
    assert "server_num=3" in refusal.reason
    assert "server_num=2" in refusal.reason
    assert snapshot(machine) == ((), ClusterState.CLUSTER_STARTING, math.inf, None)


def test_a_registration_with_another_fl_iteration_num_is_refused_naming_both_values() -> None:
    machine = new_machine(2)
    machine.handle(register("a", fl_iteration_num=20))
    before = snapshot(machine)
    out = machine.handle(register("b", 1.0, fl_iteration_num=25))
    assert [type(i) for i in out] == [RefuseRegistration]
    assert "fl_iteration_num=25" in out[0].reason
    assert "fl_iteration_num=20" in out[0].reason
    assert snapshot(machine) == before
    # The value agreed on is the first accepted one; a Server that matches it still gets in.
    out = machine.handle(register("b", 2.0, fl_iteration_num=20))
    assert of_type(out, AcceptRegistration) == [AcceptRegistration("register:b@2.0", "b", 1)]


def test_a_registration_beyond_the_total_is_refused_and_changes_nothing() -> None:
    machine = ready_machine("a", "b")
    before = snapshot(machine)
    out = machine.handle(register("c", 3.0))
    assert [type(i) for i in out] == [RefuseRegistration]
    assert "server_num=2" in out[0].reason
    assert "'a'" in out[0].reason
    assert "'b'" in out[0].reason
    assert snapshot(machine) == before
    # A registered node id is not "beyond the total": it is a restart.
    assert of_type(machine.handle(register("b", 4.0)), AcceptRegistration)[0].rank == 1


def test_a_worker_is_refused() -> None:
    machine = new_machine(2)
    out = machine.handle(register("w", role=Role.WORKER))
    assert [type(i) for i in out] == [RefuseRegistration]
    assert "WORKER" in out[0].reason
    assert "SERVER" in out[0].reason
    assert snapshot(machine) == ((), ClusterState.CLUSTER_STARTING, math.inf, None)


def test_a_refused_registration_does_not_fix_fl_iteration_num() -> None:
    machine = new_machine(2)
    machine.handle(register("a", server_num=5, fl_iteration_num=7))
    assert machine.fl_iteration_num is None
    out = machine.handle(register("a", fl_iteration_num=9))
    assert of_type(out, AcceptRegistration)
    assert machine.fl_iteration_num == 9


# ---------------------------------------------------------------------------------- cluster ready


def test_the_cluster_is_ready_exactly_when_the_last_server_registers() -> None:
    machine = new_machine(3)
    for i, node_id in enumerate(["a", "b"]):
        out = machine.handle(register(node_id, float(i), server_num=3))
        assert out == [AcceptRegistration(f"register:{node_id}@{float(i)}", node_id, i)]
        assert machine.state is ClusterState.CLUSTER_STARTING
    out = machine.handle(register("c", 2.0, server_num=3))
    cause = "register:c@2.0"
    expected_members = (
        Member(0, "a", "127.0.0.1", 7000 + ord("a"), 6668, True),
        Member(1, "b", "127.0.0.1", 7000 + ord("b"), 6668, True),
        Member(2, "c", "127.0.0.1", 7000 + ord("c"), 6668, True),
    )
    assert out == [
        AcceptRegistration(cause, "c", 2),
        StateChanged(
            cause, ClusterState.CLUSTER_STARTING, ClusterState.CLUSTER_READY, "every Server has registered"
        ),
        SendMembership(cause, ClusterState.CLUSTER_READY, expected_members),
    ]
    assert machine.members() == expected_members


def test_a_single_server_cluster_is_ready_at_once() -> None:
    machine = new_machine(1)
    out = machine.handle(register("solo", server_num=1))
    assert [type(i) for i in out] == [AcceptRegistration, StateChanged, SendMembership]
    assert machine.state is ClusterState.CLUSTER_READY


# ---------------------------------------------------------------------------------- heartbeats


def test_a_heartbeat_from_an_unknown_node_is_illegal_and_changes_nothing() -> None:
    machine = ready_machine("a", "b")
    before = snapshot(machine)
    with pytest.raises(IllegalEvent, match="'ghost'"):
        machine.handle(heartbeat("ghost", 10.0))
    assert snapshot(machine) == before


def test_a_node_is_alive_until_exactly_last_heartbeat_plus_timeout() -> None:
    machine = ready_machine("a", "b")
    last = 7.25
    machine.handle(heartbeat("a", last))
    machine.handle(heartbeat("b", 100.0))  # b stays far away from its deadline
    assert machine.next_liveness_deadline() == last + TIMEOUT

    assert machine.handle(check(last + TIMEOUT - 1e-6)) == []
    assert alive(machine) == {"a": True, "b": True}
    assert machine.state is ClusterState.CLUSTER_READY

    out = machine.handle(check(last + TIMEOUT))
    cause = f"liveness@{last + TIMEOUT}"
    assert out[0] == NodeLivenessChanged(cause, "a", False)
    assert alive(machine) == {"a": False, "b": True}
    assert machine.next_liveness_deadline() == 100.0 + TIMEOUT


def test_a_stale_heartbeat_does_not_move_the_deadline_back() -> None:
    machine = ready_machine("a")
    machine.handle(heartbeat("a", 10.0))
    machine.handle(heartbeat("a", 4.0))
    assert machine.next_liveness_deadline() == 10.0 + TIMEOUT


def test_node_timeout_and_back() -> None:
    machine = ready_machine("a", "b")
    machine.handle(heartbeat("b", 29.0))
    out = machine.handle(check(TIMEOUT))
    cause = f"liveness@{TIMEOUT}"
    assert out == [
        NodeLivenessChanged(cause, "a", False),
        StateChanged(cause, ClusterState.CLUSTER_READY, ClusterState.NODE_TIMEOUT, "no heartbeat from 'a'"),
        SendMembership(cause, ClusterState.NODE_TIMEOUT, machine.members()),
    ]
    assert [m.alive for m in out[-1].members] == [False, True]
    # Checking again changes nothing: a is already dead, b is not due.
    assert machine.handle(check(40.0)) == []

    out = machine.handle(heartbeat("a", 41.0))
    cause = "hb:a@41.0"
    assert out == [
        NodeLivenessChanged(cause, "a", True),
        StateChanged(cause, ClusterState.NODE_TIMEOUT, ClusterState.CLUSTER_READY, "node 'a' is alive again"),
        SendMembership(cause, ClusterState.CLUSTER_READY, machine.members()),
    ]
    assert alive(machine) == {"a": True, "b": True}
    assert machine.next_liveness_deadline() == 29.0 + TIMEOUT


def test_the_cluster_stays_in_node_timeout_until_every_node_is_back() -> None:
    machine = ready_machine("a", "b")
    out = machine.handle(check(TIMEOUT))
    assert [i.node_id for i in of_type(out, NodeLivenessChanged)] == ["a", "b"]
    assert of_type(out, StateChanged)[0].reason == "no heartbeat from 'a', 'b'"
    assert machine.next_liveness_deadline() == math.inf
    out = machine.handle(heartbeat("b", 31.0))
    assert of_type(out, StateChanged) == []
    assert machine.state is ClusterState.NODE_TIMEOUT
    assert of_type(out, SendMembership)[0].state is ClusterState.NODE_TIMEOUT
    machine.handle(heartbeat("a", 32.0))
    assert machine.state is ClusterState.CLUSTER_READY


def test_a_silent_node_before_the_cluster_formed_times_out_and_returns_to_starting() -> None:
    machine = new_machine(2)
    machine.handle(register("a", 0.0))
    machine.handle(check(TIMEOUT))
    assert machine.state is ClusterState.NODE_TIMEOUT
    out = machine.handle(heartbeat("a", 31.0))
    assert of_type(out, StateChanged)[0].new is ClusterState.CLUSTER_STARTING
    assert machine.state is ClusterState.CLUSTER_STARTING


# ---------------------------------------------------------------------------- start-up deadline


def test_the_startup_deadline_exits_a_cluster_that_never_formed() -> None:
    machine = new_machine(2)
    machine.handle(register("a"))
    out = machine.handle(StartupDeadlinePassed(cause="cluster_available_timeout"))
    reason = "only 1 of server_num=2 Servers registered within cluster_available_timeout"
    assert out == [
        StateChanged(
            "cluster_available_timeout", ClusterState.CLUSTER_STARTING, ClusterState.CLUSTER_EXIT, reason
        ),
        ExitCluster("cluster_available_timeout", reason, ("a",)),
    ]
    assert machine.state is ClusterState.CLUSTER_EXIT


def test_the_startup_deadline_is_ignored_once_the_cluster_was_ready() -> None:
    machine = ready_machine("a", "b")
    machine.handle(check(TIMEOUT))  # both silent: the cluster was ready once, now NODE_TIMEOUT
    assert machine.state is ClusterState.NODE_TIMEOUT
    before = snapshot(machine)
    assert machine.handle(StartupDeadlinePassed(cause="cluster_available_timeout")) == []
    assert snapshot(machine) == before


# ------------------------------------------------------------------------------------- shutdown


def test_shutdown_tells_every_node_then_exits_when_all_finished() -> None:
    machine = ready_machine("a", "b")
    assert machine.handle(BeginShutdown(cause="finish")) == [SendShutdown("finish", ("a", "b"))]
    assert machine.handle(BeginShutdown(cause="finish again")) == []
    out = machine.handle(register("c", 1.0))
    assert [type(i) for i in out] == [RefuseRegistration]
    assert "finishing" in out[0].reason
    assert machine.handle(NodeFinished(cause="f:a", node_id="a")) == []
    assert machine.is_finished("a")
    assert not machine.is_finished("b")
    out = machine.handle(NodeFinished(cause="f:b", node_id="b"))
    assert out == [
        StateChanged("f:b", ClusterState.CLUSTER_READY, ClusterState.CLUSTER_EXIT, "every node has finished"),
        ExitCluster("f:b", "every node has finished", ()),
    ]


def test_the_shutdown_deadline_exits_listing_the_unfinished_nodes() -> None:
    machine = ready_machine("a", "b", "c")
    machine.handle(BeginShutdown(cause="finish"))
    machine.handle(NodeFinished(cause="f:b", node_id="b"))
    out = machine.handle(ShutdownDeadlinePassed(cause="finish_timeout"))
    assert out == [
        StateChanged(
            "finish_timeout", ClusterState.CLUSTER_READY, ClusterState.CLUSTER_EXIT, "finish deadline passed"
        ),
        ExitCluster("finish_timeout", "finish deadline passed", ("a", "c")),
    ]


def test_shutdown_does_not_wait_for_dead_nodes() -> None:
    machine = ready_machine("a", "b")
    machine.handle(heartbeat("b", 10.0))
    machine.handle(check(TIMEOUT))  # a is dead
    assert machine.handle(BeginShutdown(cause="finish")) == [SendShutdown("finish", ("b",))]
    out = machine.handle(NodeFinished(cause="f:b", node_id="b"))
    assert of_type(out, ExitCluster) == [ExitCluster("f:b", "every node has finished", ("a",))]


def test_shutdown_of_an_empty_cluster_exits_at_once() -> None:
    machine = new_machine(2)
    out = machine.handle(BeginShutdown(cause="finish"))
    assert [type(i) for i in out] == [StateChanged, ExitCluster]
    assert out[1].unfinished == ()


def test_nodes_finishing_on_their_own_exit_the_cluster_when_all_have() -> None:
    machine = ready_machine("a", "b")
    assert machine.handle(NodeFinished(cause="f:a", node_id="a")) == []
    assert machine.state is ClusterState.CLUSTER_READY
    out = machine.handle(NodeFinished(cause="f:b", node_id="b"))
    assert of_type(out, ExitCluster) == [ExitCluster("f:b", "every node has finished", ())]


def test_a_shutdown_deadline_without_a_shutdown_is_illegal() -> None:
    machine = ready_machine("a", "b")
    before = snapshot(machine)
    with pytest.raises(IllegalEvent, match="no shutdown was requested"):
        machine.handle(ShutdownDeadlinePassed(cause="finish_timeout"))
    assert snapshot(machine) == before


def test_an_unknown_node_finishing_is_illegal() -> None:
    machine = ready_machine("a", "b")
    machine.handle(BeginShutdown(cause="finish"))
    before = snapshot(machine)
    with pytest.raises(IllegalEvent, match="'ghost'"):
        machine.handle(NodeFinished(cause="f:ghost", node_id="ghost"))
    assert snapshot(machine) == before
    assert not machine.is_finished("ghost")


AFTER_EXIT: list[Event] = [
    register("a", 100.0),
    register("z", 100.0),
    heartbeat("a", 100.0),
    check(1000.0),
    StartupDeadlinePassed(cause="late"),
    BeginShutdown(cause="late"),
    NodeFinished(cause="late", node_id="a"),
    ShutdownDeadlinePassed(cause="late"),
]


@pytest.mark.parametrize("event", AFTER_EXIT, ids=lambda e: type(e).__name__)
def test_every_event_is_illegal_after_exit(event: Event) -> None:
    machine = ready_machine("a", "b")
    machine.handle(BeginShutdown(cause="finish"))
    machine.handle(ShutdownDeadlinePassed(cause="finish_timeout"))
    assert machine.state is ClusterState.CLUSTER_EXIT
    before = snapshot(machine)
    with pytest.raises(IllegalEvent, match="exited"):
        machine.handle(event)
    assert snapshot(machine) == before


# ------------------------------------------------------------------------------ property tests

POOL = ("n0", "n1", "n2", "n3", "n4")  # one more than the largest server_num


class ClusterRules(RuleBasedStateMachine):
    """Random registrations, heartbeats and clock advances against a model of the rules."""

    def __init__(self) -> None:
        super().__init__()
        self.machine = new_machine(1)
        self.server_num = 1
        self.now = 0.0
        self.rank: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.is_alive: dict[str, bool] = {}
        self.fl_iteration_num: int | None = None
        self.ever_complete = False

    @initialize(server_num=st.sampled_from([2, 3, 4, 1]))
    def start(self, server_num: int) -> None:
        self.machine = new_machine(server_num)
        self.server_num = server_num

    # ------------------------------------------------------------------------------- rules

    @rule(node_id=st.sampled_from(POOL))
    def register(self, node_id: str) -> None:
        """A Server started with the cluster's numbers registers (or re-registers)."""
        self.feed_registration(node_id, self.server_num, FL_ITERATION_NUM, Role.SERVER)

    @rule(
        node_id=st.sampled_from(POOL),
        mistake=st.sampled_from(["server_num+1", "server_num-1", "fl_iteration_num", "worker"]),
    )
    def register_wrongly(self, node_id: str, mistake: str) -> None:
        """A node started with other numbers, or as a Worker, tries to register."""
        server_num = self.server_num + {"server_num+1": 1, "server_num-1": -1}.get(mistake, 0)
        fl_iteration_num = FL_ITERATION_NUM + (mistake == "fl_iteration_num")
        role = Role.WORKER if mistake == "worker" else Role.SERVER
        self.feed_registration(node_id, server_num, fl_iteration_num, role)

    def feed_registration(self, node_id: str, server_num: int, fl_iteration_num: int, role: Role) -> None:
        known = node_id in self.rank
        expected_refusal = (
            role is not Role.SERVER
            or server_num != self.server_num
            or (self.fl_iteration_num is not None and fl_iteration_num != self.fl_iteration_num)
            or (not known and len(self.rank) >= self.server_num)
        )
        revived = known and not self.is_alive[node_id]
        before = snapshot(self.machine)
        event = register(
            node_id, self.now, server_num=server_num, fl_iteration_num=fl_iteration_num, role=role
        )
        out = self.machine.handle(event)
        if expected_refusal:
            assert out == [RefuseRegistration(event.cause, node_id, out[0].reason)]
            assert snapshot(self.machine) == before
            return
        if self.fl_iteration_num is None:
            self.fl_iteration_num = fl_iteration_num
        if not known:
            self.rank[node_id] = len(self.rank)
        self.last[node_id] = self.now
        self.is_alive[node_id] = True
        accepted = of_type(out, AcceptRegistration)
        assert accepted == [AcceptRegistration(event.cause, node_id, self.rank[node_id])]
        assert [i.alive for i in of_type(out, NodeLivenessChanged)] == ([True] if revived else [])
        complete = len(self.rank) == self.server_num
        self.ever_complete = self.ever_complete or complete
        if complete:
            assert out[-1] == SendMembership(event.cause, self.machine.state, self.machine.members())

    @rule(node_id=st.sampled_from(POOL))
    def heartbeat(self, node_id: str) -> None:
        if node_id not in self.rank:
            self.assert_illegal(heartbeat(node_id, self.now))
            return
        out = self.machine.handle(heartbeat(node_id, self.now))
        revived = not self.is_alive[node_id]
        self.last[node_id] = max(self.last[node_id], self.now)
        self.is_alive[node_id] = True
        if revived:
            assert out[0] == NodeLivenessChanged(out[0].cause, node_id, True)
            assert out[-1] == SendMembership(out[0].cause, self.machine.state, self.machine.members())
        else:
            assert out == []

    @rule(
        dt=st.one_of(st.sampled_from([TIMEOUT, 3.0, TIMEOUT - 1e-3, 1e-3, 0.0]), st.floats(0.0, 2 * TIMEOUT)),
        then_check=st.booleans(),
    )
    def advance(self, dt: float, then_check: bool) -> None:
        """The driver's clock moves on; the driver may or may not feed a liveness check right away."""
        self.now += dt
        if then_check:
            self.liveness_check()

    @rule(early=st.sampled_from([0.0, 1e-3]))
    def sleep_until_next_deadline(self, early: float) -> None:
        """What the driver's reaper does: wake at the next liveness deadline (or just before it), check."""
        deadline = self.machine.next_liveness_deadline()
        if deadline == math.inf:
            return
        self.now = max(self.now, deadline - early)
        self.liveness_check()

    @rule()
    def liveness_check(self) -> None:
        out = self.machine.handle(check(self.now))
        due = [n for n in self.rank if self.is_alive[n] and self.now >= self.last[n] + TIMEOUT]
        for node_id in due:
            self.is_alive[node_id] = False
        assert [(i.node_id, i.alive) for i in of_type(out, NodeLivenessChanged)] == [(n, False) for n in due]
        if due:
            assert out[-1] == SendMembership(out[0].cause, self.machine.state, self.machine.members())
        else:
            assert out == []

    @rule(node_id=st.sampled_from(POOL))
    def stray_finish_or_deadline(self, node_id: str) -> None:
        if node_id not in self.rank:
            self.assert_illegal(NodeFinished(cause="stray", node_id=node_id))
        self.assert_illegal(ShutdownDeadlinePassed(cause="stray"))

    def assert_illegal(self, event: Event) -> None:
        before = snapshot(self.machine)
        try:
            self.machine.handle(event)
        except IllegalEvent:
            pass
        else:
            raise AssertionError(f"{event!r} should have been illegal")
        assert snapshot(self.machine) == before

    # --------------------------------------------------------------------------- invariants

    @invariant()
    def ranks_are_exactly_zero_to_len_minus_one(self) -> None:
        members = self.machine.members()
        assert [m.rank for m in members] == list(range(len(members)))

    @invariant()
    def a_node_id_never_changes_rank(self) -> None:
        assert ranks(self.machine) == self.rank

    @invariant()
    def never_more_members_than_server_num(self) -> None:
        assert len(self.machine.members()) <= self.machine.config.server_num

    @invariant()
    def liveness_matches_the_model(self) -> None:
        assert alive(self.machine) == self.is_alive
        live_deadlines = [self.last[n] + TIMEOUT for n in self.rank if self.is_alive[n]]
        assert self.machine.next_liveness_deadline() == min(live_deadlines, default=math.inf)

    @invariant()
    def state_follows_membership_and_liveness(self) -> None:
        state = self.machine.state
        some_dead = not all(self.is_alive.values())
        assert (state is ClusterState.NODE_TIMEOUT) == some_dead
        assert (state is ClusterState.CLUSTER_READY) == (self.ever_complete and not some_dead)
        if not some_dead and not self.ever_complete:
            assert state is ClusterState.CLUSTER_STARTING


FAST = settings(max_examples=75, stateful_step_count=30, deadline=None)


def test_cluster_rules_hold_after_every_step() -> None:
    run_state_machine_as_test(ClusterRules, settings=FAST)
