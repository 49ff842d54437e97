"""The recovery store in a SQLite file (sqlite-utils), on one thread of its own, with group commit.

Theory of operation (spec/store.md, "SqliteStore")
---------------------------------------------------
**One thread owns the connection.** :func:`open_sqlite_store` starts a writer thread that opens the
file and then serves jobs (open, load, commit, close) from a :class:`queue.SimpleQueue`, in order. A
trio task submits a job (a non-blocking ``put``) and waits on a :class:`trio.Event` that the thread sets
through :meth:`trio.lowlevel.TrioToken.run_sync_soon`; the event loop never blocks on SQLite and the
connection is never touched by two threads (``trio.to_thread`` would use whichever worker thread is
free, which is why it is not used for the connection).

**Group commit.** When the thread takes a commit, it also takes every commit queued behind it (up to
:data:`MAX_GROUP`) and commits them all in one transaction (``db.atomic()``), then answers each. While
one transaction is being made durable, new commits queue up; they go together in the next. With one
writer a transaction holds one transition; under load the cost of a commit (the fsync) is shared by
all the transitions queued during the previous one, so the cost per transition falls as load rises. No
caller is answered before the transaction holding its transition is committed. Within a group, later
writes of the same single-row state supersede earlier ones, so the running partial sum (266 KB for
LeNet) is written once per transaction, not once per update; the fl_ids are one row per fold. A
transition of the group that breaks a store rule is refused alone (the rules are checked before
anything is written); an SQLite failure fails the whole group, and nothing of it is committed.

**Durability.** ``journal_mode=WAL`` and ``synchronous=FULL``. In WAL mode ``NORMAL`` syncs only at
checkpoints: a commit is safe against the process being killed (SIGKILL: the WAL is in the OS page
cache) but the last transactions can be lost on power loss or an OS crash. The contract is "an update
acknowledged is never silently lost", with no exception for the host going down, so every commit
fsyncs the WAL (``FULL``). Group commit is what makes ``FULL`` affordable: one fsync covers a whole
group (see tests/benchmarks/test_bench_store.py for the figures). ``locking_mode=EXCLUSIVE``: the file
is held for as long as the store is open, so a second node given the same file is refused
(:class:`~flcluster.errors.StoreLocked`) instead of writing over the first, and the WAL index
lives in heap memory (no ``-shm`` file).

**Opening** (spec/store.md, "Opening"). A missing file is created whole: the schema and the identity
are written to ``<name>.new``, which is then renamed into place, so a file at the store's path is
always a complete store and anything less is damage. An existing file is checked before it is used,
and refused (never reset) if it is empty, cut short (shorter than its header says), not SQLite, of
another program (``application_id``), fails ``PRAGMA integrity_check``, is of a newer schema, belongs
to another job or node (:class:`~flcluster.store.records.NodeIdentity`), or holds a blob whose CRC-32
does not match. Then the migrations bring it to :data:`~flcluster.store.schema.SCHEMA_VERSION`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import attrs
import sqlite_utils
import trio

from flcluster.errors import (
    StoreClosed,
    StoreCorrupt,
    StoreError,
    StoreForeign,
    StoreLocked,
    StoreOpenError,
    StoreTooNew,
    StoreWriteError,
)
from flcluster.store.records import (
    FoldedUpdates,
    Member,
    NodeIdentity,
    PartialReset,
    PartialSumState,
    SchedulerState,
    ServerState,
    StoreContents,
    StoredModel,
    StoreStatistics,
    Transition,
    check_partial_write,
    check_roles,
    identity_mismatch,
)
from flcluster.store.schema import APPLICATION_ID, SCHEMA_VERSION, crc32, migrate

log = logging.getLogger("flcluster.store")

MEMORY = ":memory:"
"""The path of a SQLite store in memory (nothing survives :meth:`SqliteStore.aclose`)."""

MAX_GROUP = 512
"""The most transitions one transaction commits."""

Synchronous = Literal["FULL", "NORMAL"]

_SQLITE_MAGIC = b"SQLite format 3\x00"
_HEADER = 100


# ------------------------------------------------------------------------------------------ the file


def _header_checks(path: Path) -> bool:
    """Refuse what can be told from the file system and the header alone; say whether the file exists."""
    where = str(path)
    wal = Path(f"{path}-wal")
    if not path.exists():
        if wal.exists():
            raise StoreCorrupt(
                where,
                f"its write-ahead log {wal} exists but the database file does not",
                "move the -wal file aside (or restore the database file) to start this node",
            )
        if not path.parent.is_dir():
            raise StoreOpenError(
                where, f"the directory {str(path.parent)!r} does not exist", "create it, or fix the path"
            )
        return False
    if not path.is_file():
        raise StoreCorrupt(where, "it is not a regular file", "give the store a file path")
    size = path.stat().st_size
    if size == 0:
        raise StoreCorrupt(where, "the file is empty (0 bytes): cut short, or not written by flcluster")
    with path.open("rb") as f:
        header = f.read(_HEADER)
    if not header.startswith(_SQLITE_MAGIC[: len(header)]) or len(header) < len(_SQLITE_MAGIC):
        raise StoreCorrupt(
            where, f"it is not a SQLite database: it begins {header[:16]!r}, expected {_SQLITE_MAGIC!r}"
        )
    if len(header) < _HEADER:
        raise StoreCorrupt(where, f"it is cut short: {size} bytes, less than a SQLite header ({_HEADER})")
    app_id = int.from_bytes(header[68:72], "big")
    if app_id != APPLICATION_ID:
        raise StoreForeign(
            where,
            f"it is a SQLite database of another program (application_id {app_id:#010x}, a recovery store "
            f"has {APPLICATION_ID:#010x})",
            "give this node a store path of its own",
        )
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    header_valid = header[24:28] == header[92:96]
    wal_empty = not wal.exists() or wal.stat().st_size == 0
    if header_valid and wal_empty and size < pages * page_size:
        raise StoreCorrupt(
            where,
            f"it is cut short: its header says {pages} pages of {page_size} bytes ({pages * page_size} "
            f"bytes), the file has {size}",
        )
    return True


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _connect(path: str, synchronous: Synchronous) -> sqlite_utils.Database:
    conn = sqlite3.connect(path, timeout=0)
    db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
    db.execute("PRAGMA locking_mode = EXCLUSIVE")
    db.enable_wal()
    db.execute(f"PRAGMA synchronous = {synchronous}")
    return db


def _write_identity(db: sqlite_utils.Database, identity: NodeIdentity) -> None:
    with db.atomic():
        db.table("identity").insert(
            {
                "id": 1,
                "role": identity.role.value,
                "node_id": identity.node_id,
                "fl_name": identity.fl_name,
                "server_num": identity.server_num,
            }
        )


def _create(path: Path, identity: NodeIdentity, synchronous: Synchronous) -> None:
    """Write a whole new store at ``path`` (by way of ``<name>.new``, renamed into place)."""
    new = path.with_name(path.name + ".new")
    for leftover in (new, Path(f"{new}-wal"), Path(f"{new}-journal")):
        leftover.unlink(missing_ok=True)  # a .new file is never a committed store
    db = _connect(str(new), synchronous)
    try:
        migrate(db)
        _write_identity(db, identity)
    finally:
        db.close()  # the last connection checkpoints the WAL into the file and deletes it
    _fsync_path(new)
    new.rename(path)
    _fsync_path(path.parent, directory=True)


# ----------------------------------------------------------------------------------------- reading


def _row(db: sqlite_utils.Database, sql: str) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = db.execute(sql).fetchone()
    return row


def _read_identity(db: sqlite_utils.Database, where: str) -> NodeIdentity:
    row = _row(db, "SELECT role, node_id, fl_name, server_num FROM identity WHERE id = 1")
    if row is None:
        raise StoreCorrupt(where, "it has no identity row (a complete store always has one)")
    try:
        return NodeIdentity(*row)
    except (ValueError, TypeError) as exc:
        raise StoreCorrupt(where, f"its identity row {row!r} is refused: {exc}") from None


def _read_contents(db: sqlite_utils.Database, where: str) -> StoreContents:
    identity = _read_identity(db, where)
    try:
        scheduler = None
        if (
            row := _row(
                db, "SELECT cluster_state, server_num, fl_iteration_num FROM scheduler_state WHERE id = 1"
            )
        ) is not None:
            members = [
                Member(node_id=n, rank=r, host=h, port=p, device_port=d)
                for r, n, h, p, d in db.execute(
                    "SELECT rank, node_id, host, port, device_port FROM members ORDER BY rank"
                ).fetchall()
            ]
            scheduler = SchedulerState(
                cluster_state=row[0], server_num=row[1], members=tuple(members), fl_iteration_num=row[2]
            )
        server = None
        sql = "SELECT rank, iteration, instance_state, machine FROM server_state WHERE id = 1"
        if (row := _row(db, sql)) is not None:
            server = ServerState(*row)
        models = []
        for iteration, weights, crc in db.execute(
            "SELECT iteration, weights, crc32 FROM models ORDER BY iteration"
        ).fetchall():
            if crc32(weights) != crc:
                raise ValueError(
                    f"the model of iteration {iteration!r} does not match its CRC-32 {crc:#010x}"
                )
            models.append(StoredModel(iteration, weights))
        partial = None
        sql = "SELECT iteration, data, crc32, update_count FROM partial_sum WHERE id = 1"
        if (row := _row(db, sql)) is not None:
            iteration, data, crc, update_count = row
            if crc32(data) != crc:
                raise ValueError(f"the partial sum of iteration {iteration!r} does not match its CRC-32")
            ids = [r[0] for r in db.execute("SELECT fl_id FROM partial_fl_ids ORDER BY seq").fetchall()]
            partial = PartialSumState(iteration, data, tuple(ids), update_count)
        devices = tuple(db.execute("SELECT fl_id, record FROM device_rows ORDER BY fl_id").fetchall())
    except (ValueError, TypeError) as exc:
        raise StoreCorrupt(where, f"its contents are damaged: {exc}") from None
    return StoreContents(
        identity=identity,
        scheduler=scheduler,
        server=server,
        models=tuple(models),
        partial=partial,
        devices=devices,
    )


# ----------------------------------------------------------------------------------------- the thread


@attrs.define
class _Job:
    kind: Literal["open", "load", "commit", "close"]
    transition: Transition | None
    deliver: Callable[[Any, BaseException | None], None]


class _Writer:
    """The thread's side: the connection, the cached partial-sum keys, the jobs."""

    def __init__(self, path: str, identity: NodeIdentity, synchronous: Synchronous) -> None:
        self.path = path
        self.identity = identity
        self.synchronous = synchronous
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.db: sqlite_utils.Database | None = None
        self.created = False
        self.stats = StoreStatistics(transitions=0, transactions=0, refused=0, largest_group=0)
        # The running sum's keys, as committed plus what the open transaction added.
        self.partial_iteration: int | None = None
        self.partial_ids: set[str] = set()

    # -- open

    def open(self) -> StoreContents:
        where = self.path
        try:
            if self.path == MEMORY:
                self.db = _connect(MEMORY, self.synchronous)
                migrate(self.db)
                _write_identity(self.db, self.identity)
                self.created = True
            else:
                path = Path(self.path)
                if not _header_checks(path):
                    _create(path, self.identity, self.synchronous)
                    self.created = True
                    _header_checks(path)
                self.db = _connect(self.path, self.synchronous)
                self._check_open_file()
            contents = _read_contents(self.db, where)
        except BaseException:
            if self.db is not None:
                self.db.close()
                self.db = None
            raise
        self._cache(contents)
        return contents

    def _check_open_file(self) -> None:
        assert self.db is not None
        where = self.path
        problems = [r[0] for r in self.db.execute("PRAGMA integrity_check(8)").fetchall()]
        if problems != ["ok"]:
            raise StoreCorrupt(where, f"it fails SQLite's integrity check: {'; '.join(problems)!r}")
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreTooNew(
                where,
                f"its schema version is {version!r}; this flcluster reads versions up to {SCHEMA_VERSION!r}",
                "run the flcluster that wrote it (a store is never downgraded)",
            )
        if version < 1:
            raise StoreCorrupt(where, f"its schema version is {version!r}; a complete store has >= 1")
        identity = _read_identity(self.db, where)  # before migrating: never upgrade another node's file
        if identity != self.identity:
            raise StoreForeign(where, *identity_mismatch(identity, self.identity))
        try:
            migrate(self.db)
        except ValueError as exc:
            raise StoreCorrupt(
                where, f"its data cannot be carried over to the current schema: {exc}"
            ) from None

    def _cache(self, contents: StoreContents) -> None:
        partial = contents.partial
        self.partial_iteration = partial.iteration if partial is not None else None
        self.partial_ids = set(partial.fl_ids) if partial is not None else set()

    # -- commit

    def commit_group(self, jobs: list[_Job]) -> list[BaseException | None]:
        """Commit the jobs' transitions in one transaction; the outcome of each, in order."""
        db = self.db
        assert db is not None
        outcomes: list[BaseException | None] = [None] * len(jobs)
        server: ServerState | None = None
        scheduler: SchedulerState | None = None
        partial: tuple[int, bytes, int] | None = None
        committed = 0
        try:
            with db.atomic():
                for index, job in enumerate(jobs):
                    t = job.transition
                    assert t is not None
                    try:
                        check_roles(self.identity, t)
                        starts = (
                            check_partial_write(
                                self.partial_iteration, self.partial_ids.__contains__, t.partial
                            )
                            if t.partial is not None
                            else False
                        )
                    except StoreError as exc:
                        outcomes[index] = exc
                        continue
                    if t.scheduler is not None:
                        scheduler = t.scheduler
                    if t.server is not None:
                        server = t.server
                    if t.new_history:
                        # The history starts over (spec/store.md, "Records"): nothing of the old one,
                        # nor a sum written earlier in this group, survives this transaction.
                        db.execute("DELETE FROM models")
                        db.execute("DELETE FROM partial_sum")
                        db.execute("DELETE FROM partial_fl_ids")
                        self.partial_iteration, self.partial_ids, partial = None, set(), None
                    if t.model is not None:
                        db.execute(
                            "INSERT OR REPLACE INTO models (iteration, weights, crc32) VALUES (?, ?, ?)",
                            [t.model.iteration, t.model.weights, crc32(t.model.weights)],
                        )
                    if t.keep_models is not None:
                        db.execute(
                            "DELETE FROM models WHERE iteration NOT IN "
                            "(SELECT iteration FROM models ORDER BY iteration DESC LIMIT ?)",
                            [t.keep_models],
                        )
                    if (write := t.partial) is not None:
                        if starts:
                            db.execute("DELETE FROM partial_fl_ids")
                            self.partial_ids = set()
                        self.partial_iteration = write.iteration
                        partial = (write.iteration, write.data, write.update_count)
                        match write:
                            case FoldedUpdates():
                                db.conn.executemany(
                                    "INSERT INTO partial_fl_ids (fl_id) VALUES (?)",
                                    [(f,) for f in write.fl_ids],
                                )
                                self.partial_ids.update(write.fl_ids)
                            case PartialReset():
                                pass
                    if (rows := t.devices) is not None:
                        if rows.rewrite:
                            db.execute("DELETE FROM device_rows")
                        db.conn.executemany(
                            "INSERT OR REPLACE INTO device_rows (fl_id, record) VALUES (?, ?)", rows.rows
                        )
                        db.conn.executemany(
                            "DELETE FROM device_rows WHERE fl_id = ?", [(f,) for f in rows.deleted]
                        )
                    committed += 1
                if scheduler is not None:
                    self._write_scheduler(db, scheduler)
                if server is not None:
                    db.execute(
                        "INSERT OR REPLACE INTO server_state (id, rank, iteration, instance_state, machine) "
                        "VALUES (1, ?, ?, ?, ?)",
                        [server.rank, server.iteration, server.instance_state, server.machine],
                    )
                if partial is not None:
                    iteration, data, update_count = partial
                    values = [iteration, data, crc32(data), update_count]
                    # An UPDATE rewrites the row in place; INSERT OR REPLACE would free the blob's
                    # overflow pages and allocate them again (measured: ~1.4x the cost per commit).
                    updated = db.execute(
                        "UPDATE partial_sum SET iteration = ?, data = ?, crc32 = ?, update_count = ? "
                        "WHERE id = 1",
                        values,
                    )
                    if updated.rowcount == 0:
                        db.execute(
                            "INSERT INTO partial_sum (id, iteration, data, crc32, update_count) "
                            "VALUES (1, ?, ?, ?, ?)",
                            values,
                        )
        except sqlite3.Error as exc:
            self._cache(_read_contents(db, self.path))
            error = StoreWriteError(
                f"recovery store {self.path}: the commit failed in SQLite ({exc}); nothing of the "
                f"{len(jobs)} transition(s) it held was committed"
            )
            self.stats = attrs.evolve(self.stats, refused=self.stats.refused + len(jobs))
            return [error] * len(jobs)
        self.stats = StoreStatistics(
            transitions=self.stats.transitions + committed,
            transactions=self.stats.transactions + (1 if committed else 0),
            refused=self.stats.refused + len(jobs) - committed,
            largest_group=max(self.stats.largest_group, committed),
        )
        return outcomes

    @staticmethod
    def _write_scheduler(db: sqlite_utils.Database, state: SchedulerState) -> None:
        db.execute(
            "INSERT OR REPLACE INTO scheduler_state (id, cluster_state, server_num, fl_iteration_num) "
            "VALUES (1, ?, ?, ?)",
            [state.cluster_state, state.server_num, state.fl_iteration_num],
        )
        db.execute("DELETE FROM members")
        for m in state.members:
            db.execute(
                "INSERT INTO members (rank, node_id, host, port, device_port) VALUES (?, ?, ?, ?, ?)",
                [m.rank, m.node_id, m.host, m.port, m.device_port],
            )

    # -- the loop

    def run(self) -> None:
        """The thread: serve jobs in order until a close (or a failed open)."""
        held: _Job | None = None
        while True:
            job = held if held is not None else self.jobs.get()
            held = None
            match job.kind:
                case "commit":
                    group = [job]
                    while len(group) < MAX_GROUP:
                        try:
                            more = self.jobs.get_nowait()
                        except queue.Empty:
                            break
                        if more.kind != "commit":
                            held = more
                            break
                        group.append(more)
                    for queued, outcome in zip(group, self.commit_group(group), strict=True):
                        queued.deliver(None, outcome)
                case "open":
                    try:
                        contents = self.open()
                    except BaseException as exc:
                        job.deliver(None, exc)
                        return
                    job.deliver(contents, None)
                case "load":
                    assert self.db is not None
                    try:
                        job.deliver(_read_contents(self.db, self.path), None)
                    except BaseException as exc:
                        job.deliver(None, exc)
                case "close":
                    try:
                        if self.db is not None:
                            self.db.close()
                            self.db = None
                    except BaseException as exc:
                        job.deliver(None, exc)
                    else:
                        job.deliver(None, None)
                    return


