"""The group commit of a Server's folds (flcluster/runtime/fold_commits.py, spec/recovery.md §4)."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel

from flcluster.errors import StoreWriteError
from flcluster.runtime.fold_commits import FoldCommits
from flcluster.store import MEMORY, NodeIdentity, PartialSumState, StoreRole, Transition, open_sqlite_store

IDENTITY = NodeIdentity(StoreRole.SERVER, "s1", "Lenet", 2)


class Sums:
    """A stand-in for a Server's accumulators: the "sum" of an iteration is its folds, as text."""

    def __init__(self) -> None:
        self.folds: dict[int, list[str]] = {}
        self.encoded = 0

    def fold(self, iteration: int, fl_id: str) -> None:
        self.folds.setdefault(iteration, []).append(fl_id)

    def sum_of(self, iteration: int) -> tuple[bytes, int] | None:
        if iteration not in self.folds:
            return None
        self.encoded += 1
        ids = self.folds[iteration]
        return ",".join(ids).encode(), len(ids)


async def test_concurrent_folds_share_commits_and_each_returns_once_its_fold_is_stored() -> None:
    sums = Sums()
    async with open_sqlite_store(MEMORY, IDENTITY) as store:
        commits = FoldCommits(store, sums.sum_of)
        order: list[str] = []

        async def device(n: int) -> None:
            await trio.lowlevel.checkpoint()
            fl_id = f"d{n:02d}"
            sums.fold(1, fl_id)  # the fold and its record, no checkpoint between
            order.append(fl_id)
            await commits.commit(1, fl_id)
            partial = (await store.load()).partial
            assert partial is not None and fl_id in partial.fl_ids  # durable before the answer

        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(device, n)
        partial = (await store.load()).partial
    assert partial == PartialSumState(1, ",".join(order).encode(), tuple(order), 40)
    assert commits.transactions < 40 and sums.encoded == commits.transactions  # one encoding per commit


async def test_folds_of_a_dropped_sum_are_not_written() -> None:
    sums = Sums()
    async with open_sqlite_store(MEMORY, IDENTITY) as store:
        commits = FoldCommits(store, sums.sum_of)
        await commits.commit(3, "gone")  # no sum of iteration 3 any more (it failed)
        assert (await store.load()).partial is None
        sums.fold(4, "a")
        await commits.commit(4, "a")
        assert (await store.load()).partial == PartialSumState(4, b"a", ("a",), 1)


class FailingStore:
    """A store whose commits fail (as SQLite failing the transaction would)."""

    def __init__(self) -> None:
        self.calls = 0

    async def commit(self, transition: Transition) -> None:
        self.calls += 1
        await trio.sleep(1)
        raise StoreWriteError("the commit failed")


async def test_a_failed_commit_fails_every_fold_waiting_and_later(autojump_clock: trio.abc.Clock) -> None:
    sums, store = Sums(), FailingStore()
    commits = FoldCommits(store, sums.sum_of)  # type: ignore[arg-type]
    failures: list[str] = []

    async def device(fl_id: str) -> None:
        sums.fold(1, fl_id)
        try:
            await commits.commit(1, fl_id)
        except StoreWriteError:
            failures.append(fl_id)

    async with trio.open_nursery() as nursery:
        for fl_id in ("a", "b", "c"):
            nursery.start_soon(device, fl_id)
    assert sorted(failures) == ["a", "b", "c"]
    with pytest.raises(StoreWriteError):
        await commits.commit(1, "d")
    assert store.calls == 1  # nothing committed after the failure stands in for what it lost
