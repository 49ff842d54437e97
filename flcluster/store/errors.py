"""Errors of the recovery store (spec/store.md, "Errors").

Every refusal to open names the file, says what is wrong with it, that a recovery store is never reset
automatically, and what the operator can do. The store never deletes, truncates or rewrites a file it
refuses: whatever the file holds stays there for the operator (or a backup tool) to look at.

- :class:`StoreCorrupt`: the file is not a readable recovery store: empty, cut short, damaged, not a
  SQLite database, a schema this code cannot read, or contents that break the store's rules.
- :class:`StoreForeign`: a sound recovery store of another job, node or role (``fl_name``,
  ``server_num``, node id, role), or a SQLite database of another program.
- :class:`StoreTooNew`: a recovery store written by a newer flcluster (a higher schema version).
- :class:`StoreLocked`: another open store (in this process or another) holds the file.
- :class:`TransitionRefused`: a transition breaks a store rule (a caller bug); nothing of it was committed.
- :class:`StoreWriteError`: a commit failed (disk full, I/O error); nothing of it was committed.
- :class:`StoreClosed`: the store was used after it was closed.
"""

from __future__ import annotations

from flcluster.errors import FLClusterError

NEVER_RESET = "a recovery store is never reset automatically"
"""The sentence every refusal to open carries."""

FRESH_START = (
    "to start this node afresh, move the file (and its -wal file, if any) aside; to recover, restore it "
    "from a backup"
)
"""The operator's way out of a damaged store, quoted in :class:`StoreCorrupt` messages."""


class StoreError(FLClusterError):
    """Base of the recovery store's errors."""


class StoreOpenError(StoreError):
    """A store file was refused at start-up; the message names the file, the problem and the way out."""

    def __init__(self, location: str, problem: str, remedy: str = FRESH_START) -> None:
        """Build the message from the file, what is wrong with it and what the operator can do.

        Args:
            location: the store file's path (or the memory volume's name).
            problem: what is wrong, with the offending values (``!r``) and what was expected.
            remedy: what the operator can do about it.
        """
        self.location = location
        self.problem = problem
        super().__init__(f"recovery store {location}: {problem}; {NEVER_RESET}: {remedy}")


class StoreCorrupt(StoreOpenError):
    """The file is not a readable recovery store (empty, cut short, damaged, not SQLite, bad contents)."""


class StoreForeign(StoreOpenError):
    """The file is a recovery store of another job, node or role, or a database of another program."""


class StoreTooNew(StoreOpenError):
    """The file was written by a newer flcluster, with a schema version this code does not know."""


class StoreLocked(StoreOpenError):
    """Another open store holds the file (two nodes given the same store file)."""


class TransitionRefused(StoreError, ValueError):
    """A transition breaks a store rule; nothing of it was committed (the message names the rule)."""


class StoreClosed(StoreError):
    """The store was used after :meth:`~flcluster.store.api.RecoveryStore.aclose`."""


class StoreWriteError(StoreError):
    """A commit failed in SQLite (disk full, I/O error); nothing of the transitions it held was committed."""