# ----------------------------------------------------------------------------------------- trio side


def _translate(exc: BaseException, where: str) -> BaseException:
    """An SQLite error raised while opening, as the store's error naming the file."""
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return StoreLocked(
            where,
            "another open store holds the file (two nodes given the same store file?)",
            "stop the other node, or give each node its own file (its own node id)",
        )
    if isinstance(exc, sqlite3.DatabaseError):
        return StoreCorrupt(where, f"SQLite cannot read it: {exc}")
    return exc


class SqliteStore:
    """The recovery store in a SQLite file (open it with :func:`open_sqlite_store`)."""

    def __init__(self, writer: _Writer, thread: threading.Thread) -> None:
        """Wrap a started writer thread (use :func:`open_sqlite_store`)."""
        self._writer = writer
        self._thread = thread
        self._closed = False

    @property
    def identity(self) -> NodeIdentity:
        """The job identity the store is bound to."""
        return self._writer.identity

    @property
    def location(self) -> str:
        """The file's path (or ``:memory:``)."""
        return self._writer.path

    @property
    def created(self) -> bool:
        """Whether this open created the file."""
        return self._writer.created

    @staticmethod
    async def _submit(
        writer: _Writer, kind: Literal["open", "load", "commit", "close"], transition: Transition | None
    ) -> Any:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        answer: list[tuple[Any, BaseException | None]] = []

        def arrived(value: Any, error: BaseException | None) -> None:
            answer.append((value, error))
            done.set()

        def deliver(value: Any, error: BaseException | None) -> None:  # on the writer thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(arrived, value, error)

        writer.jobs.put(_Job(kind, transition, deliver))
        with trio.CancelScope(shield=True):  # bounded: the writer answers every job it is given
            await done.wait()
        value, error = answer[0]
        if error is not None:
            raise error
        return value

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"recovery store {self.location} is closed; open it again to use it")

    async def load(self) -> StoreContents:
        """Everything the file holds (every commit that began before this call included).

        Raises:
            StoreCorrupt: a blob does not match its CRC-32, or a row breaks a record's rules.
            StoreClosed: the store is closed.
        """
        self._check_open()
        contents: StoreContents = await self._submit(self._writer, "load", None)
        return contents

    async def commit(self, transition: Transition) -> None:
        """Commit ``transition``; return once the transaction holding it is committed (fsynced).

        Raises:
            TransitionRefused: the transition breaks a store rule; nothing of it was committed.
            StoreWriteError: SQLite failed the commit; nothing of it was committed.
            StoreClosed: the store is closed.
        """
        self._check_open()
        await self._submit(self._writer, "commit", transition)

    def statistics(self) -> StoreStatistics:
        """Counters since the store was opened (``transactions < transitions`` when grouped)."""
        return self._writer.stats

    async def aclose(self) -> None:
        """Close the connection and stop the thread (idempotent); every answered commit stays."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._submit(self._writer, "close", None)
        finally:
            await trio.to_thread.run_sync(self._thread.join)


@contextlib.asynccontextmanager
async def open_sqlite_store(
    path: str | os.PathLike[str], identity: NodeIdentity, *, synchronous: Synchronous = "FULL"
) -> AsyncIterator[SqliteStore]:
    """Open (or create) the store file at ``path`` for ``identity``; close it on the way out.

    Args:
        path: the store file (one per node: see :func:`~flcluster.store.api.store_file`), or
            :data:`MEMORY`.
        identity: the job identity of the node opening it; a file of another identity is refused.
        synchronous: ``FULL`` (the durability the runtime needs, see the module docstring); ``NORMAL``
            only to measure what ``FULL`` costs.

    Raises:
        StoreCorrupt: the file is empty, cut short, damaged or not SQLite.
        StoreForeign: the file belongs to another job, node or role, or to another program.
        StoreTooNew: the file has a newer schema.
        StoreLocked: another open store holds the file.
        StoreOpenError: the file's directory does not exist.
    """
    where = os.fspath(path)
    writer = _Writer(where, identity, synchronous)
    thread = threading.Thread(target=writer.run, name=f"flcluster-store {where}", daemon=True)
    thread.start()
    try:
        await SqliteStore._submit(writer, "open", None)
    except BaseException as exc:
        await trio.to_thread.run_sync(thread.join)
        translated = _translate(exc, where)
        if translated is exc:
            raise
        raise translated from exc
    store = SqliteStore(writer, thread)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
        stats = store.statistics()
        log.info(
            "recovery store %s closed: %d transitions in %d transactions (largest group %d, %d refused)",
            where,
            stats.transitions,
            stats.transactions,
            stats.largest_group,
            stats.refused,
        )
