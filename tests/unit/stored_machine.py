"""The leader's machine as its store keeps it, for the property tests of the iteration rules.

:class:`StoredMachine` plays the leader's commit path (flcluster/runtime/driver.py
``Leader._machine_transition``) against the store's own rule book (:func:`apply_transition`, what the
MemoryStore is and what the SqliteStore is tested to match): after any steps, the header and the device
rows committed so far must rebuild the machine exactly (spec/recovery.md §3.3).
"""

from __future__ import annotations

from flcluster.core.device_rows import header_json, record_json, snapshot_from_rows
from flcluster.core.iteration import IterationMachine
from flcluster.store.records import (
    DeviceRows,
    NodeIdentity,
    ServerState,
    StoreContents,
    StoreRole,
    Transition,
    apply_transition,
)


class StoredMachine:
    """A store's contents, written only the way the leader writes them."""

    def __init__(self) -> None:
        self.contents = StoreContents(identity=NodeIdentity(StoreRole.SERVER, "leader", "Lenet", 1))

    def commit(self, m: IterationMachine) -> None:
        """Commit ``m`` as the leader does: its header, and the rows of the devices changed since."""
        changes = m.take_device_changes()
        rows = DeviceRows(
            rewrite=changes.rewrite,
            rows=tuple((r.fl_id, record_json(r)) for r in changes.records if not r.empty),
            deleted=tuple(r.fl_id for r in changes.records if r.empty),
        )
        header = header_json(m.snapshot_without_devices())
        state = ServerState(0, m.current_iteration, m.state.value, header)
        self.contents = apply_transition(self.contents, Transition(server=state, devices=rows))

    def restored(self) -> IterationMachine:
        """The machine a leader restarted from this store would run."""
        server = self.contents.server
        assert server is not None and server.machine is not None
        return IterationMachine.from_snapshot(snapshot_from_rows(server.machine, self.contents.devices))
