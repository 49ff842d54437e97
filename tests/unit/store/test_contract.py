"""The recovery store contract (spec/store.md, "Contract"), run against memory, SQLite in memory and SQLite
on disk. Each test states one rule; every store must keep it.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flcluster.store import (
    DeviceRows,
    FoldedUpdates,
    Member,
    NodeIdentity,
    PartialReset,
    PartialSumState,
    RecoveryStore,
    SchedulerState,
    ServerState,
    StoreClosed,
    StoreContents,
    StoredModel,
    StoreForeign,
    StoreLocked,
    StoreRole,
    Transition,
    TransitionRefused,
)
from tests.unit.store.backends import BACKENDS, SCHEDULER, SERVER, Opener, weights


@pytest.fixture(params=BACKENDS)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    return Opener(request.param, tmp_path)


def needs_reopen(opener: Opener) -> None:
    if not opener.reopenable:
        pytest.skip("a SQLite store in memory does not outlive its connection")


def fold(iteration: int, fl_id: str, count: int) -> Transition:
    return Transition(partial=FoldedUpdates(iteration, (fl_id,), weights(count), count))


async def start_commit(nursery: trio.Nursery, store: RecoveryStore, transition: Transition) -> list[object]:
    """Start ``store.commit(transition)`` in a task whose commit is queued before this returns.

    ``task_status.started()`` does not yield, so the task reaches its commit's first checkpoint (after the
    store took the transition) before the parent runs again: commits started this way are queued in
    order, all at once, and are committed in that order (grouped, in the SQLite store).
    """
    outcome: list[object] = []

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await store.commit(transition)
        except TransitionRefused as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    await nursery.start(run)
    return outcome


# ---------------------------------------------------------------------------------------- a fresh store


async def test_a_fresh_store_holds_only_its_identity(opener: Opener) -> None:
    async with opener.open() as store:
        assert store.created
        assert store.identity == SERVER
        assert await store.load() == StoreContents(identity=SERVER)
        assert store.statistics().transitions == 0


# ------------------------------------------------------------------------------------------ the records


async def test_the_server_state_is_the_last_committed(opener: Opener) -> None:
    async with opener.open() as store:
        await store.commit(Transition(server=ServerState(1, 3, "running", '{"phase": "running"}')))
        await store.commit(Transition(server=ServerState(0, 4, "finish", None)))
        assert (await store.load()).server == ServerState(0, 4, "finish", None)


async def test_the_membership_is_replaced_whole_and_kept_in_rank_order(opener: Opener) -> None:
    a = Member("a", 0, "10.0.0.1", 6000, 6666)
    b = Member("b", 1, "10.0.0.2", 6001, 6667)
    c = Member("c", 2, "10.0.0.3", 6002, 6668)
    async with opener.open(SCHEDULER) as store:
        await store.commit(Transition(scheduler=SchedulerState("CLUSTER_READY", 3, (c, a, b))))
        assert (await store.load()).scheduler == SchedulerState("CLUSTER_READY", 3, (a, b, c))
        b0 = attrs.evolve(b, rank=0)
        await store.commit(Transition(scheduler=SchedulerState("CLUSTER_SCALE_IN", 1, (b0,))))
        assert (await store.load()).scheduler == SchedulerState("CLUSTER_SCALE_IN", 1, (b0,))


async def test_models_are_kept_by_iteration_and_the_oldest_are_dropped(opener: Opener) -> None:
    async with opener.open() as store:
        for i in range(5):
            await store.commit(Transition(model=StoredModel(i, weights(i)), keep_models=3))
        await store.commit(Transition(model=StoredModel(3, weights(33))))
        assert (await store.load()).models == (
            StoredModel(2, weights(2)),
            StoredModel(3, weights(33)),
            StoredModel(4, weights(4)),
        )


async def test_folded_updates_build_the_running_sum_in_fold_order(opener: Opener) -> None:
    async with opener.open() as store:
        await store.commit(Transition(partial=PartialReset(1, weights(0))))
        for count, fl_id in enumerate(["f3", "f1", "f2"], start=1):
            await store.commit(fold(1, fl_id, count))
        assert (await store.load()).partial == PartialSumState(1, weights(3), ("f3", "f1", "f2"), 3)


async def test_a_fold_into_a_newer_iteration_starts_its_sum_afresh(opener: Opener) -> None:
    async with opener.open() as store:
        await store.commit(fold(1, "f1", 1))
        await store.commit(fold(2, "f1", 1))
        assert (await store.load()).partial == PartialSumState(2, weights(1), ("f1",), 1)
        await store.commit(Transition(partial=PartialReset(3, weights(9), update_count=0)))
        assert (await store.load()).partial == PartialSumState(3, weights(9), (), 0)


async def test_a_fold_into_an_older_iteration_or_a_second_fold_is_refused_and_changes_nothing(
    opener: Opener,
) -> None:
    async with opener.open() as store:
        await store.commit(fold(2, "f1", 1))
        before = await store.load()
        with pytest.raises(TransitionRefused, match=r"iteration 1 is refused; the stored sum is of .* 2"):
            await store.commit(fold(1, "f2", 2))
        with pytest.raises(TransitionRefused, match=r"\['f1'\] are refused; their updates are already in"):
            await store.commit(fold(2, "f1", 2))
        with pytest.raises(TransitionRefused, match=r"\['f1'\] are refused"):  # one of several: all refused
            await store.commit(Transition(partial=FoldedUpdates(2, ("f3", "f1"), weights(3), 3)))
        with pytest.raises(TransitionRefused):
            await store.commit(Transition(partial=PartialReset(1, weights(0))))
        assert await store.load() == before
        assert store.statistics().refused == 4


async def test_folds_committed_together_keep_their_order(opener: Opener) -> None:
    async with opener.open() as store:
        await store.commit(fold(1, "f1", 1))
        await store.commit(Transition(partial=FoldedUpdates(1, ("f3", "f2"), weights(3), 3)))
        assert (await store.load()).partial == PartialSumState(1, weights(3), ("f1", "f3", "f2"), 3)


def test_a_fold_names_distinct_devices() -> None:
    for bad in ((), ("a", "a"), ("",)):
        with pytest.raises(ValueError, match="fl_ids"):
            FoldedUpdates(1, bad, weights(1), 1)


async def test_a_refused_transition_commits_none_of_its_parts(opener: Opener) -> None:
    async with opener.open() as store:
        await store.commit(fold(1, "f1", 1))
        before = await store.load()
        with pytest.raises(TransitionRefused):
            await store.commit(
                Transition(
                    server=ServerState(0, 9, "running"),
                    model=StoredModel(9, weights(9)),
                    partial=FoldedUpdates(1, ("f1",), weights(2), 2),
                )
            )
        assert await store.load() == before


async def test_an_iteration_end_is_one_transition(opener: Opener) -> None:
    async with opener.open() as store:
        await store.commit(fold(1, "f1", 1))
        await store.commit(
            Transition(
                server=ServerState(0, 2, "running", "{}"),
                model=StoredModel(1, weights(1)),
                keep_models=3,
                partial=PartialReset(2, weights(0)),
            )
        )
        contents = await store.load()
        assert contents.server == ServerState(0, 2, "running", "{}")
        assert contents.models == (StoredModel(1, weights(1)),)
        assert contents.partial == PartialSumState(2, weights(0), (), 0)


async def test_a_new_history_deletes_every_model_and_the_sum_in_its_one_transaction(opener: Opener) -> None:
    """spec/store.md, "Records": ``new_history`` leaves only its model (a new instance's model 0)."""
    async with opener.open() as store:
        for i in range(4):
            await store.commit(Transition(model=StoredModel(i, weights(i)), keep_models=3))
        await store.commit(fold(4, "f1", 1))
        await store.commit(
            Transition(
                server=ServerState(1, 1, "running"), model=StoredModel(0, weights(40)), new_history=True
            )
        )
        contents = await store.load()
        assert contents.models == (StoredModel(0, weights(40)),)
        assert contents.partial is None
        assert contents.server == ServerState(1, 1, "running")
        # The new history goes on from iteration 1: a sum of iteration 1 is no longer "older".
        await store.commit(fold(1, "f1", 1))
        await store.commit(Transition(model=StoredModel(1, weights(41)), keep_models=3))
        contents = await store.load()
        assert contents.models == (StoredModel(0, weights(40)), StoredModel(1, weights(41)))
        assert contents.partial == PartialSumState(1, weights(1), ("f1",), 1)


async def test_a_new_history_queued_behind_a_fold_drops_that_fold_too(opener: Opener) -> None:
    """Grouped with earlier writes (SQLite), the new history still wins: nothing older survives it."""
    async with opener.open() as store:
        await store.commit(Transition(model=StoredModel(5, weights(5))))
        async with trio.open_nursery() as nursery:
            folded = await start_commit(nursery, store, fold(6, "f1", 1))
            renewed = await start_commit(
                nursery, store, Transition(model=StoredModel(0, weights(50)), new_history=True)
            )
            after = await start_commit(nursery, store, fold(1, "f2", 1))
        assert folded == renewed == after == [None]
        contents = await store.load()
        assert contents.models == (StoredModel(0, weights(50)),)
        assert contents.partial == PartialSumState(1, weights(1), ("f2",), 1)


async def test_a_new_history_survives_a_reopen(opener: Opener) -> None:
    needs_reopen(opener)
    async with opener.open() as store:
        await store.commit(Transition(model=StoredModel(7, weights(7))))
        await store.commit(fold(8, "f1", 1))
        await store.commit(Transition(model=StoredModel(0, weights(70)), new_history=True))
    async with opener.open() as store:
        contents = await store.load()
        assert contents.models == (StoredModel(0, weights(70)),)
        assert contents.partial is None


def test_a_new_history_needs_its_model_and_no_sum() -> None:
    with pytest.raises(ValueError, match="new_history=True is refused"):
        Transition(new_history=True)
    with pytest.raises(ValueError, match="new_history=True is refused"):
        Transition(server=ServerState(0, 1, "running"), new_history=True)
    with pytest.raises(ValueError, match="new_history=True is refused"):
        Transition(model=StoredModel(0, weights(0)), partial=PartialReset(1, weights(0)), new_history=True)


async def test_each_role_writes_only_its_own_state(opener: Opener) -> None:
    async with opener.open() as store:
        with pytest.raises(TransitionRefused, match="keeps no scheduler state"):
            await store.commit(Transition(scheduler=SchedulerState("CLUSTER_READY", 1)))
    if not opener.reopenable:
        return
    opener.volume = type(opener.volume)("volume-b")
    opener.tmp_path = opener.tmp_path / "b"
    opener.tmp_path.mkdir()
    async with opener.open(SCHEDULER) as store:
        for wrong in (
            Transition(server=ServerState(0, 1, "running")),
            Transition(model=StoredModel(0, b"")),
            Transition(partial=PartialReset(1, b"")),
            Transition(devices=DeviceRows(rows=(("a", "{}"),))),
        ):
            with pytest.raises(TransitionRefused, match="keeps only scheduler state"):
                await store.commit(wrong)
        assert await store.load() == StoreContents(identity=SCHEDULER)


async def test_device_rows_are_replaced_by_fl_id_deleted_and_rewritten_whole(opener: Opener) -> None:
    async with opener.open() as store:
        await store.commit(Transition(devices=DeviceRows(rows=(("b", "b1"), ("a", "a1"), ("c", "c1")))))
        assert (await store.load()).devices == (("a", "a1"), ("b", "b1"), ("c", "c1"))
        await store.commit(Transition(devices=DeviceRows(rows=(("b", "b2"),), deleted=("c", "zz"))))
        assert (await store.load()).devices == (("a", "a1"), ("b", "b2"))
        state = ServerState(0, 2, "running", "{}")
        await store.commit(Transition(server=state, devices=DeviceRows(rewrite=True, rows=(("d", "d1"),))))
        contents = await store.load()
        assert contents.devices == (("d", "d1"),) and contents.server == state
        await store.commit(Transition(devices=DeviceRows(rewrite=True)))
        assert (await store.load()).devices == ()


def test_a_device_row_needs_an_fl_id_and_text() -> None:
    for bad in ((("", "x"),), (("a", 1),), ((1, "x"),)):
        with pytest.raises(ValueError, match="device row"):
            DeviceRows(rows=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ concurrency and grouping


async def test_concurrent_commits_are_all_committed_in_the_order_they_began(opener: Opener) -> None:
    async with opener.open() as store, trio.open_nursery() as nursery:
        outcomes = [await start_commit(nursery, store, fold(1, f"f{i:03d}", i + 1)) for i in range(64)]
    # (the nursery has waited for every commit; the store is closed: reopen or stop here)
    assert all(o == [None] for o in outcomes)
    assert store.statistics().transitions == 64
    assert store.statistics().transactions <= 64
    if opener.reopenable:
        async with opener.open() as again:
            partial = (await again.load()).partial
        assert partial == PartialSumState(1, weights(64), tuple(f"f{i:03d}" for i in range(64)), 64)


async def test_a_refused_transition_among_concurrent_ones_fails_alone(opener: Opener) -> None:
    async with opener.open() as store:
        async with trio.open_nursery() as nursery:
            good1 = await start_commit(nursery, store, fold(1, "f1", 1))
            bad = await start_commit(nursery, store, fold(1, "f1", 2))
            good2 = await start_commit(nursery, store, fold(1, "f2", 2))
        assert good1 == [None] and good2 == [None]
        assert isinstance(bad[0], TransitionRefused)
        assert (await store.load()).partial == PartialSumState(1, weights(2), ("f1", "f2"), 2)
        assert store.statistics().refused == 1


async def test_a_commit_called_in_a_cancelled_scope_is_still_committed(opener: Opener) -> None:
    async with opener.open() as store:
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.commit(fold(1, "f1", 1))
            await trio.lowlevel.checkpoint()
        assert (await store.load()).partial == PartialSumState(1, weights(1), ("f1",), 1)


# ------------------------------------------------------------------------------------- open and reopen


async def test_everything_committed_is_there_after_a_reopen(opener: Opener) -> None:
    needs_reopen(opener)
    async with opener.open() as store:
        await store.commit(Transition(server=ServerState(1, 2, "running", '{"x": 1}')))
        await store.commit(Transition(model=StoredModel(1, weights(1))))
        await store.commit(fold(2, "f1", 1))
        await store.commit(Transition(devices=DeviceRows(rows=(("f1", "[1]"), ("f2", "[2]")))))
        written = await store.load()
    async with opener.open() as store:
        assert not store.created
        assert await store.load() == written


@pytest.mark.parametrize(
    "change",
    [
        {"role": StoreRole.SCHEDULER},
        {"node_id": "node-b"},
        {"fl_name": "OtherJob"},
        {"server_num": 3},
    ],
    ids=lambda c: next(iter(c)),
)
async def test_a_store_of_another_identity_is_refused_by_name(
    opener: Opener, change: dict[str, object]
) -> None:
    needs_reopen(opener)
    async with opener.open() as store:
        await store.commit(fold(1, "f1", 1))
    other = attrs.evolve(SERVER, **change)  # type: ignore[arg-type]
    field, value = next(iter(change.items()))
    with pytest.raises(StoreForeign) as info:
        async with opener.open(other):
            pass
    message = str(info.value)
    assert info.value.location in message
    assert f"{field} {getattr(SERVER, field)!r} (this node has {value!r})" in message
    assert "never reset automatically" in message
    async with opener.open() as store:  # the refusal changed nothing
        assert (await store.load()).partial == PartialSumState(1, weights(1), ("f1",), 1)


async def test_a_second_open_of_a_held_store_is_refused(opener: Opener) -> None:
    needs_reopen(opener)
    async with opener.open() as store:
        await store.commit(fold(1, "f1", 1))
        with pytest.raises(StoreLocked, match="another open store holds"):
            async with opener.open():
                pass
        await store.commit(fold(1, "f2", 2))


async def test_a_closed_store_refuses_use_and_closes_again_quietly(opener: Opener) -> None:
    async with opener.open() as store:
        pass
    with pytest.raises(StoreClosed, match="is closed"):
        await store.load()
    with pytest.raises(StoreClosed, match="is closed"):
        await store.commit(fold(1, "f1", 1))
    await store.aclose()


# ------------------------------------------------------------------- every store agrees with the rules


_ids = st.sampled_from(["a", "b", "c", "d"])
_transitions = st.one_of(
    st.builds(
        lambda i, f, c: fold(i, f, c),
        st.integers(0, 3),
        _ids,
        st.integers(0, 5),
    ),
    st.builds(lambda i: Transition(partial=PartialReset(i, weights(100 + i))), st.integers(0, 3)),
    st.builds(
        lambda r, i: Transition(server=ServerState(r, i, "running", f'{{"i": {i}}}')),
        st.integers(0, 2),
        st.integers(0, 5),
    ),
    st.builds(
        lambda w, r, d: Transition(devices=DeviceRows(rewrite=w, rows=tuple(r.items()), deleted=tuple(d))),
        st.booleans(),
        st.dictionaries(_ids, st.sampled_from(["x", "y", "z"]), max_size=3),
        st.lists(_ids, max_size=2),
    ),
    st.builds(
        lambda i, k: Transition(model=StoredModel(i, weights(i)), keep_models=k),
        st.integers(0, 6),
        st.one_of(st.none(), st.integers(1, 3)),
    ),
    st.builds(
        lambda i: Transition(model=StoredModel(i, weights(200 + i)), new_history=True), st.integers(0, 2)
    ),
)


async def _run_all(store: RecoveryStore, transitions: list[Transition]) -> tuple[list[bool], StoreContents]:
    async with trio.open_nursery() as nursery:
        outcomes = [await start_commit(nursery, store, t) for t in transitions]
    return [o == [None] for o in outcomes], await store.load()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(transitions=st.lists(_transitions, max_size=20))
def test_grouped_sqlite_commits_end_as_the_rules_say(transitions: list[Transition], tmp_path: Path) -> None:
    """Commits queued all at once (SQLite groups them) end where the rule book, one at a time, ends."""

    async def main() -> list[tuple[list[bool], StoreContents]]:
        results = []
        for backend in ("memory", "sqlite-memory"):
            async with Opener(backend, tmp_path).open() as store:
                results.append(await _run_all(store, transitions))
        return results

    memory, sqlite = trio.run(main)
    assert sqlite == memory


def test_an_empty_transition_or_a_bad_keep_is_refused() -> None:
    with pytest.raises(ValueError, match="an empty transition is refused"):
        Transition()
    with pytest.raises(ValueError, match="keep_models=0 is refused"):
        Transition(model=StoredModel(0, b""), keep_models=0)
    with pytest.raises(ValueError, match="not a whole number of float32"):
        StoredModel(0, b"abc")
    with pytest.raises(ValueError, match="each must be unique"):
        SchedulerState("CLUSTER_READY", 2, (Member("a", 0, "h", 1, 2), Member("b", 0, "h", 3, 4)))
    with pytest.raises(ValueError, match="node_id='' is refused"):
        NodeIdentity(StoreRole.SERVER, "", "Lenet", 1)
