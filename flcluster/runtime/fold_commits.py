"""A Server's folds made durable in groups: one running sum written per store transaction.

Theory of operation (spec/recovery.md §4, spec/store.md "Group commit")
----------------------------------------------------------------------
A Server answers SUCCEED to an update only once the running sum that holds it is committed. Encoding
the sum (266 KB for LeNet: a copy off the accumulator, the encoding, its CRC-32) is the costliest part
of a commit on the event loop, and doing it for every update cost more than a third of a Server's
ingest. So folds are not committed one by one: :meth:`FoldCommits.commit` records the fold and waits.
The first waiter that finds no commit in flight becomes the committer: it takes every fold recorded so
far, encodes the sum of their iteration **once** (a sum always holds exactly the folds recorded before
it was taken: the take and the encoding happen with no checkpoint between), commits one
:class:`~flcluster.store.FoldedUpdates` per iteration, in fold order, and wakes everyone. Folds
recorded while that commit was in flight go in the next, taken by the first of their waiters. Under
load the encoding and the transaction are shared by all the folds made during the previous commit, so
the cost per update falls as load rises, and no SUCCEED goes out before its fold is committed.

The commits are shielded (a store commit is bounded: its writer answers every job), so a committer that
is cancelled still lands what it took, and a waiter left without a committer becomes one itself. A
commit that fails (a store error) fails every fold waiting then and later: what it took is lost, and no
later commit may stand for it.

A fold whose iteration's sum was dropped before its commit (the iteration failed meanwhile) is not
written: there is no sum to write it into, and that iteration's updates count for nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from flcluster.store import FoldedUpdates, RecoveryStore, Transition

__all__ = ["FoldCommits", "SumOf"]

SumOf = Callable[[int], tuple[bytes, int] | None]
"""The running sum of an iteration as the store keeps it (its encoding, its update count), or ``None``
once the sum was dropped."""


class FoldCommits:
    """The group commit of one Server's folds (see the module docstring)."""

    def __init__(self, store: RecoveryStore, sum_of: SumOf) -> None:
        """Commit folds to ``store``; ``sum_of`` encodes an iteration's running sum as it is now."""
        self._store = store
        self._sum_of = sum_of
        self._recorded: list[tuple[int, str]] = []
        self._recorded_count = 0
        self._durable_count = 0
        self._committing = False
        self._committed = trio.Event()
        self._broken: BaseException | None = None
        self.transactions = 0

    async def commit(self, iteration: int, fl_id: str) -> None:
        """Record that ``fl_id``'s update was just folded into the sum of ``iteration``; return once the
        sum holding it is committed. Call it right after the fold, with no checkpoint between."""
        self._recorded.append((iteration, fl_id))
        self._recorded_count += 1
        wanted = self._recorded_count
        while self._durable_count < wanted:
            if self._broken is not None:
                raise self._broken
            if self._committing:
                await self._committed.wait()
                continue
            await self._commit_recorded()

    async def _commit_recorded(self) -> None:
        self._committing = True
        taken, self._recorded = self._recorded, []
        upto = self._recorded_count
        try:
            transitions = self._transitions(taken)
            with trio.CancelScope(shield=True):
                for transition in transitions:
                    await self._store.commit(transition)
                    self.transactions += 1
            self._durable_count = upto
        except BaseException as exc:
            # What was taken is lost with this commit: no later commit may stand for it.
            self._broken = exc
            raise
        finally:
            self._committing = False
            self._committed.set()
            self._committed = trio.Event()

    def _transitions(self, taken: list[tuple[int, str]]) -> list[Transition]:
        """One write per iteration (oldest first), its folds in fold order, with its sum as it is now."""
        runs: dict[int, list[str]] = {}
        for iteration, fl_id in taken:
            runs.setdefault(iteration, []).append(fl_id)
        transitions = []
        for iteration, fl_ids in sorted(runs.items()):
            encoded = self._sum_of(iteration)
            if encoded is None:
                continue  # the sum was dropped (its iteration failed): nothing to write it into
            data, update_count = encoded
            write = FoldedUpdates(iteration, tuple(fl_ids), data, update_count)
            transitions.append(Transition(partial=write))
        return transitions
