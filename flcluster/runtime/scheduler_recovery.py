"""What the Scheduler keeps in its recovery store, and how a restarted Scheduler rebuilds its machine.

Theory of operation (spec/recovery.md §3.1)
-------------------------------------------
The Scheduler's state is its :class:`~flcluster.core.cluster.ClusterMachine`. What of it outlives the
process is the part a restart cannot learn again from the Servers' re-registrations alone: who holds
which rank (node id, rank, host, peer port, device port), the current total ``server_num``, the agreed
``fl_iteration_num`` and the cluster state. :func:`stored_state` maps a
:class:`~flcluster.core.cluster.ClusterSnapshot` onto the store's
:class:`~flcluster.store.SchedulerState`; the driver commits it whenever it changes, before the
``register_reply`` and the ``membership`` broadcast that depend on it go out.

Liveness (heartbeat times, ``alive``, ``finished``) and process ids are not kept: they belong to the
processes, which re-register. :func:`restored_machine` gives every stored member one
``heartbeat_timeout`` from the restarted Scheduler's own start (``last_heartbeat_ms = now``,
``alive``) to re-register before the machine marks it down, and derives the state from the membership
as the machine would with everyone alive: ``CLUSTER_READY`` when all ``server_num`` Servers are known,
else ``CLUSTER_STARTING`` (formation goes on); ``CLUSTER_DISABLE_FLS`` stays disabled (the original
restores that state too).

A scaling or a transient instance operation is never committed (the driver commits only a *settled*
machine, :attr:`~flcluster.core.cluster.ClusterMachine.settled`): the store keeps the last settled
membership, so a Scheduler restarted during a scaling has rolled it back (spec/recovery.md §9).
"""

from __future__ import annotations

from flcluster.core.cluster import (
    ClusterConfig,
    ClusterMachine,
    ClusterSnapshot,
    ClusterState,
    NodeInfo,
    NodeRecord,
    Role,
)
from flcluster.errors import StoreCorrupt
from flcluster.store import Member, NodeIdentity, SchedulerState, StoreRole

__all__ = ["restored_machine", "scheduler_identity", "stored_state"]


def scheduler_identity(node_id: str, fl_name: str, server_num: int) -> NodeIdentity:
    """The job identity a Scheduler's store is bound to (the configured ``server_num``)."""
    return NodeIdentity(role=StoreRole.SCHEDULER, node_id=node_id, fl_name=fl_name, server_num=server_num)


def stored_state(snapshot: ClusterSnapshot) -> SchedulerState:
    """The part of a cluster snapshot the store keeps (see the module docstring)."""
    return SchedulerState(
        cluster_state=snapshot.state.name,
        server_num=snapshot.server_num,
        members=tuple(
            Member(
                node_id=n.info.node_id,
                rank=n.rank,
                host=n.info.host,
                port=n.info.port,
                device_port=n.info.device_port,
            )
            for n in snapshot.nodes
        ),
        fl_iteration_num=snapshot.fl_iteration_num,
    )


def restored_machine(
    config: ClusterConfig, state: SchedulerState, *, now_ms: int, location: str
) -> ClusterMachine:
    """The cluster machine of a restarted Scheduler, from its stored state.

    Args:
        config: the machine's config (this start's heartbeat timeout).
        state: what the store holds.
        now_ms: this start's epoch milliseconds: every member's grace to re-register runs from it.
        location: the store's path, for the error message.

    Raises:
        StoreCorrupt: the stored state is one no Scheduler writes (an unknown cluster state, members
            without an ``fl_iteration_num``, ranks with gaps, more members than ``server_num``).
    """
    if state.cluster_state not in ClusterState.__members__:
        raise StoreCorrupt(
            location,
            f"its cluster state {state.cluster_state!r} is not one of {', '.join(ClusterState.__members__)}",
        )
    complete = len(state.members) == state.server_num
    # The one state kept beyond the membership (as the original's recovery): a disabled instance.
    disabled = complete and state.cluster_state == ClusterState.CLUSTER_DISABLE_FLS.name
    if disabled:
        restored = ClusterState.CLUSTER_DISABLE_FLS
    else:
        restored = ClusterState.CLUSTER_READY if complete else ClusterState.CLUSTER_STARTING
    snapshot = ClusterSnapshot(
        server_num=state.server_num,
        state=restored,
        fl_iteration_num=state.fl_iteration_num,
        ever_ready=complete,
        shutting_down=False,
        disabled=disabled,
        nodes=tuple(
            NodeRecord(
                info=NodeInfo(
                    node_id=m.node_id,
                    role=Role.SERVER,
                    host=m.host,
                    port=m.port,
                    device_port=m.device_port,
                    pid=0,
                ),
                rank=m.rank,
                last_heartbeat_ms=now_ms,
                alive=True,
                finished=False,
            )
            for m in state.members
        ),
    )
    try:
        return ClusterMachine.from_snapshot(config, snapshot)
    except ValueError as exc:
        raise StoreCorrupt(location, f"its scheduler state {state!r} is refused: {exc}") from None
