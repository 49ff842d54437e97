"""The recovery store in memory: the store rules (:func:`~flcluster.store.records.apply_transition`)
and nothing else.

Theory of operation (spec/store.md, "MemoryStore"). A :class:`MemoryVolume` stands for the file: it
outlives the stores opened on it, so a test can close a store and open another on the same volume and
see what was committed, and it is bound to the identity of its first store exactly as a file is. A
volume is held by one open store at a time. Nothing here survives the process: a node configured without
``recovery`` can run on a ``MemoryStore`` and the runtime needs no second code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio

from flcluster.errors import StoreClosed, StoreForeign, StoreLocked
from flcluster.store.records import (
    NodeIdentity,
    StoreContents,
    StoreStatistics,
    Transition,
    apply_transition,
    identity_mismatch,
)


class MemoryVolume:
    """What a :class:`MemoryStore` writes to: the stand-in for a store file."""

    def __init__(self, name: str = "memory") -> None:
        """An empty volume called ``name`` in messages."""
        self.name = name
        self.contents: StoreContents | None = None
        self.held = False


class MemoryStore:
    """A :class:`~flcluster.store.api.RecoveryStore` in memory; open it with :func:`open_memory_store`."""

    def __init__(self, volume: MemoryVolume, identity: NodeIdentity) -> None:
        """Bind ``volume`` to ``identity`` (prefer :func:`open_memory_store`, which also closes it).

        Raises:
            StoreForeign: the volume is bound to another identity.
            StoreLocked: another open store holds the volume.
        """
        if volume.held:
            raise StoreLocked(volume.name, "another open store holds this volume", "close that store first")
        if volume.contents is not None and volume.contents.identity != identity:
            problem, remedy = identity_mismatch(volume.contents.identity, identity)
            raise StoreForeign(volume.name, problem, remedy)
        self._created = volume.contents is None
        if volume.contents is None:
            volume.contents = StoreContents(identity=identity)
        volume.held = True
        self._volume = volume
        self._identity = identity
        self._closed = False
        self._transitions = 0
        self._refused = 0

    @property
    def identity(self) -> NodeIdentity:
        """The job identity the store is bound to."""
        return self._identity

    @property
    def location(self) -> str:
        """The volume's name."""
        return self._volume.name

    @property
    def created(self) -> bool:
        """Whether this open bound a fresh volume."""
        return self._created

    def _contents(self) -> StoreContents:
        if self._closed or self._volume.contents is None:
            raise StoreClosed(f"recovery store {self.location} is closed; open it again to use it")
        return self._volume.contents

    async def load(self) -> StoreContents:
        """Everything the volume holds."""
        contents = self._contents()
        await trio.lowlevel.checkpoint()
        return contents

    async def commit(self, transition: Transition) -> None:
        """Apply ``transition`` to the volume (all of it or none of it).

        Raises:
            TransitionRefused: the transition breaks a store rule; the volume is unchanged.
            StoreClosed: the store is closed.
        """
        contents = self._contents()
        try:
            self._volume.contents = apply_transition(contents, transition)
        except BaseException:
            self._refused += 1
            raise
        self._transitions += 1
        await trio.lowlevel.checkpoint()

    def statistics(self) -> StoreStatistics:
        """Counters since the store was opened (one transaction per transition)."""
        return StoreStatistics(
            transitions=self._transitions,
            transactions=self._transitions,
            refused=self._refused,
            largest_group=min(self._transitions, 1),
        )

    async def aclose(self) -> None:
        """Release the volume (idempotent)."""
        if not self._closed:
            self._closed = True
            self._volume.held = False
        await trio.lowlevel.checkpoint()


@contextlib.asynccontextmanager
async def open_memory_store(
    identity: NodeIdentity, volume: MemoryVolume | None = None
) -> AsyncIterator[MemoryStore]:
    """Open a :class:`MemoryStore` on ``volume`` (a fresh one if ``None``) and close it on the way out.

    Raises:
        StoreForeign: the volume is bound to another identity.
        StoreLocked: another open store holds the volume.
    """
    store = MemoryStore(volume if volume is not None else MemoryVolume(), identity)
    try:
        yield store
    finally:
        await store.aclose()
