"""The three stores the contract suite runs against, behind one opener, and records to write."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import attrs

from flcluster.store import (
    MEMORY,
    MemoryVolume,
    NodeIdentity,
    RecoveryStore,
    StoreRole,
    open_memory_store,
    open_sqlite_store,
    store_file,
)

BACKENDS = ("memory", "sqlite-memory", "sqlite-file")

SERVER = NodeIdentity(role=StoreRole.SERVER, node_id="node-a", fl_name="Lenet", server_num=2)
SCHEDULER = NodeIdentity(role=StoreRole.SCHEDULER, node_id="sched", fl_name="Lenet", server_num=2)


def weights(seed: int, floats: int = 16) -> bytes:
    """``floats`` 4-byte little-endian values (float32-sized) that differ with ``seed``, and no two seeds
    (< 4096) share a value, so a run of one model's bytes is found in a file only where that model is."""
    assert floats < 1 << 20 and seed < 1 << 12
    return b"".join(((seed << 20) | i).to_bytes(4, "little") for i in range(floats))


@attrs.define
class Opener:
    """Opens the same store (file or volume) again and again; ``reopenable`` says whether it survives."""

    backend: str
    tmp_path: Path
    volume: MemoryVolume = attrs.field(factory=lambda: MemoryVolume("volume-a"))

    @property
    def reopenable(self) -> bool:
        return self.backend != "sqlite-memory"

    @property
    def path(self) -> Path:
        """The one file of the ``sqlite-file`` backend, whichever identity opens it."""
        return store_file(self.tmp_path, StoreRole.SERVER, "node-a")

    @contextlib.asynccontextmanager
    async def open(self, identity: NodeIdentity = SERVER) -> AsyncIterator[RecoveryStore]:
        match self.backend:
            case "memory":
                async with open_memory_store(identity, self.volume) as store:
                    yield store
            case "sqlite-memory":
                async with open_sqlite_store(MEMORY, identity) as sqlite_store:
                    yield sqlite_store
            case "sqlite-file":
                async with open_sqlite_store(self.path, identity) as sqlite_store:
                    yield sqlite_store
            case _:
                raise AssertionError(self.backend)
