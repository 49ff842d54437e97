"""The SQLite schema of a store file, its versions and the migrations between them.

Theory of operation (spec/store.md, "Schema"). A store file says what it is in its header:
``PRAGMA application_id`` is :data:`APPLICATION_ID` (``"FLcS"``), ``PRAGMA user_version`` is its schema
version. :data:`MIGRATIONS`\\ ``[v]`` takes a file from version ``v`` to ``v + 1``; each runs in one
transaction with the ``user_version`` bump, so a crash during a migration leaves the file at the old
version, whole. Version 0 is an empty database: migration 0 creates the version 1 tables.

- **Version 1**: ``identity``, ``scheduler_state``, ``members``, ``server_state``, ``models`` and
  ``partial_sum``, whose ``fl_ids`` column is a JSON list.
- **Version 2**: every blob carries its CRC-32 (``models.crc32``, ``partial_sum.crc32``), checked at
  every read, since ``PRAGMA integrity_check`` sees the b-trees but not the bytes of a blob; and the
  fl_ids of the running sum move to a table of their own (``partial_fl_ids``, one row per fold), since
  rewriting a JSON list that grows by one fl_id per update costs O(n) per update, O(n²) per iteration.
- **Version 3**: ``scheduler_state.fl_iteration_num`` (nullable), the ``fl_iteration_num`` the Servers
  agreed on, which a restarted Scheduler holds later registrations against (spec/recovery.md §3.1). A
  version 2 Scheduler store gets ``NULL`` (read as "not known yet").
- **Version 4**: ``device_rows``, the leader's per-device records (one row per ``fl_id``), written beside
  the machine's header in ``server_state.machine``, so a transaction writes only the devices it changed
  (spec/recovery.md §3.3). A version 3 store keeps its machine whole in ``server_state.machine``, which
  is still read as it is; the leader's next commit splits it.

A file of a version above :data:`SCHEMA_VERSION` is refused (:class:`~flcluster.errors.StoreTooNew`),
never downgraded.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence

import sqlite_utils

APPLICATION_ID = 0x464C6353
"""``PRAGMA application_id`` of a store file (the bytes ``FLcS``)."""

SCHEMA_VERSION = 4
"""The schema version this code writes."""

Migration = Callable[[sqlite_utils.Database], None]


def crc32(data: bytes) -> int:
    """The CRC-32 the schema stores next to a blob."""
    return zlib.crc32(data) & 0xFFFFFFFF


def _to_v1(db: sqlite_utils.Database) -> None:
    for sql in (
        """CREATE TABLE identity (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            role TEXT NOT NULL,
            node_id TEXT NOT NULL,
            fl_name TEXT NOT NULL,
            server_num INTEGER NOT NULL
        )""",
        """CREATE TABLE scheduler_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            cluster_state TEXT NOT NULL,
            server_num INTEGER NOT NULL
        )""",
        """CREATE TABLE members (
            rank INTEGER PRIMARY KEY,
            node_id TEXT NOT NULL UNIQUE,
            host TEXT NOT NULL,
            port INTEGER NOT NULL,
            device_port INTEGER NOT NULL
        )""",
        """CREATE TABLE server_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            rank INTEGER NOT NULL,
            iteration INTEGER NOT NULL,
            instance_state TEXT NOT NULL,
            machine TEXT
        )""",
        """CREATE TABLE models (
            iteration INTEGER PRIMARY KEY,
            weights BLOB NOT NULL
        )""",
        """CREATE TABLE partial_sum (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            iteration INTEGER NOT NULL,
            data BLOB NOT NULL,
            update_count INTEGER NOT NULL,
            fl_ids TEXT NOT NULL
        )""",
    ):
        db.execute(sql)


def _to_v2(db: sqlite_utils.Database) -> None:
    db.execute("ALTER TABLE models ADD COLUMN crc32 INTEGER NOT NULL DEFAULT 0")
    for iteration, weights in db.execute("SELECT iteration, weights FROM models").fetchall():
        db.execute("UPDATE models SET crc32 = ? WHERE iteration = ?", [crc32(weights), iteration])
    db.execute(
        """CREATE TABLE partial_fl_ids (
            seq INTEGER PRIMARY KEY,
            fl_id TEXT NOT NULL UNIQUE
        )"""
    )
    db.execute(
        """CREATE TABLE partial_sum_v2 (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            iteration INTEGER NOT NULL,
            data BLOB NOT NULL,
            crc32 INTEGER NOT NULL,
            update_count INTEGER NOT NULL
        )"""
    )
    for iteration, data, update_count, fl_ids in db.execute(
        "SELECT iteration, data, update_count, fl_ids FROM partial_sum"
    ).fetchall():
        ids = json.loads(fl_ids)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"partial_sum.fl_ids {fl_ids[:80]!r} is not a JSON list of strings")
        db.table("partial_sum_v2").insert(
            {
                "id": 1,
                "iteration": iteration,
                "data": data,
                "crc32": crc32(data),
                "update_count": update_count,
            }
        )
        db.table("partial_fl_ids").insert_all(({"fl_id": i} for i in ids), batch_size=1000)
    db.execute("DROP TABLE partial_sum")
    db.execute("ALTER TABLE partial_sum_v2 RENAME TO partial_sum")


def _to_v3(db: sqlite_utils.Database) -> None:
    db.execute("ALTER TABLE scheduler_state ADD COLUMN fl_iteration_num INTEGER")


def _to_v4(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE device_rows (
            fl_id TEXT PRIMARY KEY,
            record TEXT NOT NULL
        )"""
    )


MIGRATIONS: Sequence[Migration] = (_to_v1, _to_v2, _to_v3, _to_v4)
"""``MIGRATIONS[v]`` takes a store from schema version ``v`` to ``v + 1``."""

assert len(MIGRATIONS) == SCHEMA_VERSION


def user_version(db: sqlite_utils.Database) -> int:
    """The file's schema version (``PRAGMA user_version``)."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite_utils.Database, target: int = SCHEMA_VERSION) -> list[int]:
    """Bring ``db`` up to schema version ``target``, one transaction per step; return the steps run.

    Raises:
        ValueError: the file is above ``target`` (the caller refuses it first), or a step found data
            it cannot carry over.
    """
    version = user_version(db)
    if version > target:
        raise ValueError(f"schema version {version!r} is above the target {target!r}")
    done = []
    while version < target:
        with db.atomic():
            MIGRATIONS[version](db)
            if version == 0:
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {version + 1}")
        version += 1
        done.append(version)
    return done
