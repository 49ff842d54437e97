"""Recovery store commits per second for LeNet-size running sums (266 KB), one at a time and grouped.

Set-up: one store file in a temporary directory on this host's disk; every transition is a
:class:`~flcluster.store.FoldedUpdates` carrying a fresh 266 KB running sum (what a Server commits per
accepted updateModel). Measured in the same run:

- baseline: plain ``sqlite3`` on the calling thread, WAL, ``synchronous=FULL``, one ``UPDATE`` of the
  266 KB row and one ``COMMIT`` per update (what "write the partial sum for every update" costs without
  any store around it);
- the store with one writer awaiting each commit (no grouping possible);
- the store with ``N`` concurrent writers (group commit: updates queued while a transaction is in
  flight are committed together in the next), ``synchronous=FULL``;
- the same with ``synchronous=NORMAL``, to show what the fsync per transaction costs.

Printed per case: updates/s, transactions/s, updates per transaction, and the largest group. Nothing is
asserted (a benchmark prints figures); every commit must succeed. Run with
``pytest tests/benchmarks/test_bench_store.py -s``.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
import trio

from flcluster.store import FoldedUpdates, NodeIdentity, StoreRole, Transition, open_sqlite_store
from flcluster.store.sqlite import Synchronous

pytestmark = pytest.mark.bench

SUM_BYTES = 266_000
DISTINCT = 16
UPDATES = 400
WRITERS = (1, 4, 16, 64)
IDENTITY = NodeIdentity(StoreRole.SERVER, "bench", "Lenet", 1)


def sums(count: int) -> list[bytes]:
    """``count`` 266 KB running sums, made before the clock starts, each unlike the one before it.

    A real running sum changes in every float at every update. Sums that differ in a few bytes only
    would flatter every case: for a row of the same size SQLite overwrites a blob in place and skips
    the overflow pages whose bytes did not change.
    """
    distinct = [os.urandom(SUM_BYTES) for _ in range(DISTINCT)]
    return [distinct[i % DISTINCT] for i in range(count)]


def baseline(path: Path, blobs: list[bytes]) -> float:
    """Updates/s of plain sqlite3, one UPDATE and one COMMIT per update, WAL + FULL."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE s (id INTEGER PRIMARY KEY, data BLOB, n INTEGER)")
        conn.execute("INSERT INTO s VALUES (1, ?, 0)", [blobs[0]])
        start = time.perf_counter()
        for n, blob in enumerate(blobs, start=1):
            conn.execute("BEGIN")
            conn.execute("UPDATE s SET data = ?, n = ? WHERE id = 1", [blob, n])
            conn.execute("COMMIT")
        return len(blobs) / (time.perf_counter() - start)
    finally:
        conn.close()


async def store_run(path: Path, blobs: list[bytes], writers: int, synchronous: Synchronous) -> str:
    """Fold ``len(blobs)`` updates through the store with ``writers`` concurrent tasks; a result line."""
    async with open_sqlite_store(path, IDENTITY, synchronous=synchronous) as store:
        numbers = iter(range(len(blobs)))

        async def writer() -> None:
            for n in numbers:
                await store.commit(Transition(partial=FoldedUpdates(1, (f"dev-{n}",), blobs[n], n + 1)))

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(writers):
                nursery.start_soon(writer)
        elapsed = time.perf_counter() - start
        stats = store.statistics()
    assert stats.transitions == len(blobs) and stats.refused == 0, stats
    return (
        f"store {synchronous:<6} writers={writers:<3} {len(blobs) / elapsed:8.0f} updates/s "
        f"{stats.transactions / elapsed:7.0f} transactions/s "
        f"{stats.transitions / stats.transactions:6.1f} updates/transaction (largest {stats.largest_group})"
    )


def test_bench_store_commits(tmp_path: Path) -> None:
    blobs = sums(UPDATES)
    rate = baseline(tmp_path / "base.sqlite", blobs)
    lines = [f"baseline sqlite3 FULL, one commit per update: {rate:8.0f} updates/s"]
    for synchronous in ("FULL", "NORMAL"):
        for writers in WRITERS:
            path = tmp_path / f"store-{synchronous}-{writers}.sqlite"
            lines.append(trio.run(store_run, path, blobs, writers, synchronous))
    print(f"\nrecovery store, {UPDATES} updates of a {SUM_BYTES} B running sum, files in {tmp_path}:")
    for line in lines:
        print("  " + line)
