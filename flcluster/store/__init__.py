"""The recovery store: what a node keeps to survive a restart (spec/store.md).

One interface (:class:`RecoveryStore`), two implementations (:class:`SqliteStore` on a SQLite file, on a
thread of its own, with group commit; :class:`MemoryStore`), one contract test suite
(tests/unit/store/test_contract.py) run against memory, SQLite in memory and SQLite on disk.

A node opens its store at start-up (``async with open_sqlite_store(store_file(dir, role, node_id),
identity) as store``), loads what it holds, and commits one :class:`Transition` per state change before
it acknowledges anything that depends on it.
"""

from __future__ import annotations

from flcluster.errors import (
    StoreClosed,
    StoreCorrupt,
    StoreError,
    StoreForeign,
    StoreLocked,
    StoreOpenError,
    StoreTooNew,
    StoreWriteError,
    TransitionRefused,
)
from flcluster.store.api import RecoveryStore, node_store_path, store_file
from flcluster.store.memory import MemoryStore, MemoryVolume, open_memory_store
from flcluster.store.records import (
    DeviceRows,
    FoldedUpdates,
    Member,
    NodeIdentity,
    PartialReset,
    PartialSumState,
    SchedulerState,
    ServerState,
    StoreContents,
    StoredModel,
    StoreRole,
    StoreStatistics,
    Transition,
)
from flcluster.store.schema import SCHEMA_VERSION
from flcluster.store.sqlite import MEMORY, SqliteStore, open_sqlite_store

__all__ = [
    "MEMORY",
    "SCHEMA_VERSION",
    "DeviceRows",
    "FoldedUpdates",
    "Member",
    "MemoryStore",
    "MemoryVolume",
    "NodeIdentity",
    "PartialReset",
    "PartialSumState",
    "RecoveryStore",
    "SchedulerState",
    "ServerState",
    "SqliteStore",
    "StoreClosed",
    "StoreContents",
    "StoreCorrupt",
    "StoreError",
    "StoreForeign",
    "StoreLocked",
    "StoreOpenError",
    "StoreRole",
    "StoreStatistics",
    "StoreTooNew",
    "StoreWriteError",
    "StoredModel",
    "Transition",
    "TransitionRefused",
    "node_store_path",
    "open_memory_store",
    "open_sqlite_store",
    "store_file",
]
