"""The SQLite store's files (spec/store.md, "Opening" and "Schema"): what it refuses at start-up and how,
the version 1 fixture, group commit on disk, and the file-per-node rule.

Every refusal must name the file, say that a store is never reset automatically, and leave the file's
bytes exactly as they were.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import trio

from flcluster.store import (
    SCHEMA_VERSION,
    FoldedUpdates,
    NodeIdentity,
    PartialSumState,
    ServerState,
    StoreContents,
    StoreCorrupt,
    StoredModel,
    StoreError,
    StoreForeign,
    StoreOpenError,
    StoreRole,
    StoreTooNew,
    Transition,
    open_sqlite_store,
    store_file,
)
from tests.unit.store import make_store_v1
from tests.unit.store.backends import SERVER, weights

BIG = 266_000  # bytes: LeNet's partial sum


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def write(path: Path | str, data: bytes) -> None:
    Path(path).write_bytes(data)


async def write_store(path: Path, models: int = 3, floats: int = BIG // 4) -> StoreContents:
    """A closed store at ``path`` with ``models`` big models and a running sum; what it holds."""
    async with open_sqlite_store(path, SERVER) as store:
        await store.commit(Transition(server=ServerState(0, models, "running", "{}")))
        for i in range(models):
            await store.commit(Transition(model=StoredModel(i, weights(i, floats))))
        await store.commit(Transition(partial=FoldedUpdates(models, ("f1",), weights(99, floats), 1)))
        return await store.load()


async def refused(path: Path, identity: NodeIdentity = SERVER) -> StoreError:
    """Open ``path``, expect a refusal naming it, check that the file is untouched; the error."""
    before = digest(path)
    with pytest.raises(StoreError) as info:
        async with open_sqlite_store(path, identity):
            pass
    message = str(info.value)
    assert str(path) in message
    assert "never reset automatically" in message
    if before is not None:
        assert digest(path) == before, "a refused store file must stay as it was"
    return info.value


# ------------------------------------------------------------------------------------------ refusals


async def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"")
    error = await refused(path)
    assert isinstance(error, StoreCorrupt) and "is empty" in str(error)


async def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    path.write_text('{"recovery": {"storage_file_path": "config.json"}}')
    error = await refused(path)
    assert isinstance(error, StoreCorrupt) and 'not a SQLite database: it begins b\'{"recovery"' in str(error)


async def test_a_file_cut_inside_the_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    await write_store(path, models=0)
    path.write_bytes(path.read_bytes()[:60])
    error = await refused(path)
    assert isinstance(error, StoreCorrupt) and "cut short: 60 bytes" in str(error)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
async def test_a_file_cut_short_is_refused(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "s.sqlite"
    await write_store(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    error = await refused(path)
    assert isinstance(error, StoreCorrupt) and "cut short: its header says" in str(error)


async def test_garbage_over_the_tables_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    await write_store(path)
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page : 3 * page] = bytes(range(256)) * (2 * page // 256)  # pages 2 and 3: b-tree pages
    path.write_bytes(bytes(data))
    error = await refused(path)
    assert isinstance(error, StoreCorrupt)
    assert "integrity check" in str(error) or "SQLite cannot read it" in str(error)


async def test_garbage_inside_a_model_is_refused_by_its_crc(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    await write_store(path)
    data = bytearray(path.read_bytes())
    offset = data.find(weights(1, BIG // 4)[4000:4100])  # inside model 1, far from any page header
    assert offset > 0
    data[offset : offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    error = await refused(path)
    assert isinstance(error, StoreCorrupt)
    assert "the model of iteration 1 does not match its CRC-32" in str(error)


async def test_a_database_of_another_program_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (x)")
    conn.close()
    error = await refused(path)
    assert isinstance(error, StoreForeign) and "a SQLite database of another program" in str(error)


async def test_a_store_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    await write_store(path, models=1)
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    error = await refused(path)
    assert isinstance(error, StoreTooNew)
    assert (
        f"schema version is {SCHEMA_VERSION + 1}; this flcluster reads versions up to {SCHEMA_VERSION}"
        in str(error)
    )


async def test_a_store_of_another_job_is_refused_naming_both_values(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    await write_store(path, models=1)
    other = NodeIdentity(StoreRole.SERVER, "node-a", "OtherJob", 4)
    error = await refused(path, other)
    assert isinstance(error, StoreForeign)
    assert "fl_name 'Lenet' (this node has 'OtherJob'), server_num 2 (this node has 4)" in str(error)


async def test_a_write_ahead_log_without_its_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    write(f"{path}-wal", b"\0" * 32)
    error = await refused(path)
    assert isinstance(error, StoreCorrupt) and "write-ahead log" in str(error)
    assert not path.exists()


async def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "s.sqlite"
    with pytest.raises(StoreOpenError, match="does not exist"):
        async with open_sqlite_store(path, SERVER):
            pass
    assert not path.parent.exists()


# --------------------------------------------------------------------------------------- the schema


async def test_a_version_1_file_opens_with_the_current_code(tmp_path: Path) -> None:
    path = tmp_path / "store_v1.sqlite"
    shutil.copyfile(make_store_v1.FIXTURE, path)
    identity = NodeIdentity(*make_store_v1.IDENTITY)
    async with open_sqlite_store(path, identity) as store:
        assert not store.created
        contents = await store.load()
        iteration, data, count, fl_ids = make_store_v1.PARTIAL
        assert contents == StoreContents(
            identity=identity,
            server=ServerState(*make_store_v1.SERVER_STATE),
            models=tuple(StoredModel(i, w) for i, w in make_store_v1.MODELS.items()),
            partial=PartialSumState(iteration, data, tuple(fl_ids), count),
        )
        await store.commit(Transition(partial=FoldedUpdates(iteration, ("dev-4",), weights(71), count + 1)))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    async with open_sqlite_store(path, identity) as store:
        partial = (await store.load()).partial
    assert partial == PartialSumState(iteration, weights(71), (*fl_ids, "dev-4"), count + 1)


async def test_a_version_1_file_of_another_node_is_refused_before_any_migration(tmp_path: Path) -> None:
    path = tmp_path / "store_v1.sqlite"
    shutil.copyfile(make_store_v1.FIXTURE, path)
    error = await refused(path, NodeIdentity("server", "node-other", "Lenet", 2))
    assert isinstance(error, StoreForeign)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()


def test_the_committed_version_1_fixture_is_what_the_script_writes(tmp_path: Path) -> None:
    """The fixture is reproducible: regenerate it and compare the tables (not the bytes: page layout)."""
    fresh = tmp_path / "v1.sqlite"
    make_store_v1.write(fresh)

    def dump(path: Path) -> list[str]:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return list(conn.iterdump())
        finally:
            conn.close()

    assert dump(fresh) == dump(make_store_v1.FIXTURE)


# ----------------------------------------------------------------------------- creation and grouping


async def test_a_new_store_is_created_whole_in_place(tmp_path: Path) -> None:
    path = store_file(tmp_path, StoreRole.SERVER, "node-a")
    write(f"{path}.new", b"half-written by a crash")  # a .new file is never a store
    async with open_sqlite_store(path, SERVER) as store:
        assert store.created
        assert store.location == str(path)
    assert sorted(os.listdir(tmp_path)) == [path.name]


async def test_commits_queued_during_a_transaction_are_committed_together(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    writers = 32
    folded = 0
    sums = [weights(i, BIG // 4) for i in range(writers + 1)]  # made beforehand: the writers only commit

    async def fold_and_commit(fl_id: str) -> None:
        nonlocal folded
        folded += 1  # the fold; the commit follows with no checkpoint between (spec/store.md)
        await store.commit(Transition(partial=FoldedUpdates(1, (fl_id,), sums[folded], folded)))

    async with open_sqlite_store(path, SERVER) as store:
        async with trio.open_nursery() as nursery:
            for i in range(writers):
                nursery.start_soon(fold_and_commit, f"f{i}")
        stats = store.statistics()
        assert stats.transitions == writers
        assert stats.largest_group > 1 and stats.transactions < writers, stats
        partial = (await store.load()).partial
    assert partial is not None and sorted(partial.fl_ids) == sorted(f"f{i}" for i in range(writers))
    assert partial.update_count == writers and partial.data == weights(writers, BIG // 4)


async def test_the_event_loop_runs_while_a_commit_is_in_flight(tmp_path: Path) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with open_sqlite_store(tmp_path / "s.sqlite", SERVER) as store, trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        before = ticks
        for i in range(3):
            await store.commit(Transition(model=StoredModel(i, weights(i, 4 * BIG // 4))))
        assert ticks > before + 3
        nursery.cancel_scope.cancel()


def test_every_node_has_its_own_file() -> None:
    a = store_file("/var/fl", "server", "node-1")
    assert a == Path("/var/fl/server-node-1.sqlite")
    assert store_file("/var/fl", "scheduler", "node-1") != a
    assert store_file("/var/fl", "server", "../x/y").parent == Path("/var/fl")
    assert store_file("/var/fl", "server", "a/b") != store_file("/var/fl", "server", "a%2Fb")
    with pytest.raises(ValueError, match="node_id='' is refused"):
        store_file("/var/fl", "server", "")
