"""The :class:`RecoveryStore` interface every store implements, and the file-per-node rule.

Theory of operation (spec/store.md, "Contract"). A node opens its store once at start-up (the opener
checks that the store is sound and bound to this node's :class:`~flcluster.store.records.NodeIdentity`,
and refuses it otherwise), :meth:`RecoveryStore.load`\\ s what it holds, and then commits one
:class:`~flcluster.store.records.Transition` per state change. :meth:`RecoveryStore.commit` returns only
once the transition is committed (durable, for a store on disk), so the rule "acknowledge only what is
committed" is: ``await store.commit(t)``, then acknowledge.

Commits are ordered: transitions are committed in the order their ``commit`` calls began, and a
``load`` sees every commit that began before it. Callers that fold an update into a running sum and
commit the result must call ``commit`` right after the fold, with no checkpoint between, so that the
commit order is the fold order.

``commit`` is not cancellable once called: it waits (shielded) for the store's answer, which takes a
bounded time, so that when it returns or raises the caller knows whether the transition is committed.

Each node has its own store file, named by :func:`store_file` from the directory in the configuration,
the role and the node id: several Servers on one host share one ``config.json`` and one directory but
never a file (a second opener of a file is refused with
:class:`~flcluster.errors.StoreLocked`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from flcluster.store.records import NodeIdentity, StoreContents, StoreRole, StoreStatistics, Transition

STORE_SUFFIX = ".sqlite"
"""The suffix of a store file."""


class RecoveryStore(Protocol):
    """A node's recovery store (spec/store.md, "Contract")."""

    @property
    def identity(self) -> NodeIdentity:
        """The job identity the store is bound to."""
        ...

    @property
    def location(self) -> str:
        """Where the store lives (its file path, or ``:memory:``), for messages and logs."""
        ...

    @property
    def created(self) -> bool:
        """Whether this open created the store (``False``: it existed and was recovered)."""
        ...

    async def load(self) -> StoreContents:
        """Everything the store holds (every commit that began before this call included).

        Raises:
            StoreCorrupt: what was read breaks the store's rules (a damaged file).
            StoreClosed: the store is closed.
        """
        ...

    async def commit(self, transition: Transition) -> None:
        """Commit ``transition`` in one transaction; return once it is committed.

        Raises:
            TransitionRefused: the transition breaks a store rule; nothing of it was committed.
            StoreError: the commit failed (for example the disk is full); nothing of it was committed.
            StoreClosed: the store is closed.
        """
        ...

    def statistics(self) -> StoreStatistics:
        """Counters since the store was opened."""
        ...

    async def aclose(self) -> None:
        """Close the store (idempotent); every commit already answered stays committed."""
        ...


def store_file(directory: str | Path, role: StoreRole | str, node_id: str) -> Path:
    """The store file of node ``node_id`` in ``role`` under ``directory`` (one file per node).

    The node id is percent-encoded (``/``, ``%`` and everything outside letters, digits and ``-._~``),
    so every node id maps to its own file name and none leaves ``directory``.

    Raises:
        ValueError: ``node_id`` is empty or ``role`` is not a :class:`StoreRole` value.
    """
    if not node_id:
        raise ValueError("node_id='' is refused; a recovery store file belongs to a node with an id")
    role = StoreRole(role)
    return Path(directory) / f"{role.value}-{quote(node_id, safe='')}{STORE_SUFFIX}"


def node_store_path(storage_file_path: str | Path, role: StoreRole | str, node_id: str) -> Path:
    """The store file of one node for ``config.json``'s ``recovery.storage_file_path`` (spec/recovery.md §2).

    Several nodes share one ``config.json``, so ``storage_file_path`` names a *base*: node ``X`` in
    ``role`` keeps its store next to it, in ``<stem>.<role>-<X>.sqlite`` (``recovery.json`` gives
    ``recovery.server-0.sqlite``). The configuration file itself is never the store, even where the
    guide's example points ``storage_file_path`` at it: the derived name always differs from the base.

    Raises:
        ValueError: ``node_id`` is empty or ``role`` is not a :class:`StoreRole` value.
    """
    base = Path(storage_file_path)
    name = store_file(".", role, node_id).name
    return base.with_name(f"{base.stem}.{name}")
