"""The Scheduler's cluster rules (:mod:`flcluster.core.cluster`), tested as a pure state machine.

Time is epoch milliseconds (``now_ms``, an int), as in :mod:`flcluster.core.iteration`; every ``handle``
returns the shared :class:`~flcluster.core.outcome.Outcome`, whose reply is the registration answer.

Reference §3.7: ranks 0..N-1 by arrival, a known node id gets its old rank back, CLUSTER_READY when the
N-th Server registers, NODE_TIMEOUT while a node is silent, EXIT when every node finished or the start-up
timeout ran out. Illegal events raise :class:`IllegalEvent` and change nothing (the h11 rule).

The unit tests pin single rules; :class:`ClusterRules` drives random registrations, heartbeats and clock
advances against a small model and checks the invariants after every step, that the snapshot round-trips
exactly, and that a machine rebuilt from the snapshot behaves exactly like the original on the next event.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from flcluster.core.cluster import (
    AcceptRegistration,
    BeginShutdown,
    ClusterConfig,
    ClusterMachine,
    ClusterSnapshot,
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
    NodeRecord,
    Outcome,
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

TIMEOUT = 30_000  # ms
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
    now: int = 0,
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
        holder_connected=False,
        now_ms=now,
    )


def heartbeat(node_id: str, now: int) -> Heartbeat:
    return Heartbeat(cause=f"hb:{node_id}@{now}", node_id=node_id, now_ms=now)


def check(now: int) -> LivenessCheck:
    return LivenessCheck(cause=f"liveness@{now}", now_ms=now)


def new_machine(server_num: int = 2) -> ClusterMachine:
    return ClusterMachine(ClusterConfig(server_num=server_num, heartbeat_timeout_ms=TIMEOUT))


def ready_machine(*node_ids: str, now: int = 0) -> ClusterMachine:
    """A machine whose Servers (``node_ids``, ranks in that order) all registered at ``now``."""
    machine = new_machine(len(node_ids))
    for node_id in node_ids:
        machine.handle(register(node_id, now, server_num=len(node_ids)))
    assert machine.state is ClusterState.CLUSTER_READY
    return machine


def of_type(instructions: tuple[Instruction, ...], cls: type[Any]) -> list[Any]:
    return [i for i in instructions if isinstance(i, cls)]


def ranks(machine: ClusterMachine) -> dict[str, int]:
    return {m.node_id: m.rank for m in machine.members()}


def alive(machine: ClusterMachine) -> dict[str, bool]:
    return {m.node_id: m.alive for m in machine.members()}


# ------------------------------------------------------------------------------------------ ranks


def test_ranks_are_given_in_order_of_arrival() -> None:
    machine = new_machine(4)
    given = []
    for i, node_id in enumerate(["c", "a", "d", "b"]):
        accept = machine.handle(register(node_id, i * 1_000, server_num=4)).reply
        assert isinstance(accept, AcceptRegistration)
        assert (accept.node_id, accept.cause) == (node_id, f"register:{node_id}@{i * 1_000}")
        given.append(accept.rank)
    assert given == [0, 1, 2, 3]
    assert [(m.rank, m.node_id) for m in machine.members()] == [(0, "c"), (1, "a"), (2, "d"), (3, "b")]
    assert machine.fl_iteration_num == FL_ITERATION_NUM


def test_a_known_node_id_gets_its_old_rank_back() -> None:
    machine = ready_machine("a", "b", "c")
    out = machine.handle(register("b", 5_000, server_num=3, recovering=True))
    assert out.reply == AcceptRegistration("register:b@5000", "b", 1)
    assert ranks(machine) == {"a": 0, "b": 1, "c": 2}
    assert machine.state is ClusterState.CLUSTER_READY
    # The re-registration counts as a heartbeat: b's deadline moved, a's did not.
    assert machine.next_liveness_deadline() == TIMEOUT
    machine.handle(heartbeat("a", 5_000))
    machine.handle(heartbeat("c", 5_000))
    assert machine.next_liveness_deadline() == 5_000 + TIMEOUT


def test_re_registering_after_node_timeout_brings_the_node_back_and_the_cluster_ready() -> None:
    machine = ready_machine("a", "b")
    machine.handle(heartbeat("b", 20_000))
    out = machine.handle(check(TIMEOUT))
    assert out.reply is None
    assert of_type(out.instructions, NodeLivenessChanged) == [
        NodeLivenessChanged(f"liveness@{TIMEOUT}", "a", False)
    ]
    assert machine.state is ClusterState.NODE_TIMEOUT

    out = machine.handle(register("a", 31_000, recovering=True))
    cause = "register:a@31000"
    assert out == Outcome(
        AcceptRegistration(cause, "a", 0),
        (
            NodeLivenessChanged(cause, "a", True),
            StateChanged(
                cause, ClusterState.NODE_TIMEOUT, ClusterState.CLUSTER_READY, "node 'a' registered again"
            ),
            SendMembership(cause, ClusterState.CLUSTER_READY, machine.members()),
        ),
    )
    assert ranks(machine) == {"a": 0, "b": 1}
    assert alive(machine) == {"a": True, "b": True}
    assert machine.next_liveness_deadline() == 20_000 + TIMEOUT


def revive_before_formed() -> tuple[ClusterMachine, tuple[Instruction, ...]]:
    """Server "a" of three registers, times out, and re-registers before the others arrive."""
    machine = new_machine(3)
    machine.handle(register("a", 0, server_num=3))
    machine.handle(check(TIMEOUT))
    out = machine.handle(register("a", 40_000, server_num=3, recovering=True))
    assert out.reply == AcceptRegistration("register:a@40000", "a", 0)
    return machine, out.instructions


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
    assert out.instructions == ()
    refusal = out.reply
    assert isinstance(refusal, RefuseRegistration)
    assert refusal.node_id == "a"
    assert "server_num=3" in refusal.reason
    assert "server_num=2" in refusal.reason
    assert machine.snapshot() == new_machine(2).snapshot()


def test_a_registration_with_another_fl_iteration_num_is_refused_naming_both_values() -> None:
    machine = new_machine(2)
    machine.handle(register("a", fl_iteration_num=20))
    before = machine.snapshot()
    out = machine.handle(register("b", 1_000, fl_iteration_num=25))
    assert isinstance(out.reply, RefuseRegistration)
    assert out.instructions == ()
    assert "fl_iteration_num=25" in out.reply.reason
    assert "fl_iteration_num=20" in out.reply.reason
    assert machine.snapshot() == before
    # The value agreed on is the first accepted one; a Server that matches it still gets in.
    out = machine.handle(register("b", 2_000, fl_iteration_num=20))
    assert out.reply == AcceptRegistration("register:b@2000", "b", 1)


def test_a_registration_beyond_the_total_is_refused_and_changes_nothing() -> None:
    machine = ready_machine("a", "b")
    before = machine.snapshot()
    out = machine.handle(register("c", 3_000))
    assert isinstance(out.reply, RefuseRegistration)
    assert out.instructions == ()
    assert "server_num=2" in out.reply.reason
    assert "'a'" in out.reply.reason
    assert "'b'" in out.reply.reason
    assert machine.snapshot() == before
    # A registered node id is not "beyond the total": it is a restart.
    assert machine.handle(register("b", 4_000)).reply == AcceptRegistration("register:b@4000", "b", 1)


def test_a_worker_is_refused() -> None:
    machine = new_machine(2)
    out = machine.handle(register("w", role=Role.WORKER))
    assert isinstance(out.reply, RefuseRegistration)
    assert out.instructions == ()
    assert "WORKER" in out.reply.reason
    assert "SERVER" in out.reply.reason
    assert machine.snapshot() == new_machine(2).snapshot()


def test_a_refused_registration_does_not_fix_fl_iteration_num() -> None:
    machine = new_machine(2)
    machine.handle(register("a", server_num=5, fl_iteration_num=7))
    assert machine.fl_iteration_num is None
    out = machine.handle(register("a", fl_iteration_num=9))
    assert isinstance(out.reply, AcceptRegistration)
    assert machine.fl_iteration_num == 9


# ---------------------------------------------------------------------------------- cluster ready


def test_the_cluster_is_ready_exactly_when_the_last_server_registers() -> None:
    machine = new_machine(3)
    for i, node_id in enumerate(["a", "b"]):
        out = machine.handle(register(node_id, i * 1_000, server_num=3))
        assert out == Outcome(AcceptRegistration(f"register:{node_id}@{i * 1_000}", node_id, i))
        assert machine.state is ClusterState.CLUSTER_STARTING
    out = machine.handle(register("c", 2_000, server_num=3))
    cause = "register:c@2000"
    expected_members = (
        Member(0, "a", "127.0.0.1", 7000 + ord("a"), 6668, True),
        Member(1, "b", "127.0.0.1", 7000 + ord("b"), 6668, True),
        Member(2, "c", "127.0.0.1", 7000 + ord("c"), 6668, True),
    )
    assert out == Outcome(
        AcceptRegistration(cause, "c", 2),
        (
            StateChanged(
                cause,
                ClusterState.CLUSTER_STARTING,
                ClusterState.CLUSTER_READY,
                "every Server has registered",
            ),
            SendMembership(cause, ClusterState.CLUSTER_READY, expected_members),
        ),
    )
    assert machine.members() == expected_members


def test_a_single_server_cluster_is_ready_at_once() -> None:
    machine = new_machine(1)
    out = machine.handle(register("solo", server_num=1))
    assert isinstance(out.reply, AcceptRegistration)
    assert [type(i) for i in out.instructions] == [StateChanged, SendMembership]
    assert machine.state is ClusterState.CLUSTER_READY


# ---------------------------------------------------------------------------------- heartbeats


def test_a_heartbeat_from_an_unknown_node_is_illegal_and_changes_nothing() -> None:
    machine = ready_machine("a", "b")
    before = machine.snapshot()
    with pytest.raises(IllegalEvent, match="'ghost'"):
        machine.handle(heartbeat("ghost", 10_000))
    assert machine.snapshot() == before


def test_a_node_is_alive_until_exactly_last_heartbeat_plus_timeout() -> None:
    machine = ready_machine("a", "b")
    last = 7_250
    machine.handle(heartbeat("a", last))
    machine.handle(heartbeat("b", 100_000))  # b stays far away from its deadline
    assert machine.next_liveness_deadline() == last + TIMEOUT

    assert machine.handle(check(last + TIMEOUT - 1)) == Outcome()
    assert alive(machine) == {"a": True, "b": True}
    assert machine.state is ClusterState.CLUSTER_READY

    out = machine.handle(check(last + TIMEOUT))
    cause = f"liveness@{last + TIMEOUT}"
    assert out.instructions[0] == NodeLivenessChanged(cause, "a", False)
    assert alive(machine) == {"a": False, "b": True}
    assert machine.next_liveness_deadline() == 100_000 + TIMEOUT


def test_a_stale_heartbeat_does_not_move_the_deadline_back() -> None:
    machine = ready_machine("a")
    machine.handle(heartbeat("a", 10_000))
    machine.handle(heartbeat("a", 4_000))
    assert machine.next_liveness_deadline() == 10_000 + TIMEOUT


def test_node_timeout_and_back() -> None:
    machine = ready_machine("a", "b")
    machine.handle(heartbeat("b", 29_000))
    out = machine.handle(check(TIMEOUT))
    cause = f"liveness@{TIMEOUT}"
    assert out == Outcome(
        None,
        (
            NodeLivenessChanged(cause, "a", False),
            StateChanged(
                cause, ClusterState.CLUSTER_READY, ClusterState.NODE_TIMEOUT, "no heartbeat from 'a'"
            ),
            SendMembership(cause, ClusterState.NODE_TIMEOUT, machine.members()),
        ),
    )
    assert [m.alive for m in machine.members()] == [False, True]
    # Checking again changes nothing: a is already dead, b is not due.
    assert machine.handle(check(40_000)) == Outcome()

    out = machine.handle(heartbeat("a", 41_000))
    cause = "hb:a@41000"
    assert out == Outcome(
        None,
        (
            NodeLivenessChanged(cause, "a", True),
            StateChanged(
                cause, ClusterState.NODE_TIMEOUT, ClusterState.CLUSTER_READY, "node 'a' is alive again"
            ),
            SendMembership(cause, ClusterState.CLUSTER_READY, machine.members()),
        ),
    )
    assert alive(machine) == {"a": True, "b": True}
    assert machine.next_liveness_deadline() == 29_000 + TIMEOUT


def test_the_cluster_stays_in_node_timeout_until_every_node_is_back() -> None:
    machine = ready_machine("a", "b")
    out = machine.handle(check(TIMEOUT)).instructions
    assert [i.node_id for i in of_type(out, NodeLivenessChanged)] == ["a", "b"]
    assert of_type(out, StateChanged)[0].reason == "no heartbeat from 'a', 'b'"
    assert machine.next_liveness_deadline() is None
    out = machine.handle(heartbeat("b", 31_000)).instructions
    assert of_type(out, StateChanged) == []
    assert machine.state is ClusterState.NODE_TIMEOUT
    assert of_type(out, SendMembership)[0].state is ClusterState.NODE_TIMEOUT
    machine.handle(heartbeat("a", 32_000))
    assert machine.state is ClusterState.CLUSTER_READY


def test_a_silent_node_before_the_cluster_formed_times_out_and_returns_to_starting() -> None:
    machine = new_machine(2)
    machine.handle(register("a", 0))
    machine.handle(check(TIMEOUT))
    assert machine.state is ClusterState.NODE_TIMEOUT
    out = machine.handle(heartbeat("a", 31_000))
    assert of_type(out.instructions, StateChanged)[0].new is ClusterState.CLUSTER_STARTING
    assert machine.state is ClusterState.CLUSTER_STARTING


# ---------------------------------------------------------------------------- start-up deadline


def test_the_startup_deadline_exits_a_cluster_that_never_formed() -> None:
    machine = new_machine(2)
    machine.handle(register("a"))
    out = machine.handle(StartupDeadlinePassed(cause="cluster_available_timeout"))
    reason = "only 1 of server_num=2 Servers registered within cluster_available_timeout"
    assert out == Outcome(
        None,
        (
            StateChanged(
                "cluster_available_timeout", ClusterState.CLUSTER_STARTING, ClusterState.CLUSTER_EXIT, reason
            ),
            ExitCluster("cluster_available_timeout", reason, ("a",)),
        ),
    )
    assert machine.state is ClusterState.CLUSTER_EXIT


def test_the_startup_deadline_is_ignored_once_the_cluster_was_ready() -> None:
    machine = ready_machine("a", "b")
    machine.handle(check(TIMEOUT))  # both silent: the cluster was ready once, now NODE_TIMEOUT
    assert machine.state is ClusterState.NODE_TIMEOUT
    before = machine.snapshot()
    assert machine.handle(StartupDeadlinePassed(cause="cluster_available_timeout")) == Outcome()
    assert machine.snapshot() == before


# ------------------------------------------------------------------------------------- shutdown


def test_shutdown_tells_every_node_then_exits_when_all_finished() -> None:
    machine = ready_machine("a", "b")
    assert machine.handle(BeginShutdown(cause="finish")) == Outcome(
        None, (SendShutdown("finish", ("a", "b")),)
    )
    assert machine.handle(BeginShutdown(cause="finish again")) == Outcome()
    out = machine.handle(register("c", 1_000))
    assert isinstance(out.reply, RefuseRegistration)
    assert out.instructions == ()
    assert "finishing" in out.reply.reason
    assert machine.handle(NodeFinished(cause="f:a", node_id="a")) == Outcome()
    assert machine.is_finished("a")
    assert not machine.is_finished("b")
    out = machine.handle(NodeFinished(cause="f:b", node_id="b"))
    assert out == Outcome(
        None,
        (
            StateChanged(
                "f:b", ClusterState.CLUSTER_READY, ClusterState.CLUSTER_EXIT, "every node has finished"
            ),
            ExitCluster("f:b", "every node has finished", ()),
        ),
    )


def test_the_shutdown_deadline_exits_listing_the_unfinished_nodes() -> None:
    machine = ready_machine("a", "b", "c")
    machine.handle(BeginShutdown(cause="finish"))
    machine.handle(NodeFinished(cause="f:b", node_id="b"))
    out = machine.handle(ShutdownDeadlinePassed(cause="finish_timeout"))
    assert out == Outcome(
        None,
        (
            StateChanged(
                "finish_timeout",
                ClusterState.CLUSTER_READY,
                ClusterState.CLUSTER_EXIT,
                "finish deadline passed",
            ),
            ExitCluster("finish_timeout", "finish deadline passed", ("a", "c")),
        ),
    )


def test_shutdown_does_not_wait_for_dead_nodes() -> None:
    machine = ready_machine("a", "b")
    machine.handle(heartbeat("b", 10_000))
    machine.handle(check(TIMEOUT))  # a is dead
    assert machine.handle(BeginShutdown(cause="finish")) == Outcome(None, (SendShutdown("finish", ("b",)),))
    out = machine.handle(NodeFinished(cause="f:b", node_id="b"))
    assert of_type(out.instructions, ExitCluster) == [ExitCluster("f:b", "every node has finished", ("a",))]


def test_shutdown_of_an_empty_cluster_exits_at_once() -> None:
    machine = new_machine(2)
    out = machine.handle(BeginShutdown(cause="finish"))
    assert out.reply is None
    assert [type(i) for i in out.instructions] == [StateChanged, ExitCluster]
    assert of_type(out.instructions, ExitCluster)[0].unfinished == ()


def test_nodes_finishing_on_their_own_exit_the_cluster_when_all_have() -> None:
    machine = ready_machine("a", "b")
    assert machine.handle(NodeFinished(cause="f:a", node_id="a")) == Outcome()
    assert machine.state is ClusterState.CLUSTER_READY
    out = machine.handle(NodeFinished(cause="f:b", node_id="b"))
    assert of_type(out.instructions, ExitCluster) == [ExitCluster("f:b", "every node has finished", ())]


def test_a_shutdown_deadline_without_a_shutdown_is_illegal() -> None:
    machine = ready_machine("a", "b")
    before = machine.snapshot()
    with pytest.raises(IllegalEvent, match="no shutdown was requested"):
        machine.handle(ShutdownDeadlinePassed(cause="finish_timeout"))
    assert machine.snapshot() == before


def test_an_unknown_node_finishing_is_illegal() -> None:
    machine = ready_machine("a", "b")
    machine.handle(BeginShutdown(cause="finish"))
    before = machine.snapshot()
    with pytest.raises(IllegalEvent, match="'ghost'"):
        machine.handle(NodeFinished(cause="f:ghost", node_id="ghost"))
    assert machine.snapshot() == before
    assert not machine.is_finished("ghost")


AFTER_EXIT: list[Event] = [
    register("a", 100_000),
    register("z", 100_000),
    heartbeat("a", 100_000),
    check(1_000_000),
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
    before = machine.snapshot()
    with pytest.raises(IllegalEvent, match="exited"):
        machine.handle(event)
    assert machine.snapshot() == before


# ------------------------------------------------------------------------------------- snapshot


def rebuilt(machine: ClusterMachine) -> ClusterMachine:
    return ClusterMachine.from_snapshot(machine.config, machine.snapshot())


def test_a_snapshot_holds_membership_ranks_totals_and_state_as_plain_records() -> None:
    machine = ready_machine("b", "a")
    machine.handle(heartbeat("a", 20_000))
    machine.handle(check(TIMEOUT))  # b is silent since 0
    machine.handle(NodeFinished(cause="f:a", node_id="a"))
    assert machine.snapshot() == ClusterSnapshot(
        server_num=2,
        state=ClusterState.NODE_TIMEOUT,
        fl_iteration_num=FL_ITERATION_NUM,
        ever_ready=True,
        shutting_down=False,
        nodes=(
            NodeRecord(info=node_info("b"), rank=0, last_heartbeat_ms=0, alive=False, finished=False),
            NodeRecord(info=node_info("a"), rank=1, last_heartbeat_ms=20_000, alive=True, finished=True),
        ),
    )
    twin = rebuilt(machine)
    assert twin == machine
    assert twin.snapshot() == machine.snapshot()
    assert (twin.members(), twin.state, twin.next_liveness_deadline()) == (
        machine.members(),
        machine.state,
        machine.next_liveness_deadline(),
    )


def test_a_snapshot_survives_a_trip_through_json() -> None:
    """What a store does: plain values out (enums as their values), records rebuilt from them."""
    machine = ready_machine("a", "b")
    machine.handle(BeginShutdown(cause="finish"))
    snap = machine.snapshot()
    data = json.loads(json.dumps(attrs.asdict(snap)))
    back = ClusterSnapshot(
        **{
            **data,
            "nodes": tuple(
                NodeRecord(**{**n, "info": NodeInfo(**n["info"])})  # role and state by their converters
                for n in data["nodes"]
            ),
        }
    )
    assert back == snap
    assert ClusterMachine.from_snapshot(machine.config, back) == machine


def test_a_rebuilt_machine_refuses_and_finishes_like_the_original() -> None:
    machine = ready_machine("a", "b", "c")
    machine.handle(BeginShutdown(cause="finish"))
    machine.handle(NodeFinished(cause="f:b", node_id="b"))
    twin = rebuilt(machine)
    for event in (register("z", 1_000, server_num=3), ShutdownDeadlinePassed(cause="finish_timeout")):
        assert twin.handle(event) == machine.handle(event)
    assert twin == machine


def test_a_rebuilt_machine_keeps_the_snapshots_total_and_the_configs_timeout() -> None:
    machine = ready_machine("a", "b")
    config = ClusterConfig(server_num=3, heartbeat_timeout_ms=5_000)
    twin = ClusterMachine.from_snapshot(config, machine.snapshot())
    assert (twin.server_num, twin.config) == (2, config)
    assert twin.next_liveness_deadline() == 5_000
    assert isinstance(twin.handle(register("c", 1_000, server_num=3)).reply, RefuseRegistration)


def corrupt(**changes: Any) -> ClusterSnapshot:
    return attrs.evolve(ready_machine("a", "b").snapshot(), **changes)


def test_a_corrupt_snapshot_is_refused_naming_the_rule() -> None:
    good = ready_machine("a", "b").snapshot()
    a, b = good.nodes
    cases: list[tuple[ClusterSnapshot, str]] = [
        (corrupt(nodes=(a, attrs.evolve(b, rank=2))), "ranks must be 0..1 in order, got [0, 2]"),
        (corrupt(nodes=(a, attrs.evolve(a, rank=1))), "a node id is registered twice"),
        (corrupt(server_num=1), "2 nodes are registered, more than server_num=1"),
        (corrupt(fl_iteration_num=None), "fl_iteration_num is None with 2 nodes registered"),
        (
            corrupt(state=ClusterState.CLUSTER_SCHEDULER_RECOVERY),
            "state CLUSTER_SCHEDULER_RECOVERY is not one this machine",
        ),
        (corrupt(state=ClusterState.CLUSTER_SCALE_OUT), "state CLUSTER_SCALE_OUT does not fit the snapshot"),
        (corrupt(state=ClusterState.NODE_TIMEOUT), "state NODE_TIMEOUT does not fit the liveness"),
        (corrupt(state=ClusterState.CLUSTER_STARTING), "never goes back to starting"),
        (corrupt(nodes=(attrs.evolve(a, last_heartbeat_ms=1.5), b)), "last_heartbeat_ms 1.5"),  # type: ignore[arg-type]
    ]
    machine = ready_machine("a", "b")
    for snap, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            ClusterMachine.from_snapshot(machine.config, snap)


def test_event_times_are_epoch_milliseconds() -> None:
    with pytest.raises(ValueError, match=r"now_ms must be epoch milliseconds \(an int >= 0\), got 1.5"):
        Heartbeat(cause="hb", node_id="a", now_ms=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got -1"):
        LivenessCheck(cause="check", now_ms=-1)


# ------------------------------------------------------------------------------ property tests

POOL = ("n0", "n1", "n2", "n3", "n4")  # one more than the largest server_num


class ClusterRules(RuleBasedStateMachine):
    """Random registrations, heartbeats and clock advances against a model of the rules.

    Every event goes through :meth:`feed`, which also feeds it to a twin rebuilt from the machine's
    snapshot and checks that both answer alike and end equal; :meth:`restart` goes on with a rebuilt
    machine, as the Scheduler will after a crash.
    """

    def __init__(self) -> None:
        super().__init__()
        self.machine = new_machine(1)
        self.server_num = 1
        self.now = 0
        self.rank: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.is_alive: dict[str, bool] = {}
        self.fl_iteration_num: int | None = None
        self.ever_complete = False

    @initialize(server_num=st.sampled_from([2, 3, 4, 1]))
    def start(self, server_num: int) -> None:
        self.machine = new_machine(server_num)
        self.server_num = server_num

    def feed(self, event: Event) -> Outcome:
        """Handle ``event`` on the machine and on a twin rebuilt from its snapshot; both must agree."""
        twin = rebuilt(self.machine)
        try:
            expected = twin.handle(event)
        except IllegalEvent as exc:
            with pytest.raises(IllegalEvent) as raised:
                self.machine.handle(event)
            assert str(raised.value) == str(exc)
            raise
        out = self.machine.handle(event)
        assert out == expected, "a machine rebuilt from a snapshot answered differently"
        assert twin.snapshot() == self.machine.snapshot()
        return out

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
            or (not known and server_num != self.server_num)
            or (self.fl_iteration_num is not None and fl_iteration_num != self.fl_iteration_num)
            or (not known and len(self.rank) >= self.server_num)
        )
        revived = known and not self.is_alive[node_id]
        before = self.machine.snapshot()
        event = register(
            node_id, self.now, server_num=server_num, fl_iteration_num=fl_iteration_num, role=role
        )
        out = self.feed(event)
        if expected_refusal:
            assert isinstance(out.reply, RefuseRegistration)
            assert out == Outcome(RefuseRegistration(event.cause, node_id, out.reply.reason))
            assert self.machine.snapshot() == before
            return
        if self.fl_iteration_num is None:
            self.fl_iteration_num = fl_iteration_num
        if not known:
            self.rank[node_id] = len(self.rank)
        self.last[node_id] = self.now
        self.is_alive[node_id] = True
        assert out.reply == AcceptRegistration(event.cause, node_id, self.rank[node_id])
        assert [i.alive for i in of_type(out.instructions, NodeLivenessChanged)] == (
            [True] if revived else []
        )
        complete = len(self.rank) == self.server_num
        self.ever_complete = self.ever_complete or complete
        if complete:
            assert out.instructions[-1] == SendMembership(
                event.cause, self.machine.state, self.machine.members()
            )

    @rule(node_id=st.sampled_from(POOL))
    def heartbeat(self, node_id: str) -> None:
        if node_id not in self.rank:
            self.assert_illegal(heartbeat(node_id, self.now))
            return
        out = self.feed(heartbeat(node_id, self.now))
        assert out.reply is None
        revived = not self.is_alive[node_id]
        self.last[node_id] = max(self.last[node_id], self.now)
        self.is_alive[node_id] = True
        if revived:
            cause = out.instructions[0].cause
            assert out.instructions[0] == NodeLivenessChanged(cause, node_id, True)
            assert out.instructions[-1] == SendMembership(cause, self.machine.state, self.machine.members())
        else:
            assert out == Outcome()

    @rule(
        dt=st.one_of(st.sampled_from([TIMEOUT, 3_000, TIMEOUT - 1, 1, 0]), st.integers(0, 2 * TIMEOUT)),
        then_check=st.booleans(),
    )
    def advance(self, dt: int, then_check: bool) -> None:
        """The driver's clock moves on; the driver may or may not feed a liveness check right away."""
        self.now += dt
        if then_check:
            self.liveness_check()

    @rule(early=st.sampled_from([0, 1]))
    def sleep_until_next_deadline(self, early: int) -> None:
        """What the driver's reaper does: wake at the next liveness deadline (or just before it), check."""
        deadline = self.machine.next_liveness_deadline()
        if deadline is None:
            return
        self.now = max(self.now, deadline - early)
        self.liveness_check()

    @rule()
    def liveness_check(self) -> None:
        out = self.feed(check(self.now))
        assert out.reply is None
        due = [n for n in self.rank if self.is_alive[n] and self.now >= self.last[n] + TIMEOUT]
        for node_id in due:
            self.is_alive[node_id] = False
        assert [(i.node_id, i.alive) for i in of_type(out.instructions, NodeLivenessChanged)] == [
            (n, False) for n in due
        ]
        if due:
            assert out.instructions[-1] == SendMembership(
                out.instructions[0].cause, self.machine.state, self.machine.members()
            )
        else:
            assert out == Outcome()

    @rule(node_id=st.sampled_from(POOL))
    def stray_finish_or_deadline(self, node_id: str) -> None:
        if node_id not in self.rank:
            self.assert_illegal(NodeFinished(cause="stray", node_id=node_id))
        self.assert_illegal(ShutdownDeadlinePassed(cause="stray"))

    @rule()
    def restart(self) -> None:
        """The Scheduler is rebuilt from its snapshot (what recovery will do) and goes on with it."""
        snap = self.machine.snapshot()
        self.machine = ClusterMachine.from_snapshot(self.machine.config, snap)
        assert self.machine.snapshot() == snap

    def assert_illegal(self, event: Event) -> None:
        before = self.machine.snapshot()
        try:
            self.feed(event)
        except IllegalEvent:
            pass
        else:
            raise AssertionError(f"{event!r} should have been illegal")
        assert self.machine.snapshot() == before

    # --------------------------------------------------------------------------- invariants

    @invariant()
    def the_snapshot_round_trips_exactly(self) -> None:
        snap = self.machine.snapshot()
        twin = ClusterMachine.from_snapshot(self.machine.config, snap)
        assert twin.snapshot() == snap
        assert twin == self.machine
        assert (twin.members(), twin.state, twin.next_liveness_deadline(), twin.fl_iteration_num) == (
            self.machine.members(),
            self.machine.state,
            self.machine.next_liveness_deadline(),
            self.machine.fl_iteration_num,
        )

    @invariant()
    def ranks_are_exactly_zero_to_len_minus_one(self) -> None:
        members = self.machine.members()
        assert [m.rank for m in members] == list(range(len(members)))

    @invariant()
    def a_node_id_never_changes_rank(self) -> None:
        assert ranks(self.machine) == self.rank

    @invariant()
    def never_more_members_than_server_num(self) -> None:
        assert len(self.machine.members()) <= self.machine.server_num == self.server_num

    @invariant()
    def liveness_matches_the_model(self) -> None:
        assert alive(self.machine) == self.is_alive
        live_deadlines = [self.last[n] + TIMEOUT for n in self.rank if self.is_alive[n]]
        assert self.machine.next_liveness_deadline() == min(live_deadlines, default=None)

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
